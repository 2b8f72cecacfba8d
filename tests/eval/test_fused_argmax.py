"""fused_argmax: the engines' greedy paths take each position's argmax token from the fused greedy LM head
(orthrus_kernels.lm_head_argmax, through decode/lm_head.py) instead of the logits; the same tokens, the sampled
paths untouched, and the unfused path with the reason recorded wherever the kernel cannot run.

On a CPU the kernel runs in the Triton interpreter (tests/model/triton_testlib.py), float32 tiny models.
"""
import copy

import pytest
import torch

from eval_testlib import random_prompts
from orthrus_train.decode import verify
from orthrus_train.decode.engine import DecodeEngine, GenerationEngine, GenRequest, SamplingParams
from orthrus_train.model import MedusaModel, build_random, tiny_config

pytest.importorskip("orthrus_kernels")
from orthrus_kernels import lm_head_argmax as lha  # noqa: E402
from tests.model.triton_testlib import DEV, requires_triton, use_interpreter  # noqa: E402

pytestmark = requires_triton
SAMPLED = SamplingParams(temperature=1.0, top_k=20)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    use_interpreter(monkeypatch)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The token counts of every call of the kernel's front door (what the engines' fused paths run)."""
    calls, real = [], lha.lm_head_argmax

    def counting(hidden, weight, **kw):
        calls.append(tuple(hidden.shape[:-1]))
        return real(hidden, weight, **kw)
    monkeypatch.setattr(lha, "lm_head_argmax", counting)
    return calls


@pytest.fixture(scope="module")
def model(qwen3_model):
    return qwen3_model if DEV.type == "cpu" else copy.deepcopy(qwen3_model).to(DEV)


def built(calls, make):
    """make() with the kernel calls of its probe (at build time) left out of `calls`."""
    n = len(calls)
    eng = make()
    del calls[n:]
    return eng


def decode(m, fused: bool, modes=("spec", "ar"), sampling=None, calls=None, **kw):
    eng = built([] if calls is None else calls,
                lambda: DecodeEngine(m, batch_size=3, max_len=64, verify_backend="torch", fused_argmax=fused, **kw))
    assert eng.fused_argmax_active is fused and eng.fused_argmax_error is None
    prompts = random_prompts(3, (1, 12), seed=3)
    return [[(r.tokens, r.accepted) for r in eng.generate(prompts, 16, sampling, mode=mode).rows] for mode in modes]


def test_greedy_drafted_and_ar_tokens_equal_the_unfused_path(model, kernel_calls):
    """Greedy drafted and AR decoding: the same tokens and accepted drafts with the kernel as with the logits; the
    kernel took the drafts ((B, K-1) tokens), the verify ((B, K)) and the AR step ((B, 1))."""
    off = decode(model, False, calls=kernel_calls)
    assert not kernel_calls
    on = decode(model, True, calls=kernel_calls)
    assert on == off
    assert sum(a for rows in off[0] for a in rows[1]) > 0  # drafts were accepted: the rule's comparison mattered
    K = model.block_size
    assert {(3, K - 1), (3, K), (3, 1)} <= set(kernel_calls)


def test_fused_greedy_steps_compute_no_logits(model):
    """The LM-head GEMMs (matmuls reading the lm_head weight) of one greedy step: the unfused drafted step runs two
    (draft, verify) and the AR step one; with the kernel none (no logits are computed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    W = model.lm_weight().untyped_storage().data_ptr()

    class HeadGemms(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in ("aten::mm", "aten::bmm", "aten::addmm") and any(
                    isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == W for a in args):
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for fused in (False, True):
        eng = DecodeEngine(model, batch_size=2, max_len=32, verify_backend="torch", fused_argmax=fused)
        with torch.no_grad(), eng._fused():
            for mode in ("spec", "ar"):
                eng._mode, eng._sampling = mode, SamplingParams()
                eng._prefill([[1, 2, 3], [4, 5]], 10 ** 6, [0, 1], [])
                with HeadGemms() as log:
                    for f in ([eng._propose_step] if mode == "spec" else []) + [eng._verify_step]:
                        f()
                counts[fused, mode] = log.n
    assert counts == {(False, "spec"): 2, (False, "ar"): 1, (True, "spec"): 0, (True, "ar"): 0}


def test_sampled_paths_keep_the_logits_and_argmax_drafts_take_the_kernel(model, kernel_calls):
    """Sampling: the same tokens on or off and no kernel call; sampling with argmax drafts (draft_temperature=0):
    the drafts by the kernel, the verify on the logits (the rule needs p), the same tokens."""
    modes = ("spec", "ar")
    assert decode(model, True, modes, SAMPLED, kernel_calls) == decode(model, False, modes, SAMPLED)
    assert not kernel_calls
    argmax_drafts = SamplingParams(temperature=1.0, top_k=20, draft_temperature=0.0)
    assert decode(model, True, ("spec",), argmax_drafts, kernel_calls) == \
        decode(model, False, ("spec",), argmax_drafts)
    assert set(kernel_calls) == {(3, model.block_size - 1)}


def test_medusa_greedy_tokens_equal_the_unfused_path(kernel_calls):
    bb = build_random(tiny_config("llama", vocab_size=128, hidden_size=64, initializer_range=0.2), seed=2)
    m = MedusaModel(bb, block_size=3, vocab_len=120).eval().requires_grad_(False).to(DEV)
    assert decode(m, True, calls=kernel_calls) == decode(m, False)
    assert (3, 2) in kernel_calls  # Medusa's (B, K-1) stacked head states


def test_injected_verify_fn_reads_the_logits(model, kernel_calls):
    """A rule injected for a test sees the target logits as before (only the drafts take the kernel)."""
    seen = []

    def rule(drafts, dlog, target, u, **kw):
        seen.append(tuple(target.shape))
        return verify.verify(drafts, dlog, target, u, **kw)
    assert decode(model, True, ("spec",), calls=kernel_calls, verify_fn=rule) == decode(model, False, ("spec",))
    assert seen and all(s[:2] == (3, model.block_size) for s in seen)
    assert set(kernel_calls) == {(3, model.block_size - 1)}


def test_generation_engine_greedy_tokens_equal_the_unfused_path(model, kernel_calls):
    """GenerationEngine: a greedy stream takes its tokens from the kernel ((B, H) rows), the same tokens; a stream
    with a sampled setting keeps the logits (no kernel call), the same tokens on or off."""
    prompts = random_prompts(5, (1, 12), seed=4)
    reqs = [(i, p, i % 2) for i, p in enumerate(prompts)]
    out = {}
    for fused in (False, True):
        gen = built(kernel_calls, lambda: GenerationEngine(model.backbone, batch_size=2, max_len=64,
                                                           use_cuda_graphs=False, sync_every=4, fused_argmax=fused))
        assert gen.fused_argmax_active is fused and gen.fused_argmax_error is None
        greedy = gen.generate(prompts, 12)
        n = len(kernel_calls)
        mixed = dict(gen.generate_stream([GenRequest(k, p, seed=k, setting=s) for k, p, s in reqs], 12,
                                         (SamplingParams(), SAMPLED)))
        assert len(kernel_calls) == n  # a sampled setting in the stream: the logits
        out[fused] = greedy, mixed
    assert out[True] == out[False]
    assert set(kernel_calls) == {(2,)}


def _with_bias(m):
    """A copy of m whose lm_head has a (nonzero) bias."""
    m = copy.deepcopy(m)
    head = m.backbone.lm_head
    head.bias = torch.nn.Parameter(torch.linspace(-0.1, 0.1, head.out_features, device=head.weight.device),
                                   requires_grad=False)
    return m


def test_falls_back_to_the_logits_with_the_reason(model, monkeypatch, kernel_calls):
    """Where the kernel cannot run the engines warn, record why (`fused_argmax_error`) and decode from the logits,
    the same tokens as with fused_argmax off: a biased lm_head, a probe that fails (a kernel that picks wrong
    tokens), no usable Triton (the interpreter's variable unset on a CPU)."""
    biased = _with_bias(model)
    with pytest.warns(UserWarning, match=r"fused_argmax: the fused greedy LM head cannot run here \(the lm_head has "
                                         r"a bias .*\); using the LM head's logits and argmax"):
        eng = DecodeEngine(biased, batch_size=3, max_len=64, verify_backend="torch", fused_argmax=True)
    assert not eng.fused_argmax_active and "bias" in eng.fused_argmax_error
    prompts = random_prompts(3, (1, 12), seed=3)
    ref = DecodeEngine(biased, batch_size=3, max_len=64, verify_backend="torch")
    for mode in ("spec", "ar"):
        assert [r.tokens for r in eng.generate(prompts, 12, mode=mode).rows] == \
            [r.tokens for r in ref.generate(prompts, 12, mode=mode).rows]
    assert not kernel_calls

    monkeypatch.setattr(lha, "lm_head_argmax", lambda h, w, **kw: torch.zeros(h.shape[:-1], dtype=torch.long,
                                                                               device=h.device))
    for build in (lambda: DecodeEngine(model, batch_size=3, max_len=64, fused_argmax=True),
                  lambda: GenerationEngine(model.backbone, 2, 64, use_cuda_graphs=False, fused_argmax=True)):
        with pytest.warns(UserWarning, match=r"\(its probe failed \(RuntimeError: the kernel's argmax is not a "
                                             r"maximum of the logits on \d+ of \d+ tokens"):
            eng = build()
        assert not eng.fused_argmax_active and eng.fused_argmax_error.startswith("its probe failed")

    if DEV.type == "cpu":
        monkeypatch.undo()
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.warns(UserWarning, match="TRITON_INTERPRET is not set now"):
            eng = DecodeEngine(model, batch_size=3, max_len=64, verify_backend="torch", fused_argmax=True)
        assert not eng.fused_argmax_active
        assert [r.tokens for r in eng.generate(prompts, 12).rows] == \
            [r.tokens for r in DecodeEngine(model, batch_size=3, max_len=64).generate(prompts, 12).rows]
