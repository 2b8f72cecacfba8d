"""Speculative verification: the acceptance rule (greedy / rejection sampling) and its front door.

This module is the one definition of *how drafts are accepted*. ``orthrus_kernels.verify`` is a
Triton transcription of :func:`verify_reference` for speed; tests require the two to agree token
for token on the same uniforms, and require the rule (via :func:`outcome_distribution`) to leave
the target distribution exactly unchanged. Change the rule here first, then the kernel.

Shapes and slots
----------------
``draft_tokens`` (B, K-1): ``d_0..d_{K-2}`` proposed after the committed token ``x_a``.
``target_logits`` (B, K, V): the verify pass over ``[x_a, d_0..d_{K-2}]``; slot ``i`` is the
target distribution of ``d_i`` and slot ``n`` (after ``n`` accepted drafts) gives the bonus.
``draft_logits`` (B, K-1, V): the distributions the drafts were sampled from (unused when the
draft was greedy, i.e. ``q_i`` is one-hot at ``d_i``, or when verifying greedily).
``n_valid`` (B,): drafts at slots ``>= n_valid`` are never accepted (ragged rows).
``uniforms`` (B, K) in [0, 1): ``u[:, i]`` decides slot ``i``; ``u[:, K-1]`` drives the single
final draw (residual after a rejection, or bonus). The caller owns the RNG, so results are
reproducible from a seed (see :func:`draw_uniforms`).

Sampling semantics (identical for draft and target, matching plain sampling in transformers)
-------------------------------------------------------------------------------------------
``x = logits * (1/temperature)`` (fp32 reciprocal, so kernel and reference agree bit for bit),
then top-k (``TopKLogitsWarper``: keep every token whose value is >= the k-th largest, ties at
the boundary kept), then top-p on the softmax of the top-k survivors (``TopPLogitsWarper``: sort
ascending, drop tokens whose ascending cumulative probability is ``<= 1 - top_p``, always keep
the most likely token), then min-p (``MinPLogitsWarper``: drop tokens whose probability is below
``min_p`` times the most likely one's, i.e. keep ``x >= max(x) + log(min_p)``; it never removes the
argmax, so its place in the chain does not matter). Filtering is expressed as one threshold per row
(keep ``x >= thr``),
which equals transformers' result except when tokens tie exactly at the top-p boundary: we keep
all of them, transformers keeps an arbitrary sort-dependent subset.
``temperature == 0`` means greedy: top-k/top-p/min-p are irrelevant (they never remove the argmax).

Rule
----
Greedy: accept the longest prefix with ``d_i == argmax p_i``; next token ``argmax p_m``.
Sampling: accept slot ``i`` iff ``u_i < a_i``, ``a_i = min(1, p_i(d_i)/q_i(d_i))`` (``a_i = 1``
if ``q_i(d_i) = 0 < p_i(d_i)``, 0 if both are 0). At the first rejection ``m`` draw from
``max(0, p_m - q_m)`` (from ``p_m`` if that residual is numerically empty); if all ``n`` valid
drafts are accepted draw the bonus from ``p_n``. A draw with uniform ``u`` takes the first index
whose cumulative weight exceeds ``u * total`` (inverse CDF), so it needs one uniform, not V.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "verify",
    "verify_reference",
    "greedy_accept",
    "outcome_distribution",
    "processed_logits",
    "filter_threshold",
    "filters_active",
    "acceptance_prob",
    "residual_weights",
    "inverse_cdf",
    "draw_uniforms",
    "is_greedy",
]


def is_greedy(temperature: Optional[float]) -> bool:
    return temperature is None or float(temperature) <= 0.0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def filter_threshold(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
                     ) -> Optional[torch.Tensor]:
    """Per-row threshold on temperature-scaled logits: top-k, top-p then min-p keep ``x >= thr``.

    Why a threshold: it is all a kernel needs to apply the filter while streaming the vocab,
    so the expensive sort happens once here and both backends share one definition.
    Returns ``None`` when nothing is filtered.
    """
    V = scaled.shape[-1]
    thr = None
    x = scaled
    if top_k and 0 < int(top_k) < V:
        thr = torch.topk(x, int(top_k), dim=-1).values[..., -1]
        x = torch.where(x >= thr[..., None], x, torch.full_like(x, float("-inf")))
    if top_p is not None and float(top_p) < 1.0:
        sorted_x = torch.sort(x, dim=-1).values  # ascending, as transformers' TopPLogitsWarper
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        n_remove = (cum <= 1.0 - float(top_p)).sum(dim=-1).clamp(max=V - 1)
        thr_p = sorted_x.gather(-1, n_remove[..., None]).squeeze(-1)
        thr = thr_p if thr is None else torch.maximum(thr, thr_p)
    if min_p and float(min_p) > 0.0:
        thr_m = scaled.max(dim=-1).values + math.log(float(min_p))
        thr = thr_m if thr is None else torch.maximum(thr, thr_m)
    return thr


def filters_active(V: int, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> bool:
    """Whether top-k / top-p / min-p remove anything at vocabulary size V."""
    return bool((top_k and 0 < int(top_k) < V) or (top_p is not None and float(top_p) < 1.0)
                or (min_p and float(min_p) > 0.0))


def processed_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0) -> torch.Tensor:
    """Scaled logits with filtered tokens at -inf, in fp32 (fp64 for fp64 input)."""
    scaled = logits.to(_compute_dtype(logits)) * (1.0 / float(temperature))
    thr = filter_threshold(scaled, top_k, top_p, min_p)
    if thr is None:
        return scaled
    return torch.where(scaled >= thr[..., None], scaled, torch.full_like(scaled, float("-inf")))


def acceptance_prob(p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """``min(1, p/q)``, with the q = 0 cases defined so ``P(u < a)`` stays a valid probability."""
    one = torch.ones((), dtype=p_d.dtype, device=p_d.device)
    zero = torch.zeros((), dtype=p_d.dtype, device=p_d.device)
    safe_q = torch.where(q_d > 0, q_d, one)
    return torch.where(q_d > 0, torch.clamp(p_d / safe_q, max=1.0), torch.where(p_d > 0, one, zero))


def residual_weights(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised ``max(0, p - q)``: the distribution to draw from after a rejection."""
    return torch.clamp(p - q, min=0.0)


def inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative weight exceeds ``u * total``; never a zero-weight index."""
    c = torch.cumsum(w, dim=-1)
    target = u.to(c.dtype) * c[..., -1]
    cnt = (c <= target[..., None]).sum(dim=-1)
    V = w.shape[-1]
    idx = torch.arange(V, device=w.device)
    last_pos = torch.where(w > 0, idx, torch.full_like(idx, -1)).max(dim=-1).values.clamp(min=0)
    return torch.where(cnt < V, cnt, last_pos)


def draw_uniforms(batch: int, K: int, generator: Optional[torch.Generator] = None,
                  device=None) -> torch.Tensor:
    """(B, K) uniforms for :func:`verify`; pass a seeded generator for reproducible decoding."""
    return torch.rand((batch, K), generator=generator, device=device, dtype=torch.float32)


def _prep(draft_tokens, draft_logits, target_logits, n_valid, uniforms, greedy, draft_is_greedy):
    if target_logits.dim() != 3:
        raise ValueError("target_logits must be (B, K, V)")
    B, K, V = target_logits.shape
    if tuple(draft_tokens.shape) != (B, K - 1):
        raise ValueError(f"draft_tokens must be (B, K-1) = {(B, K - 1)}, got {tuple(draft_tokens.shape)}")
    if not greedy and not draft_is_greedy:
        if draft_logits is None:
            raise ValueError("draft_logits are required for sampling unless draft_is_greedy=True")
        if tuple(draft_logits.shape) != (B, K - 1, V):
            raise ValueError(f"draft_logits must be (B, K-1, V) = {(B, K - 1, V)}")
    if not greedy:
        if uniforms is None or tuple(uniforms.shape) != (B, K):
            raise ValueError(f"uniforms must be (B, K) = {(B, K)}")
    dev = target_logits.device
    if n_valid is None:
        n = torch.full((B,), K - 1, device=dev, dtype=torch.long)
    else:
        n = n_valid.to(device=dev, dtype=torch.long).clamp(0, K - 1)
    return B, K, V, n


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b]] for x (B, K, ...)."""
    return x[torch.arange(x.shape[0], device=x.device), idx]


def greedy_accept(draft_tokens: torch.Tensor, target_ids: torch.Tensor, n_valid: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The greedy rule on the target's argmax tokens ``target_ids`` (B, K) (slot i: argmax of ``p_i``): accept the
    longest prefix with ``d_i == target_ids[:, i]``, next token ``target_ids[:, m]``. Returns ``(num_accepted,
    next_token)``, int64. The one definition of the greedy rule: :func:`verify_reference` calls it on the argmax of
    its logits; the engines' fused greedy LM head (``decode.lm_head``) computes the argmax without logits.
    ``n_valid`` (B,) (already clamped to 0..K-1) or None (every draft valid). Few ops: a decode step runs this."""
    K = target_ids.shape[1]
    if K == 1:
        return torch.zeros_like(target_ids[:, 0]), target_ids[:, 0]
    ok = draft_tokens.long() == target_ids[:, : K - 1]
    if n_valid is not None:
        ok &= torch.arange(K - 1, device=target_ids.device)[None, :] < n_valid[:, None]
    acc = ok.cumprod(dim=-1).sum(dim=-1)  # leading accepted drafts (int64)
    return acc, target_ids.gather(1, acc[:, None]).squeeze(1)


def verify_reference(
    draft_tokens: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    uniforms: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    n_valid: Optional[torch.Tensor] = None,
    draft_is_greedy: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch acceptance rule (see module docstring); no host synchronisation."""
    greedy = is_greedy(temperature)
    B, K, V, n = _prep(draft_tokens, draft_logits, target_logits, n_valid, uniforms, greedy,
                       draft_is_greedy)
    dev = target_logits.device

    if greedy:
        return greedy_accept(draft_tokens, target_logits.argmax(dim=-1), n if n_valid is not None else None)

    slots = torch.arange(K - 1, device=dev)
    valid = slots[None, :] < n[:, None]
    d = draft_tokens.long().clamp(0, V - 1)

    lp = processed_logits(target_logits, temperature, top_k, top_p, min_p)
    lse_p = torch.logsumexp(lp, dim=-1)
    p_d = torch.exp(lp[:, : K - 1].gather(-1, d[..., None]).squeeze(-1) - lse_p[:, : K - 1])
    if draft_is_greedy:
        q_d = torch.ones_like(p_d)
    else:
        lq = processed_logits(draft_logits, temperature, top_k, top_p, min_p)
        lse_q = torch.logsumexp(lq, dim=-1)
        q_d = torch.exp(lq.gather(-1, d[..., None]).squeeze(-1) - lse_q)
    a = acceptance_prob(p_d, q_d)
    u = uniforms.to(a.dtype)
    ok = (u[:, : K - 1] < a) & valid
    acc = ok.long().cumprod(dim=-1).sum(dim=-1)

    p_m = torch.exp(_rows(lp, acc) - _rows(lse_p, acc)[:, None])
    rejected = acc < n
    if K > 1:
        jq = acc.clamp(max=K - 2)
        if draft_is_greedy:
            q_m = torch.zeros_like(p_m).scatter_(1, _rows(d, jq)[:, None], 1.0)
        else:
            q_m = torch.exp(_rows(lq, jq) - _rows(lse_q, jq)[:, None])
        res = residual_weights(p_m, q_m)
        use_res = rejected & (torch.cumsum(res, dim=-1)[:, -1] > 0)
        w = torch.where(use_res[:, None], res, p_m)
    else:
        w = p_m
    return acc, inverse_cdf(w, u[:, K - 1])


def outcome_distribution(
    draft_tokens: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    n_valid: Optional[torch.Tensor] = None,
    draft_is_greedy: bool = False,
) -> torch.Tensor:
    """``P[b, m, v] = Pr(num_accepted = m, next_token = v)`` for fixed drafts, in float64.

    Why: the rule's exact output law (enumerating accept/reject branches), used to prove the
    rule preserves the target distribution and to compute expected acceptance length without
    sampling noise. Uses the same building blocks as :func:`verify_reference`.
    """
    greedy = is_greedy(temperature)
    dummy_u = None if greedy else torch.zeros(target_logits.shape[:2], device=target_logits.device)
    B, K, V, n = _prep(draft_tokens, draft_logits, target_logits, n_valid, dummy_u, greedy,
                       draft_is_greedy)
    dev = target_logits.device
    out = torch.zeros((B, K, V), dtype=torch.float64, device=dev)
    if greedy:
        acc, nxt = verify_reference(draft_tokens, draft_logits, target_logits, None,
                                    temperature=0.0, n_valid=n)
        out[torch.arange(B, device=dev), acc, nxt] = 1.0
        return out

    f64 = torch.float64
    p = torch.softmax(processed_logits(target_logits.to(f64), temperature, top_k, top_p, min_p), dim=-1)
    d = draft_tokens.long().clamp(0, V - 1)
    slots = torch.arange(K - 1, device=dev)
    valid = slots[None, :] < n[:, None]
    if draft_is_greedy:
        q = torch.zeros((B, K - 1, V), dtype=f64, device=dev).scatter_(2, d[..., None], 1.0)
    else:
        q = torch.softmax(processed_logits(draft_logits.to(f64), temperature, top_k, top_p, min_p), dim=-1)
    p_d = p[:, : K - 1].gather(-1, d[..., None]).squeeze(-1)
    q_d = q.gather(-1, d[..., None]).squeeze(-1)
    a = torch.where(valid, acceptance_prob(p_d, q_d), torch.zeros_like(p_d))
    reach = torch.cat([torch.ones((B, 1), dtype=f64, device=dev), torch.cumprod(a, dim=-1)], dim=1)
    a_ext = torch.cat([a, torch.zeros((B, 1), dtype=f64, device=dev)], dim=1)
    stop = reach * (1.0 - a_ext)  # (B, K): Pr(num_accepted = m)
    res = residual_weights(p[:, : K - 1], q)
    tot = res.sum(-1, keepdim=True)
    res_dist = torch.where(tot > 0, res / torch.where(tot > 0, tot, 1.0), p[:, : K - 1])
    dist = p.clone()
    m = torch.arange(K, device=dev)
    rej = (m[None, : K - 1] < n[:, None])[..., None]
    dist[:, : K - 1] = torch.where(rej, res_dist, p[:, : K - 1])
    out = stop[..., None] * dist
    return out


def verify(
    draft_tokens: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    uniforms: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    n_valid: Optional[torch.Tensor] = None,
    draft_is_greedy: bool = False,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Verify a batch of drafts: returns ``(num_accepted (B,) long, next_token (B,) long)``.

    Both outputs stay on the device (no host synchronisation), so the decode loop can queue the
    next step immediately. ``uniforms`` default: drawn from ``generator`` (or torch's global RNG).
    ``backend``: ``"triton"`` (``orthrus_kernels.verify``), ``"torch"`` (:func:`verify_reference`)
    or ``"auto"`` (Triton on CUDA / under ``TRITON_INTERPRET=1`` when importable).
    """
    greedy = is_greedy(temperature)
    if not greedy and uniforms is None:
        B, K = target_logits.shape[:2]
        uniforms = draw_uniforms(B, K, generator, target_logits.device)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, n_valid=n_valid,
              draft_is_greedy=draft_is_greedy)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend != "torch":
        try:
            from orthrus_kernels import verify as kverify
            from orthrus_kernels._backend import resolve_backend
        except ImportError:
            if backend == "triton":
                raise
            kverify = None
        if kverify is not None:
            tensors = [target_logits] + ([draft_logits] if draft_logits is not None else [])
            backend = resolve_backend(backend, *tensors, triton_dtypes=kverify.SUPPORTED_DTYPES)
        else:
            backend = "torch"
    if backend == "torch":
        return verify_reference(draft_tokens, draft_logits, target_logits, uniforms, **kw)

    B, K, V, n = _prep(draft_tokens, draft_logits, target_logits, n_valid, uniforms, greedy,
                       draft_is_greedy)
    thr_p = thr_q = None
    inv_t = 0.0
    if not greedy:
        inv_t = 1.0 / float(temperature)
        if filters_active(V, top_k, top_p, min_p):
            thr_p = filter_threshold(target_logits.float() * inv_t, top_k, top_p, min_p)
            if draft_logits is not None and not draft_is_greedy:
                thr_q = filter_threshold(draft_logits.float() * inv_t, top_k, top_p, min_p)
    return kverify.speculative_verify(
        draft_tokens, None if (greedy or draft_is_greedy) else draft_logits, target_logits,
        uniforms, n, inv_temperature=inv_t, greedy=greedy, draft_is_greedy=draft_is_greedy,
        thr_target=thr_p, thr_draft=thr_q,
    )
