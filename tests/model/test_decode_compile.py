"""Compiled decode steps with the Triton decode kernels (norm, fused add, RoPE, RoPE + K/V write, SwiGLU product,
live attention): the kernels
reach Dynamo as opaque custom ops (orthrus_kernels.ops), so a step compiles without graph breaks (a break
inside a decode layer compiled each layer as its own frame and hit the recompile limit on an H200, session 9)
and decodes the same tokens as the eager steps. On a CPU the kernels run in the Triton interpreter."""
import pytest
import torch

from orthrus_train.model import layers

pytest.importorskip("orthrus_kernels")
from tests.model.triton_testlib import DEV, requires_triton, use_interpreter  # noqa: E402

pytestmark = requires_triton


@pytest.fixture
def all_kernels(monkeypatch):
    use_interpreter(monkeypatch)
    setters = (layers.set_decode_norm, layers.set_decode_rope, layers.set_decode_attention, layers.set_decode_kv_write,
               layers.set_decode_mlp)
    prev = (layers.decode_norm(), layers.decode_rope(), layers.decode_attention(), layers.decode_kv_write(),
            layers.decode_mlp())
    for set_, v in zip(setters, ("triton", "triton", "live", "triton", "triton")):
        set_(v)
    yield
    for set_, v in zip(setters, prev):
        set_(v)


def tiny_model_and_prompts(hidden_size: int):
    """A tiny random Qwen3 (4 heads, 2 kv heads, D = hidden_size / 4) on DEV, and 3 prompts of 1, 7 and 12 tokens."""
    from orthrus_train.model import OrthrusModel, build_random, tiny_config

    bb = build_random(tiny_config("qwen3", vocab_size=128, hidden_size=hidden_size, heads=4, kv_heads=2,
                                  initializer_range=0.2), seed=0)
    m = OrthrusModel(bb, block_size=4, vocab_len=120).to(DEV).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    return m, [torch.randint(0, 120, (n,), generator=g).tolist() for n in (1, 7, 12)]


def test_compiled_steps_with_every_kernel_have_no_graph_break(all_kernels, monkeypatch):
    from torch._dynamo.utils import counters

    from orthrus_train.decode.engine import DecodeEngine

    from orthrus_kernels import decode_attn, rmsnorm, rope, swiglu

    calls = []
    for mod, name in ((rmsnorm, "rms_norm"), (rmsnorm, "add_rms_norm"), (rope, "apply_rope"), (rope, "rope_kv_write"),
                      (swiglu, "silu_mul"), (decode_attn, "live_attention")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    m, prompts = tiny_model_and_prompts(256)
    out = {}
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        calls.clear()
        eng = DecodeEngine(m, batch_size=3, max_len=40, verify_backend="torch", compile_steps=compiled)
        out[compiled] = []
        # the AR steps with the K/V written by scatter_ after the RoPE kernel, the drafted steps with the K/V written
        # by the RoPE kernel (rope_kv_write, a custom op that mutates the cache): both RoPE ops compiled, one test
        for mode, kv_write in (("ar", "torch"), ("spec", "triton")):
            layers.set_decode_kv_write(kv_write)
            out[compiled].append([r.tokens for r in eng.generate(prompts, 8, mode=mode).rows])
        assert eng.compile_error is None
        assert set(calls) == {"rms_norm", "add_rms_norm", "apply_rope", "rope_kv_write", "silu_mul",
                              "live_attention"}  # every kernel ran
    assert out[True] == out[False]
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 2  # the AR and the drafted step, each one graph


def test_compiled_steps_with_the_fused_greedy_lm_head_have_no_graph_break(monkeypatch):
    """fused_argmax in compiled steps: the kernel reaches Dynamo as the custom op torch.ops.orthrus.lm_head_argmax
    (decode/lm_head.py), no graph break, the tokens of the eager unfused steps (greedy drafted decoding)."""
    from torch._dynamo.utils import counters

    from orthrus_train.decode.engine import DecodeEngine

    from orthrus_kernels import lm_head_argmax as lha

    use_interpreter(monkeypatch)
    calls = []
    real = lha.lm_head_argmax
    monkeypatch.setattr(lha, "lm_head_argmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    m, prompts = tiny_model_and_prompts(64)
    out = {}
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        eng = DecodeEngine(m, batch_size=3, max_len=40, verify_backend="torch", compile_steps=compiled,
                           fused_argmax=compiled)
        calls.clear()
        # the drafted step only (its draft and verify both take the kernel; the AR step is the verify at T = 1)
        out[compiled] = [r.tokens for r in eng.generate(prompts, 8).rows]
        assert eng.compile_error is None and eng.fused_argmax_active is compiled
        assert bool(calls) is compiled
    assert out[True] == out[False]
    assert dict(counters["graph_break"]) == {}
