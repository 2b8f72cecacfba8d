"""Fused lm_head + distillation loss (forward KL or hard CE) without materialising (T, V) logits.

Why: at Qwen3 scale (V = 151936) the per-token logits of student *and* teacher for 31*256 tokens
are ~9.6 GB in fp32, which dominates the memory of an Orthrus training step whose trainable part
(the ``*_diff`` twins) is tiny. These kernels stream the vocabulary instead.

Design (Triton backend)
-----------------------
* **Stats pass** (``_stats_kernel``): grid = (token blocks, vocab splits). Each program builds
  logit tiles ``hs_tile @ W_tile^T`` with ``tl.dot`` (looping over H), and keeps an online
  (streaming) log-sum-exp for the student and the teacher, plus the running
  ``sum_v exp(t_v - m_t) * (t_v - s_v)``. Splitting the vocabulary over programs keeps the GPU
  busy when there are few tokens; the per-split partials (a few floats per token) are merged in
  torch. ``KL = sum_v p_t (t - s) - lse_t + lse_s``.
* **Gradient pass** (``_grad_logits_kernel``; inside forward by default, see ``precompute_grad``):
  for a chunk of tokens, recompute the logit tiles with ``tl.dot``, write
  ``dlogits = g * (softmax(s) - softmax(t)) / T`` tile by tile into a (chunk, V) buffer in the
  weight dtype, then one cuBLAS ``dlogits @ W`` gives ``d hs``.
  Writing and re-reading the chunk buffers costs ~2*T*V*2 bytes of traffic (~1.5 ms on H100); the alternative of accumulating
  ``dlogits @ W`` in-kernel needs either a (BLOCK_T, H) register accumulator (does not fit for
  H = 4096) or ~T*H*V/BLOCK_V global atomics (slower than the buffer round trip).
  The buffer size is bounded by ``chunk_size`` (default: ~256 MB).

So one step costs 5 logit-sized matmuls (2 stats, 2 recompute, 1 for ``d hs``) instead of the 3
of the naive path; that is the price of never holding the logits. Student/teacher argmax (for
agreement metrics) come out of the stats pass for free (``return_argmax=True``).
Logits are ``cast(hs, W.dtype) @ W^T`` with fp32 accumulation (IEEE fp32 dots for fp32 weights).

Conventions
-----------
* The loss is per token, float32 (float64 in, float64 out, for reference checks); the caller
  reduces (mean over valid tokens, etc.).
* ``temperature`` divides both student and teacher logits; the KL is *not* multiplied by
  ``temperature**2`` (do it in the caller if you want Hinton's gradient scale).
* Only ``hs`` receives a gradient; teacher states and the lm_head weight are treated as
  constants (frozen backbone).
* ``token_weight`` (T,) multiplies the per-token loss and its gradient; tokens with weight 0
  return exactly 0 and a zero gradient even if their hidden states are not finite (padding).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from orthrus_kernels._backend import HAS_TRITON, interpreting, resolve_backend, sm_count

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "fused_linear_kl",
    "fused_linear_ce",
    "chunked_linear_kl_reference",
    "chunked_linear_ce_reference",
]

_MODE_KL = 0
_MODE_CE = 1
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bound on the (chunk, V) gradient buffer of the backward pass.
_GRAD_BUFFER_BYTES = 256 * 2**20
_AUTOTUNE = False


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _logit_tiles(
        hs_ptr, ht_ptr, w_ptr, rows, row_ok, cols, col_ok, H,
        stride_hs_t, stride_hs_h, stride_ht_t, stride_ht_h, stride_w_v, stride_w_h,
        TEACHER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # Student (and teacher) logit tiles (BLOCK_T, BLOCK_V) in fp32, reduced over H.
        # DOT_F32 (interpreter runs only; GPU runs use tl.dot) upcasts the operands (exact for
        # bf16/fp16 products: the interpreter computes bf16 tl.dot wrongly) and reduces with an
        # elementwise product + tl.sum instead of tl.dot. The interpreter's tl.dot is the host
        # BLAS sgemm, whose rounding depends on a column's position in the tile (OpenBLAS 0.3.31,
        # numpy 2.4: two identical weight rows gave logits 1 ulp apart), so exact ties were not
        # ties and the argmax depended on the BLAS build; a sum over H rounds every column alike.
        s = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        t = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        # int64 row offsets: V * H exceeds 2**31 for large vocabularies / hidden sizes.
        w_rows = cols.to(tl.int64)[None, :] * stride_w_v
        hs_rows = rows.to(tl.int64)[:, None] * stride_hs_t
        ht_rows = rows.to(tl.int64)[:, None] * stride_ht_t
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            # W^T tile loaded directly as (BLOCK_H, BLOCK_V): no transpose in registers.
            w = tl.load(
                w_ptr + w_rows + ks[:, None] * stride_w_h,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            a = tl.load(
                hs_ptr + hs_rows + ks[None, :] * stride_hs_h,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(w.dtype)
            if DOT_F32:
                w = w.to(tl.float32)
                a = a.to(tl.float32)
            s = _tile_dot(a, w, s, PRECISION, DOT_F32)
            if TEACHER:
                b = tl.load(
                    ht_ptr + ht_rows + ks[None, :] * stride_ht_h,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(w.dtype)
                t = _tile_dot(b, w, t, PRECISION, DOT_F32)
        return s, t

    @triton.jit
    def _tile_dot(a, w, acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
        # acc + a @ w; see _logit_tiles for why the interpreter path does not call tl.dot.
        if DOT_F32:
            out = acc + tl.sum(a[:, :, None] * w[None, :, :], axis=1)
        else:
            out = tl.dot(a, w, acc, input_precision=PRECISION)
        return out

    @triton.jit
    def _first_argmax(x, m, cols, NONE):
        # Per row of the tile x (BLOCK_T, BLOCK_V): the smallest column whose value equals the
        # row's maximum m, i.e. torch.argmax's first maximum, written out rather than taken
        # from tl.argmax so that it does not depend on a Triton version's tie rule.
        return tl.min(tl.where(x == m[:, None], cols[None, :], NONE), axis=1)

    @triton.jit
    def _stats_kernel(
        hs_ptr, ht_ptr, w_ptr, tgt_ptr,
        ms_ptr, ls_ptr, mt_ptr, lt_ptr, acc_ptr, sarg_ptr, targ_ptr,
        T, V, H, split_cols,
        stride_hs_t, stride_hs_h, stride_ht_t, stride_ht_h, stride_w_v, stride_w_h,
        inv_temp,
        MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
        ARGMAX: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        v_start = pid_s * split_cols
        v_end = tl.minimum(v_start + split_cols, V)
        TEACHER: tl.constexpr = MODE == 0

        m_s = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        l_s = tl.zeros([BLOCK_T], dtype=tl.float32)
        m_t = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        l_t = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        # Argmax rides along for the per-offset agreement metrics (saves two logit matmuls).
        a_s = tl.zeros([BLOCK_T], dtype=tl.int32)
        a_t = tl.zeros([BLOCK_T], dtype=tl.int32)
        if TEACHER:
            tgt = rows  # unused: KL mode passes no targets
        else:
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)

        # Every tile holds at least one column < v_end, so running maxima are finite after
        # the first tile and exp(m_old - m_new) never sees (-inf) - (-inf).
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            s, t = _logit_tiles(
                hs_ptr, ht_ptr, w_ptr, rows, row_ok, cols, col_ok, H,
                stride_hs_t, stride_hs_h, stride_ht_t, stride_ht_h, stride_w_v, stride_w_h,
                TEACHER, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, DOT_F32,
            )
            s = s * inv_temp
            if TEACHER:
                t = t * inv_temp
                diff = tl.where(col_ok[None, :], t - s, 0.0)  # before masking: no inf - inf
            s = tl.where(col_ok[None, :], s, float("-inf"))
            s_max = tl.max(s, axis=1)
            if ARGMAX:  # first maximum of the tile; strict '>' keeps an earlier tile's on ties
                a_s = tl.where(s_max > m_s, _first_argmax(s, s_max, cols, V), a_s)
            m_new = tl.maximum(m_s, s_max)
            l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_s = m_new
            if TEACHER:
                t = tl.where(col_ok[None, :], t, float("-inf"))
                t_max = tl.max(t, axis=1)
                if ARGMAX:
                    a_t = tl.where(t_max > m_t, _first_argmax(t, t_max, cols, V), a_t)
                mt_new = tl.maximum(m_t, t_max)
                alpha = tl.exp(m_t - mt_new)
                e = tl.exp(t - mt_new[:, None])
                acc = acc * alpha + tl.sum(e * diff, axis=1)
                l_t = l_t * alpha + tl.sum(e, axis=1)
                m_t = mt_new
            else:
                hit = cols[None, :] == tgt[:, None]
                acc += tl.sum(tl.where(hit, s, 0.0), axis=1)

        out = pid_s * T + rows
        tl.store(ms_ptr + out, m_s, mask=row_ok)
        tl.store(ls_ptr + out, l_s, mask=row_ok)
        tl.store(acc_ptr + out, acc, mask=row_ok)
        if ARGMAX:
            tl.store(sarg_ptr + out, a_s, mask=row_ok)
            if TEACHER:
                tl.store(targ_ptr + out, a_t, mask=row_ok)
        if TEACHER:
            tl.store(mt_ptr + out, m_t, mask=row_ok)
            tl.store(lt_ptr + out, l_t, mask=row_ok)

    @triton.jit
    def _grad_logits_kernel(
        hs_ptr, ht_ptr, w_ptr, tgt_ptr, lse_s_ptr, lse_t_ptr, gscale_ptr, g_ptr,
        T, V, H,
        stride_hs_t, stride_hs_h, stride_ht_t, stride_ht_h, stride_w_v, stride_w_h, stride_g_t,
        inv_temp,
        MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        TEACHER: tl.constexpr = MODE == 0

        s, t = _logit_tiles(
            hs_ptr, ht_ptr, w_ptr, rows, row_ok, cols, col_ok, H,
            stride_hs_t, stride_hs_h, stride_ht_t, stride_ht_h, stride_w_v, stride_w_h,
            TEACHER, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, DOT_F32,
        )
        lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
        g = tl.exp(s * inv_temp - lse_s[:, None])
        if TEACHER:
            lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
            g = g - tl.exp(t * inv_temp - lse_t[:, None])
        else:
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
            g = g - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        # gscale = grad_output * token_weight / temperature, exactly 0 on padding / ignored
        # rows: `where` (not a product) keeps NaN hidden states of padding out of d hs.
        gs = tl.load(gscale_ptr + rows, mask=row_ok, other=0.0)
        g = tl.where(gs[:, None] != 0.0, g * gs[:, None], 0.0)
        tl.store(
            g_ptr + rows.to(tl.int64)[:, None] * stride_g_t + cols[None, :],
            g.to(g_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )

    def _configs():
        c = triton.Config
        return [
            c({"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
            c({"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
            c({"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=4, num_stages=4),
        ]

    # Autotuning runs every config once per new (V, H, MODE, dtype): worth it on a GPU, pure
    # waste (and minutes) in the interpreter, where fixed small tiles are used instead.
    _AUTOTUNE = (not interpreting()) and os.environ.get("ORTHRUS_KERNELS_AUTOTUNE", "1") != "0"
    if _AUTOTUNE:
        _stats_launch = triton.autotune(_configs(), key=["V", "H", "MODE", "ARGMAX"])(_stats_kernel)
        _grad_launch = triton.autotune(_configs(), key=["V", "H", "MODE"])(_grad_logits_kernel)
    else:
        _stats_launch = _stats_kernel
        _grad_launch = _grad_logits_kernel


def _fixed_meta():
    """Tile sizes used when not autotuning (interpreter: small, so tests stay fast)."""
    if interpreting():
        return dict(BLOCK_T=16, BLOCK_V=64, BLOCK_H=32)
    return dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)


def _precision(weight: torch.Tensor) -> str:
    # fp32 weights mean the caller wants fp32 logits; TF32 would give ~1e-3 relative error.
    return "ieee" if weight.dtype == torch.float32 else "tf32"


def _triton_stats(hs, ht, weight, targets, inv_temp, mode, want_argmax):
    T, H = hs.shape
    V = weight.shape[0]
    dev = hs.device
    # Split the vocabulary so that (token blocks x splits) fills the GPU ~4x over. The split
    # width does not depend on the tile config, so autotuning cannot change buffer shapes.
    t_blocks = max(1, math.ceil(T / 64))
    want_splits = max(1, math.ceil(4 * sm_count(dev) / t_blocks))
    split_cols = max(256, math.ceil(math.ceil(V / want_splits) / 256) * 256)
    if interpreting():
        split_cols = max(64, math.ceil(V / 2 / 64) * 64)  # exercise >1 split in tests
    n_split = math.ceil(V / split_cols)

    f32 = dict(device=dev, dtype=torch.float32)
    ms = torch.empty((n_split, T), **f32)
    ls = torch.empty((n_split, T), **f32)
    acc = torch.empty((n_split, T), **f32)
    teacher = mode == _MODE_KL
    mt = torch.empty((n_split, T), **f32) if teacher else ms
    lt = torch.empty((n_split, T), **f32) if teacher else ls
    ht_ = ht if teacher else hs
    tgt = targets if targets is not None else torch.empty(1, device=dev, dtype=torch.int64)
    i32 = dict(device=dev, dtype=torch.int32)
    sarg = torch.empty((n_split, T), **i32) if want_argmax else tgt
    targ = torch.empty((n_split, T), **i32) if (want_argmax and teacher) else sarg

    args = (
        hs, ht_, weight, tgt, ms, ls, mt, lt, acc, sarg, targ, T, V, H, split_cols,
        hs.stride(0), hs.stride(1), ht_.stride(0), ht_.stride(1),
        weight.stride(0), weight.stride(1), inv_temp,
    )
    if _AUTOTUNE:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), n_split)  # noqa: E731
        _stats_launch[grid](*args, MODE=mode, PRECISION=_precision(weight), DOT_F32=False,
                            ARGMAX=want_argmax)
    else:
        meta = _fixed_meta()
        grid = (triton.cdiv(T, meta["BLOCK_T"]), n_split)
        _stats_launch[grid](*args, MODE=mode, PRECISION=_precision(weight), DOT_F32=interpreting(),
                            ARGMAX=want_argmax, **meta)

    # Merge the per-split streaming statistics (n_split x T floats: negligible).
    m = ms.amax(0)
    lse_s = m + torch.log((ls * torch.exp(ms - m)).sum(0))
    s_arg = t_arg = None
    if want_argmax:
        s_arg = _first_max_over_splits(ms, sarg, m)
    if teacher:
        mtm = mt.amax(0)
        scale = torch.exp(mt - mtm)
        l_t = (lt * scale).sum(0)
        lse_t = mtm + torch.log(l_t)
        loss = (acc * scale).sum(0) / l_t - lse_t + lse_s
        if want_argmax:
            t_arg = _first_max_over_splits(mt, targ, mtm)
        return loss, lse_s, lse_t, s_arg, t_arg
    return lse_s - acc.sum(0), lse_s, None, s_arg, None


def _first_max_over_splits(split_max, split_arg, m):
    """Global argmax from per-split (max, first argmax): the smallest index among the splits that
    reach the global max m. Splits cover increasing column ranges, so this is torch.argmax's first
    maximum, whichever split a tie-blind max(0) would have picked."""
    none = torch.iinfo(split_arg.dtype).max
    return torch.where(split_max == m, split_arg, none).amin(0).long()


def _triton_grad(hs, ht, weight, targets, lse_s, lse_t, gscale, inv_temp, mode, chunk_size):
    T, H = hs.shape
    V = weight.shape[0]
    teacher = mode == _MODE_KL
    if chunk_size is None:
        chunk_size = max(64, (_GRAD_BUFFER_BYTES // (V * weight.element_size())) // 64 * 64)
    chunk = min(T, chunk_size)
    gbuf = torch.empty((chunk, V), device=hs.device, dtype=weight.dtype)
    dhs = torch.empty_like(hs)
    prec = _precision(weight)
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        n = c1 - c0
        hs_c = hs[c0:c1]
        ht_c = ht[c0:c1] if teacher else hs_c
        tgt_c = targets[c0:c1] if targets is not None else gscale  # placeholder, unused in KL
        lse_t_c = lse_t[c0:c1] if teacher else lse_s[c0:c1]
        g_c = gbuf[:n]
        args = (
            hs_c, ht_c, weight, tgt_c, lse_s[c0:c1], lse_t_c, gscale[c0:c1], g_c, n, V, H,
            hs_c.stride(0), hs_c.stride(1), ht_c.stride(0), ht_c.stride(1),
            weight.stride(0), weight.stride(1), g_c.stride(0), inv_temp,
        )
        if _AUTOTUNE:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_T"]), triton.cdiv(V, meta["BLOCK_V"]))  # noqa: E731
            _grad_launch[grid](*args, MODE=mode, PRECISION=prec, DOT_F32=False)
        else:
            meta = _fixed_meta()
            grid = (triton.cdiv(n, meta["BLOCK_T"]), triton.cdiv(V, meta["BLOCK_V"]))
            _grad_launch[grid](*args, MODE=mode, PRECISION=prec, DOT_F32=interpreting(), **meta)
        dhs[c0:c1] = torch.mm(g_c, weight).to(hs.dtype)
    return dhs


# --------------------------------------------------------------------------------------------
# Torch backend (CPU / no Triton): same math, token-chunked, logits in >= fp32
# --------------------------------------------------------------------------------------------
def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _torch_chunks(T: int, chunk_size: Optional[int], V: int):
    if chunk_size is None:
        chunk_size = max(16, _GRAD_BUFFER_BYTES // (4 * max(V, 1)))
    for c0 in range(0, T, chunk_size):
        yield c0, min(T, c0 + chunk_size)


def _torch_stats(hs, ht, weight, targets, inv_temp, mode, chunk_size, want_argmax):
    cd = _compute_dtype(weight)
    w = weight.to(cd)
    T, V = hs.shape[0], weight.shape[0]
    loss = torch.empty(T, device=hs.device, dtype=cd)
    lse_s = torch.empty_like(loss)
    kl = mode == _MODE_KL
    lse_t = torch.empty_like(loss) if kl else None
    s_arg = torch.empty(T, device=hs.device, dtype=torch.long) if want_argmax else None
    t_arg = torch.empty(T, device=hs.device, dtype=torch.long) if (want_argmax and kl) else None
    for c0, c1 in _torch_chunks(T, chunk_size, V):
        s = (hs[c0:c1].to(cd) @ w.T) * inv_temp
        ls_ = torch.logsumexp(s, dim=-1)
        lse_s[c0:c1] = ls_
        if want_argmax:
            s_arg[c0:c1] = s.argmax(-1)
        if kl:
            t = (ht[c0:c1].to(cd) @ w.T) * inv_temp
            lt_ = torch.logsumexp(t, dim=-1)
            lse_t[c0:c1] = lt_
            if want_argmax:
                t_arg[c0:c1] = t.argmax(-1)
            log_pt = t - lt_[:, None]
            loss[c0:c1] = (log_pt.exp() * (log_pt - (s - ls_[:, None]))).sum(-1)
        else:
            tgt = targets[c0:c1].clamp(0, V - 1)
            loss[c0:c1] = ls_ - s.gather(1, tgt[:, None]).squeeze(1)
    return loss, lse_s, lse_t, s_arg, t_arg


def _torch_grad(hs, ht, weight, targets, lse_s, lse_t, gscale, inv_temp, mode, chunk_size):
    cd = _compute_dtype(weight)
    w = weight.to(cd)
    T, V = hs.shape[0], weight.shape[0]
    dhs = torch.empty_like(hs)
    for c0, c1 in _torch_chunks(T, chunk_size, V):
        s = (hs[c0:c1].to(cd) @ w.T) * inv_temp
        g = torch.exp(s - lse_s[c0:c1, None].to(cd))
        if mode == _MODE_KL:
            t = (ht[c0:c1].to(cd) @ w.T) * inv_temp
            g = g - torch.exp(t - lse_t[c0:c1, None].to(cd))
        else:
            tgt = targets[c0:c1].clamp(0, V - 1)
            g = g - torch.zeros_like(g).scatter_(1, tgt[:, None], 1.0)
        gs = gscale[c0:c1, None].to(cd)
        g = torch.where(gs != 0, g * gs, torch.zeros((), dtype=cd, device=g.device))
        dhs[c0:c1] = (g @ w).to(hs.dtype)
    return dhs


# --------------------------------------------------------------------------------------------
# autograd wrapper and front doors
# --------------------------------------------------------------------------------------------
class _FusedLinearLoss(torch.autograd.Function):
    """Per-token loss of ``hs @ W^T`` that never stores logits.

    Outputs (loss, student argmax, teacher argmax); the argmaxes are empty unless requested.
    With ``precompute_grad`` the gradient pass runs inside forward and backward is a per-token
    scale, so the weight is not touched after forward returns (ZeRO-3 may re-partition a weight
    gathered only around the loss call). Without it, backward recomputes from saved inputs.
    """

    @staticmethod
    def forward(ctx, hs, ht, weight, targets, token_weight, temperature, mode, backend, chunk_size,
                ignore_index, want_argmax, precompute_grad):
        inv_temp = 1.0 / float(temperature)
        if backend == "triton":
            loss, lse_s, lse_t, s_arg, t_arg = _triton_stats(hs, ht, weight, targets, inv_temp, mode,
                                                             want_argmax)
        else:
            loss, lse_s, lse_t, s_arg, t_arg = _torch_stats(hs, ht, weight, targets, inv_temp, mode,
                                                            chunk_size, want_argmax)
        keep = _keep_mask(loss, token_weight, targets, mode, ignore_index)
        scale = token_weight.to(loss.dtype) if token_weight is not None else 1.0
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        out = torch.where(keep, loss * scale, zero)
        ctx.cfg = (inv_temp, mode, backend, chunk_size, precompute_grad)
        if precompute_grad and ctx.needs_input_grad[0]:
            gscale = _grad_scale(torch.ones_like(lse_s), inv_temp, token_weight, keep)
            dhs_unit = _grad_pass(backend)(hs, ht, weight, targets, lse_s, lse_t, gscale, inv_temp,
                                           mode, chunk_size)
            ctx.save_for_backward(dhs_unit)
        else:
            ctx.save_for_backward(hs, ht, weight, targets, token_weight, lse_s, lse_t, keep)
        empty = torch.empty(0, dtype=torch.long, device=hs.device)
        s_arg = s_arg if s_arg is not None else empty
        t_arg = t_arg if t_arg is not None else empty.clone()
        ctx.mark_non_differentiable(s_arg, t_arg)
        return out, s_arg, t_arg

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _g_sarg, _g_targ):
        inv_temp, mode, backend, chunk_size, precompute_grad = ctx.cfg
        nones = (None,) * 11
        if not ctx.needs_input_grad[0]:
            return (None,) + nones
        if precompute_grad:
            (dhs_unit,) = ctx.saved_tensors
            g = grad_out.to(torch.float64 if dhs_unit.dtype == torch.float64 else torch.float32)
            return ((dhs_unit * g[:, None]).to(dhs_unit.dtype),) + nones
        hs, ht, weight, targets, token_weight, lse_s, lse_t, keep = ctx.saved_tensors
        gscale = _grad_scale(grad_out, inv_temp, token_weight, keep)
        dhs = _grad_pass(backend)(hs, ht, weight, targets, lse_s, lse_t, gscale, inv_temp, mode,
                                  chunk_size)
        return (dhs,) + nones


def _grad_pass(backend):
    return _triton_grad if backend == "triton" else _torch_grad


def _grad_scale(grad_out, inv_temp, token_weight, keep):
    """Per-token factor of d loss / d logits: upstream grad * weight / T, exactly 0 off `keep`."""
    gdtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    gscale = grad_out.to(gdtype) * inv_temp
    if token_weight is not None:
        gscale = gscale * token_weight.to(gdtype)
    return torch.where(keep, gscale, torch.zeros((), dtype=gdtype, device=gscale.device)).contiguous()


def _keep_mask(loss, token_weight, targets, mode, ignore_index):
    keep = torch.ones_like(loss, dtype=torch.bool)
    if token_weight is not None:
        keep = keep & (token_weight != 0)
    if mode == _MODE_CE:
        keep = keep & (targets != ignore_index)
    return keep


def _as_weight(weight) -> torch.Tensor:
    """Accept a weight tensor or an ``nn.Linear``-like lm_head (bias-free, as in Qwen3/Llama)."""
    if isinstance(weight, torch.Tensor):
        return weight
    w = getattr(weight, "weight", None)
    if w is None:
        raise TypeError("weight must be a (V, H) tensor or a module with .weight")
    if getattr(weight, "bias", None) is not None:
        raise NotImplementedError("lm_head with bias is not supported")
    return w


def _flatten(x: torch.Tensor, H: int) -> torch.Tensor:
    x = x.reshape(-1, H)
    return x if x.stride(-1) == 1 else x.contiguous()


def _precompute(flag: bool, hs: torch.Tensor) -> bool:
    # Inside Function.forward grad mode is always off and needs_input_grad ignores no_grad(),
    # so decide here: no gradient work for eval / no_grad calls.
    return bool(flag) and torch.is_grad_enabled() and hs.requires_grad


def _finish(res, lead, return_argmax, with_teacher):
    out, s_arg, t_arg = res
    out = out.reshape(lead)
    if not return_argmax:
        return out
    if with_teacher:
        return out, s_arg.reshape(lead), t_arg.reshape(lead)
    return out, s_arg.reshape(lead)


def _empty_result(hs, w, lead, n_args):
    out = hs.new_zeros(lead, dtype=_compute_dtype(w)) + 0 * hs.sum()
    arg = torch.zeros(lead, dtype=torch.long, device=hs.device)
    return (out,) + (arg,) * n_args


def fused_linear_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight,
    temperature: float = 1.0,
    *,
    token_weight: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    return_argmax: bool = False,
    precompute_grad: bool = True,
    backend: str = "auto",
):
    """Per-token ``KL(softmax(ht W^T / T) || softmax(hs W^T / T))``, shape ``hs.shape[:-1]``.

    Same inputs and per-token output as the torch path ``orthrus_train.losses.chunked_distill``
    (kind="kl"), without ever materialising (tokens, V) logits. ``weight`` may be the lm_head
    module. ``chunk_size`` bounds the tokens per backward gradient buffer (Triton) or per logits
    chunk (torch). Gradient flows to ``student_hidden`` only.
    ``return_argmax=True`` returns ``(kl, student_argmax, teacher_argmax)`` (long), computed in the
    same pass for free; use it instead of separate argmax matmuls for agreement metrics.
    ``precompute_grad=True`` (default, like the torch path) runs the gradient pass inside forward
    and keeps a (T, H) gradient, so backward never touches the weight: required when the weight
    is only gathered around this call (ZeRO-3). ``False`` recomputes in backward instead (no
    (T, H) buffer, no gradient work when backward never runs).
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    w = _as_weight(weight)
    H = w.shape[1]
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"shape mismatch {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}")
    hs = _flatten(student_hidden, H)
    ht = _flatten(teacher_hidden.detach(), H)
    tw = token_weight.reshape(-1) if token_weight is not None else None
    be = resolve_backend(backend, hs, ht, w, triton_dtypes=_TRITON_DTYPES)
    if hs.shape[0] == 0:
        res = _empty_result(hs, w, lead, 2)
        return res if return_argmax else res[0]
    res = _FusedLinearLoss.apply(hs, ht, w.detach(), None, tw, temperature, _MODE_KL, be,
                                 chunk_size, -100, return_argmax, _precompute(precompute_grad, hs))
    return _finish(res, lead, return_argmax, True)


def fused_linear_ce(
    hidden: torch.Tensor,
    weight,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    token_weight: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    return_argmax: bool = False,
    precompute_grad: bool = True,
    backend: str = "auto",
):
    """Per-token ``-log softmax(hidden W^T)[target]``, 0 where ``target == ignore_index``.

    Hard-label counterpart of :func:`fused_linear_kl` (same streaming design and
    ``precompute_grad`` semantics). ``return_argmax=True`` returns ``(loss, argmax)``. Targets other than ``ignore_index`` must
    lie in ``[0, V)``; this is not checked on the Triton path because the check would force a
    host synchronisation.
    """
    w = _as_weight(weight)
    H = w.shape[1]
    lead = hidden.shape[:-1]
    hs = _flatten(hidden, H)
    tgt = targets.reshape(-1).to(torch.int64).contiguous()
    if tgt.shape[0] != hs.shape[0]:
        raise ValueError("targets must have one entry per token")
    tw = token_weight.reshape(-1) if token_weight is not None else None
    be = resolve_backend(backend, hs, w, triton_dtypes=_TRITON_DTYPES)
    if hs.shape[0] == 0:
        res = _empty_result(hs, w, lead, 1)
        return res if return_argmax else res[0]
    res = _FusedLinearLoss.apply(hs, None, w.detach(), tgt, tw, 1.0, _MODE_CE, be, chunk_size,
                                 ignore_index, return_argmax, _precompute(precompute_grad, hs))
    return _finish(res, lead, return_argmax, False)


# --------------------------------------------------------------------------------------------
# Plain-autograd chunked references (benchmark fallback, tests)
# --------------------------------------------------------------------------------------------
def _kl_chunk(hs_c, ht_c, w, inv_temp):
    cd = _compute_dtype(w)
    s = (hs_c.to(cd) @ w.to(cd).T) * inv_temp
    t = (ht_c.to(cd) @ w.to(cd).T) * inv_temp
    log_pt = torch.log_softmax(t, -1)
    return (log_pt.exp() * (log_pt - torch.log_softmax(s, -1))).sum(-1)


def chunked_linear_kl_reference(
    student_hidden, teacher_hidden, weight, chunk_size: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token KL by plain autograd over token chunks, each chunk rematerialised in backward.

    Why: the obvious memory-bounded torch baseline, independent of ``orthrus_train.losses``;
    used by the benchmark when that module is absent and by tests as an independent path.
    """
    from torch.utils.checkpoint import checkpoint

    w = _as_weight(weight).detach()
    H = w.shape[1]
    lead = student_hidden.shape[:-1]
    hs = student_hidden.reshape(-1, H)
    ht = teacher_hidden.detach().reshape(-1, H)
    inv_temp = 1.0 / float(temperature)
    outs = []
    for c0 in range(0, hs.shape[0], chunk_size):
        c1 = min(hs.shape[0], c0 + chunk_size)
        if hs.requires_grad:
            outs.append(checkpoint(_kl_chunk, hs[c0:c1], ht[c0:c1], w, inv_temp, use_reentrant=False))
        else:
            outs.append(_kl_chunk(hs[c0:c1], ht[c0:c1], w, inv_temp))
    return torch.cat(outs).reshape(lead)


def chunked_linear_ce_reference(hidden, weight, targets, chunk_size: int = 1024,
                                ignore_index: int = -100) -> torch.Tensor:
    """Per-token CE by chunked plain autograd; see :func:`chunked_linear_kl_reference`."""
    w = _as_weight(weight).detach()
    H = w.shape[1]
    lead = hidden.shape[:-1]
    hs = hidden.reshape(-1, H)
    tgt = targets.reshape(-1)
    cd = _compute_dtype(w)
    outs = []
    for c0 in range(0, hs.shape[0], chunk_size):
        c1 = min(hs.shape[0], c0 + chunk_size)
        s = hs[c0:c1].to(cd) @ w.to(cd).T
        outs.append(torch.nn.functional.cross_entropy(
            s, tgt[c0:c1], ignore_index=ignore_index, reduction="none"))
    return torch.cat(outs).reshape(lead)
