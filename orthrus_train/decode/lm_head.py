"""The engines' fused greedy LM head (`fused_argmax`): each position's argmax token straight from the final hidden
states, by one Triton kernel (`orthrus_kernels.lm_head_argmax`), instead of the LM head's logits and an argmax
over them.

The greedy decode paths need only that argmax: greedy drafts (`SamplingParams.greedy_drafts`), the greedy verify
(temperature 0: the rule compares each draft with the target's argmax, `verify.greedy_accept`), the AR greedy step
and `GenerationEngine`'s greedy rows. The sampled paths keep the logits (they need the distributions).

`resolve_fused_argmax(model, blocks)` decides, when an engine is built (outside compiled or captured steps),
whether the kernel can run for that model on its device: the lm_head is a plain `nn.Linear` without bias, Triton
runs there (CUDA, or kernels built for the interpreter with TRITON_INTERPRET set), the dtype is one the kernel
supports, and a probe (the kernel compiled and run at the engine's own token counts and layouts on the model's
own weight, its picks checked against the unfused logits) passes. Otherwise it returns the reason, the engine
warns once and keeps the unfused path (`fused_argmax_error`): an optional speed switch never fails a decode.

Measured: token-identical to the unfused path in the CPU tests (the Triton interpreter, float32; tests/eval/
test_fused_argmax.py). NOT yet run or timed on a GPU, hence off by default (`DecodeEngine(fused_argmax=...)`,
`eval.fused_argmax`, `data.fused_argmax`); `scripts/profile_decode_step.py --fused-argmax off on` times it.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import exc_line

ArgmaxFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _fused_ids(kernels) -> ArgmaxFn:
    """ids = argmax(hidden @ weight.T) by the kernel; while Dynamo traces a compiled step, by the opaque custom op
    `torch.ops.orthrus.lm_head_argmax` (no Python of the front door traced)."""
    def ids(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.orthrus.lm_head_argmax(hidden, weight)
        return kernels.lm_head_argmax(hidden, weight)
    return ids


def _probe(ids: ArgmaxFn, weight: torch.Tensor, blocks: Sequence[tuple[int, int, int]]) -> None:
    """The kernel run on `weight` for random hidden states of every layout in `blocks` ((rows, T, T allocated):
    hidden = randn(rows, T allocated, H)[:, :T], as the engine's passes hand them over), each pick checked against
    the unfused logits: the picked logit must be a maximum up to a rounding-level tolerance (the kernel sums over
    H in its own order; exactness is the unit tests' job, this catches a kernel that fails to compile, launch or
    index on this device). Raises on a failure."""
    g = torch.Generator().manual_seed(0)
    H = weight.shape[1]
    for rows, T, alloc in blocks:
        h = torch.randn(rows, alloc, H, generator=g).to(weight.device, weight.dtype)[:, :T]
        got = ids(h, weight)
        if got.shape != (rows, T) or got.dtype != torch.long:
            raise RuntimeError(f"the kernel returned {got.dtype} {tuple(got.shape)} for ({rows}, {T}) tokens")
        ref = F.linear(h, weight).float()
        top = ref.amax(-1)
        picked = ref.gather(-1, got.clamp(0, weight.shape[0] - 1)[..., None])[..., 0]
        tol = 1e-2 * (top - ref.mean(-1)).abs() + 1e-6
        bad = int(((picked < top - tol) | (got < 0) | (got >= weight.shape[0])).sum())
        if bad:
            raise RuntimeError(f"the kernel's argmax is not a maximum of the logits on {bad} of {rows * T} "
                               f"tokens ({rows} x {T})")
    if weight.is_cuda:
        torch.cuda.synchronize(weight.device)


def resolve_fused_argmax(model, blocks: Sequence[tuple[int, int, int]]) -> tuple[ArgmaxFn | None, str | None]:
    """(ids(hidden, weight), None) where the fused greedy LM head runs for `model` (a DraftModel) on its device,
    else (None, why not: one line). blocks: the (rows, T, T allocated) layouts of the hidden states the engine
    will hand over (each probed, which also compiles the kernel for it)."""
    head = model.backbone.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None, f"the lm_head is a {type(head).__name__}, not a torch.nn.Linear"
    if head.bias is not None:
        return None, "the lm_head has a bias (the kernel computes hidden @ weight.T only)"
    w = head.weight
    try:
        from orthrus_kernels._backend import triton_unusable_reason
        kernels = importlib.import_module("orthrus_kernels.lm_head_argmax")
    except ImportError as e:  # a checkout on PYTHONPATH without the install that maps kernels/ to orthrus_kernels
        return None, f"orthrus_kernels is not importable ({exc_line(e, 200)}; install the project: pip install -e .)"
    reason = triton_unusable_reason(w)
    if reason is not None:
        return None, reason
    if w.dtype not in kernels.SUPPORTED_DTYPES:
        return None, f"the kernel supports {kernels.SUPPORTED_DTYPES}, the lm_head is {w.dtype}"
    ids = _fused_ids(kernels)
    try:
        with torch.no_grad():
            _probe(ids, w, blocks)
    except Exception as e:  # noqa: BLE001 - any failure of the optional kernel: the unfused path
        return None, f"its probe failed ({exc_line(e, 200)})"
    return ids, None

