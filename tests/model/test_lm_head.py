"""The draft pass's LM head runs as one GEMM over (B*(K-1), H) rows, reading the weight once.

`F.linear` on the draft pass's strided (B, K-1, H) slice dispatched to `bmm` with the lm_head weight expanded over
the batch (stride 0): on an H200 (SmolLM2 shape, batch 16, K = 16) that re-read the 56 MB weight per batch row,
172 us. `DraftModel.logits` flattens the rows first. Checked here on the CPU through the aten ops a drafted engine
step dispatches (a TorchDispatchMode log, as `decode/opcount.py` counts them).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from orthrus_train.decode import opcount
from orthrus_train.decode.engine import DecodeEngine, SamplingParams
from orthrus_train.model import MedusaModel, build_random, tiny_config
from orthrus_train.model.orthrus import DecodeState

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "_addmm_activation"}


class MatmulLog(TorchDispatchMode):
    """Every matmul-like aten op: (name, [(shape, stride) of each tensor argument])."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = opcount.op_name(func)
        if name in MATMULS:
            self.calls.append((name, [(tuple(a.shape), a.stride()) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def expanded(calls):
    """The calls with a matrix operand expanded over a dimension (stride 0 where the size is > 1, and two more
    dimensions over 1): a weight re-read per batch row. Not a vector's outer product (transformers 5.17's rotary
    embedding runs `inv_freq[None, :, None].expand(B, -1, 1) @ positions`: (B, 8, 1) at stride (0, 1, 1))."""
    def weight_expanded(shape, stride):
        return (any(st == 0 and sz > 1 for sz, st in zip(shape, stride))
                and sum(sz > 1 for sz, st in zip(shape, stride) if st != 0) >= 2)
    return [c for c in calls if any(weight_expanded(shape, stride) for shape, stride in c[1])]


def step_matmuls(eng, prompts, sampling: SamplingParams):
    with torch.no_grad(), eng._fused():
        eng._mode, eng._sampling = "spec", sampling
        eng._prefill(prompts, 10 ** 6, list(range(len(prompts))), [])
        with MatmulLog() as log:
            eng._propose_step()
            eng._verify_step()
    return log.calls


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, top_k=50)],
                         ids=["greedy", "sampled"])
def test_no_matmul_of_a_drafted_step_reads_an_expanded_weight(sampling):
    """A drafted step (propose + verify) of a SmolLM2-shaped engine (reduced width, 1 layer) at batch 16, K = 16:
    every matmul reads its operands as they are stored; the two LM heads are one mm each over all the step's
    tokens ((B*(K-1)) and (B*K) rows)."""
    B, K = 16, 16
    eng, prompts = opcount.build_engine("smollm2-135m", B, K, reduced=True, layers=1, prompt_len=8, slots=48)
    calls = step_matmuls(eng, prompts, sampling)
    assert not expanded(calls), f"matmuls over an expanded (stride-0) operand: {expanded(calls)}"
    V, H = eng.model.lm_weight().shape
    heads = [c for c in calls if c[1][-1][0] == (H, V)]  # mm(hidden rows, weight.T)
    assert [(c[0], c[1][0][0]) for c in heads] == [("mm", (B * (K - 1), H)), ("mm", (B * K, H))]


def test_medusa_draft_lm_head_reads_the_weight_once():
    bb = build_random(tiny_config("llama", vocab_size=128, layers=1), seed=0)
    m = MedusaModel(bb, block_size=4, vocab_len=120).eval()
    eng = DecodeEngine(m, batch_size=3, max_len=32, verify_backend="torch")
    calls = step_matmuls(eng, [[1, 2, 3], [4, 5], [6, 7, 8, 9]], SamplingParams())
    assert not expanded(calls), f"matmuls over an expanded (stride-0) operand: {expanded(calls)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_logits_keep_their_values(dtype):
    """The flattened GEMM gives the values the strided `F.linear` (the bmm) gave, bit for bit, for the profiled
    step (batch 16, K = 16) at the reduced width on this CPU. Not a law: a BLAS may block the one GEMM differently
    from its batched ones (measured here: float32 at batch 3, K = 4, and SmolLM2's full width 576 differ by an
    ulp), hence only allclose for another slice; any leading shape keeps its shape."""
    eng, prompts = opcount.build_engine("smollm2-135m", 16, 16, reduced=True, layers=1, prompt_len=8, slots=48,
                                        dtype=dtype)
    m, st = eng.model, eng._st
    W = m.lm_weight()
    with torch.no_grad(), eng._fused():
        eng._prefill(prompts, 10 ** 6, list(range(len(prompts))), [])
        state = DecodeState(st.cache, st.last_token, st.last_hidden)
        h = m.propose_hidden(state)
        assert not h.is_contiguous() and h.shape == (16, 15, m.config.hidden_size)
        assert torch.equal(m.propose(state), F.linear(h, W))
        assert m.logits(h[0, 0]).shape == (W.shape[0],)
        torch.testing.assert_close(m.logits(h[:3, :2]), F.linear(h[:3, :2], W))


def test_expanded_names_a_weight_read_per_row_and_not_an_outer_product():
    """The filter the tests above rest on: the draft LM head's old bmm (the (V, H) weight expanded over 16 batch
    rows) is named; the rotary embedding's (B, 8, 1) frequency vector expanded over B is not."""
    weight = ("bmm", [((16, 15, 576), (8640, 576, 1)), ((16, 576, 49152), (0, 1, 576))])
    rotary = ("bmm", [((3, 8, 1), (0, 1, 1)), ((3, 1, 4), (4, 4, 1))])
    assert expanded([weight, rotary]) == [weight]
