"""What the tests of the opt-in Triton decode kernels share (test_decode_attn.py, test_decode_norm.py).

On a CPU the kernels run in the Triton interpreter (the root conftest builds orthrus_kernels' kernels for it, and
`use_interpreter` sets TRITON_INTERPRET for each test, as tests/kernels/conftest.py does for its folder). With
CUDA present they are compiled for the GPU and the inputs move to `DEV`. `requires_triton` skips a module where
Triton is not importable (or TRITON_INTERPRET=0 on a CPU box).
"""
import pytest
import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting

TRITON_OK = HAS_TRITON and (interpreting() or torch.cuda.is_available())
DEV = torch.device("cuda" if (TRITON_OK and not interpreting()) else "cpu")
requires_triton = pytest.mark.skipif(not TRITON_OK,
                                     reason="needs triton on CUDA or kernels built for TRITON_INTERPRET=1")


def use_interpreter(monkeypatch) -> None:
    if interpreting():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def interpreter_and_restored(get, set_):
    """An autouse fixture for a kernel test module: the interpreter where it is in use, and the decode setting
    that `get` reads restored through `set_` after each test. In the module: `_setting = interpreter_and_restored(
    layers.decode_norm, layers.set_decode_norm)`."""
    @pytest.fixture(autouse=True)
    def _interpreter_and_restored_setting(monkeypatch):
        use_interpreter(monkeypatch)
        prev = get()
        yield
        set_(prev)
    return _interpreter_and_restored_setting


def tiny_engine_tokens(select, impls, max_new: int):
    """Greedy drafted and AR decode of 3 prompts by a tiny Qwen3 (D = 64, grouped heads, q/k norms) on `DEV`,
    once per implementation: `select(impl)` switches it before each. Returns ({impl: [spec tokens, AR tokens]}
    (each a list per prompt), the accepted-draft counts of the drafted rows, the model)."""
    from orthrus_train.decode.engine import DecodeEngine
    from orthrus_train.model import OrthrusModel, build_random, tiny_config

    bb = build_random(tiny_config("qwen3", vocab_size=128, hidden_size=256, heads=4, kv_heads=2,
                                  initializer_range=0.2), seed=0)
    m = OrthrusModel(bb, block_size=4, vocab_len=120).to(DEV).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 120, (n,), generator=g).tolist() for n in (1, 7, 12)]
    eng = DecodeEngine(m, batch_size=3, max_len=40, verify_backend="torch")
    out, accepted = {}, []
    for impl in impls:
        select(impl)
        out[impl] = []
        for mode in ("spec", "ar"):
            rows = eng.generate(prompts, max_new, mode=mode).rows
            out[impl].append([r.tokens for r in rows])
            accepted += [a for r in rows for a in r.accepted] if mode == "spec" else []
    return out, accepted, m


def assert_auto_falls_back(monkeypatch, what: str, switch, select, resolve) -> None:
    """"auto" on a CUDA device whose Triton cannot compile or run a decode switch's kernels (a driver or compiler
    problem): the torch path with one warning, decided once per device, never a failed decode. `what` names the
    switch as the warning does ("norm", "rope"); `switch` is its `layers.DecodeSwitch` (`runs`: the per-device
    decision, `probe`: the probe); `select` / `resolve` its setter and `resolved_decode_*`."""
    dev = torch.device("cuda", 7)  # a key of the per-device decision; nothing runs on it
    monkeypatch.setattr(switch, "runs", {})

    def broken(*a, **k):
        raise RuntimeError("PTX compile failed\nsecond line")
    monkeypatch.setattr(switch, "probe", broken)
    select("auto")
    with pytest.warns(UserWarning, match=rf"decode {what} 'auto': .*cannot run on cuda:7 \(RuntimeError: PTX compile "
                                         rf"failed\); using the torch {what}"):
        assert resolve(dev) == "torch"
    assert switch.runs == {dev: False}
    monkeypatch.setattr(switch, "probe", lambda d: pytest.fail("probed twice"))
    assert resolve(dev) == "torch"  # decided once per device
