"""Distillation losses over the shared lm_head, chunked so full-vocabulary logits never exist for
all supervised positions at once; per-offset agreement metrics.

The torch path here is the reference; `orthrus_kernels.fused_linear_kl` is the fused Triton
replacement (same inputs, same per-token output), chosen with `loss.backend`.

Trick: the gradient w.r.t. the student hidden states is computed chunk by chunk during the forward
(it only needs the two softmaxes of that chunk) and stored, so backward is one multiply and the
logits are never kept. Memory: O(chunk x V) transient + O(T x H) for the stored gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ht, weight, targets, chunk_size: int, temperature: float, kind: str):
        T = hs.shape[0]
        loss = torch.empty(T, dtype=torch.float32, device=hs.device)
        s_arg = torch.empty(T, dtype=torch.long, device=hs.device)
        t_arg = torch.empty(T, dtype=torch.long, device=hs.device)
        grad = torch.empty_like(hs) if ctx.needs_input_grad[0] else None
        w = weight
        for s in range(0, T, chunk_size):
            e = min(T, s + chunk_size)
            ls = (hs[s:e] @ w.t()).float()
            s_arg[s:e] = ls.argmax(-1)
            if kind == "kl":
                lt = (ht[s:e] @ w.t()).float()
                t_arg[s:e] = lt.argmax(-1)
                logp_s = F.log_softmax(ls / temperature, -1)
                logp_t = F.log_softmax(lt / temperature, -1)
                p_t = logp_t.exp()
                loss[s:e] = (p_t * (logp_t - logp_s)).sum(-1)
                if grad is not None:
                    g = (logp_s.exp() - p_t) / temperature
            else:  # hard cross-entropy against targets (the teacher's argmax when none are given)
                tg = targets[s:e]
                t_arg[s:e] = tg
                logp_s = F.log_softmax(ls, -1)
                loss[s:e] = -logp_s.gather(1, tg[:, None]).squeeze(1)
                if grad is not None:
                    g = logp_s.exp()
                    g[torch.arange(e - s, device=g.device), tg] -= 1.0
            if grad is not None:
                grad[s:e] = (g.to(w.dtype) @ w).to(hs.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(s_arg, t_arg)
        return loss, s_arg, t_arg

    @staticmethod
    def backward(ctx, g_loss, _g_s, _g_t):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 7
        return (grad * g_loss[:, None].to(grad.dtype)), None, None, None, None, None, None


def chunked_distill(hs: torch.Tensor, ht: torch.Tensor | None, weight: torch.Tensor, *, kind: str = "kl",
                    targets: torch.Tensor | None = None, chunk_size: int = 1024, temperature: float = 1.0):
    """Per-token loss (T,) fp32 with autograd to `hs`, plus student and teacher argmax (T,).

    kind="kl": forward KL(p_teacher || p_student) at `temperature`. kind="ce": hard cross-entropy
    against `targets` (or the teacher's argmax when targets is None).
    """
    if kind not in ("kl", "ce"):
        raise ValueError(f"loss.kind must be 'kl' or 'ce', got {kind!r}")
    if kind == "ce" and targets is None:
        targets = teacher_argmax(ht, weight, chunk_size)
    if ht is None:
        ht = hs.detach()[:0]
    return _ChunkedLinearDistill.apply(hs, ht.detach(), weight.detach(), targets, chunk_size, temperature, kind)


@torch.no_grad()
def teacher_argmax(ht: torch.Tensor, weight: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    return torch.cat([(ht[s:s + chunk_size] @ weight.t()).argmax(-1) for s in range(0, ht.shape[0], chunk_size)])


def reference_kl(hs: torch.Tensor, ht: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Unchunked float64 reference: per-token KL(p_t || p_s)."""
    ls = (hs.double() @ weight.double().t()) / temperature
    lt = (ht.double() @ weight.double().t()) / temperature
    lp_s, lp_t = F.log_softmax(ls, -1), F.log_softmax(lt, -1)
    return (lp_t.exp() * (lp_t - lp_s)).sum(-1)


def per_offset_agreement(s_arg: torch.Tensor, t_arg: torch.Tensor, offset: torch.Tensor, n_offsets: int):
    """Share of supervised positions at each block offset where student argmax == teacher argmax,
    and the implied expected acceptance length 1 + sum_k prod_{j<=k} rate_j (the bonus token counts 1).

    Returns (rates (n_offsets,) with NaN where an offset had no positions, counts, expected_accept)."""
    hit = (s_arg == t_arg).float()
    counts = torch.bincount(offset, minlength=n_offsets).float()
    hits = torch.bincount(offset, weights=hit, minlength=n_offsets)
    rates = torch.where(counts > 0, hits / counts.clamp(min=1), torch.full_like(counts, float("nan")))
    r = torch.nan_to_num(rates, nan=0.0)
    expected = 1.0 + torch.cumprod(r, 0).sum()
    return rates, counts, float(expected)
