"""Decode attention that reads only the live part of the static KV cache (``ORTHRUS_DECODE_ATTN=live``).

The cached decode passes (AR prefill/verify of a few queries, the drafted "diff" pass) attend T <= 64
queries (B, Hq, T, D) over a static cache (B, Hkv, S, D) under a boolean mask (B, 1, T, S). SDPA reads all
S slots of every row although only the first ``kv_len[b]`` can be attended, ``kv_len[b]`` = 1 + the largest
slot any query of row b attends (:func:`live_lengths`, computed on the device once per pass: no host sync,
so the steps stay capturable as CUDA graphs; the kernel's key loop runs to a bound it loads from memory).

Layout: one program per (batch row, kv head, tile of folded query rows). The g = Hq / Hkv query heads of a
kv head are folded into the program's query tile (folded row r = local head r // T, query r % T: the "fold"
layout of ``orthrus_train.model.layers``), so each K/V block below ``kv_len[b]`` is read once per kv head
(when g * T > 128 the rows span several tiles, each reading the blocks once). Scores and the online
softmax are float32 (IEEE dots for float32 inputs); probabilities are rounded to V's dtype for the P @ V
dot, as flash attention does; the output is written in the query dtype, in the (B, T, Hq, D) memory layout
that SDPA's GPU backends return (the caller's ``transpose(1, 2).reshape`` is then a view).

A query that attends to nothing gets 0, as torch's SDPA returns for a fully masked row (the engine's masks
never produce one: every query sees at least its own slot).

Block sizes: BLOCK_N = 64 keys per step (at most 63 slots past ``kv_len`` are touched, and masked, never
loaded); BLOCK_M = g * T rounded up to a power of two, at least 16 (``tl.dot``'s minimum) and at most 128
(register budget of a (BLOCK_M, D) float32 accumulator at D = 128). Neither is tuned on a GPU yet, nor is
there a split over the key axis (flash-decoding): with few rows and kv heads the grid is small, which is
why "live" is opt-in until timed (scripts/profile_decode_step.py --attn live).

Under the Triton interpreter (CPU tests) the dots run on float32 operands (16-bit products are exact in
float32): the interpreter's 16-bit ``tl.dot`` is not trustworthy (see ``fused_kl._logit_tiles``).
"""

from __future__ import annotations

import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["live_attention", "live_lengths", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (64, 128)  # powers of two (tl.arange / tl.dot tiles over the head dim), the ones tested
BLOCK_N = 64
MAX_BLOCK_M = 128


if HAS_TRITON:

    @triton.jit
    def _live_attn_kernel(
        q_ptr, k_ptr, v_ptr, m_ptr, len_ptr, o_ptr,
        scale, T, M, Hkv, G,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
        sm_b, sm_t, sm_s, so_b, so_h, so_t,
        HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // Hkv
        hk = pid % Hkv
        b64 = b.to(tl.int64)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # folded rows: local head r // T, query r % T
        row_ok = rows < M
        head = (hk * G + rows // T).to(tl.int64)
        t = rows % T
        d = tl.arange(0, HEAD_D)

        q = tl.load(q_ptr + b64 * sq_b + head[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + b64 * sk_b + hk.to(tl.int64) * sk_h
        v_base = v_ptr + b64 * sv_b + hk.to(tl.int64) * sv_h
        m_base = m_ptr + b64 * sm_b + t[:, None] * sm_t

        n = tl.load(len_ptr + b)  # this row's live length: keys at or past it are never loaded
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for start in range(0, n, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < n
            kt = tl.load(k_base + cols[None, :].to(tl.int64) * sk_s + d[:, None], mask=col_ok[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N) float32
            allow = tl.load(m_base + cols[None, :] * sm_s, mask=row_ok[:, None] & col_ok[None, :], other=0)
            s = tl.where(allow != 0, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row has seen nothing yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vb = tl.load(v_base + cols[:, None].to(tl.int64) * sv_s + d[None, :], mask=col_ok[:, None], other=0.0)
            p = p.to(vb.dtype)  # flash attention's rounding of the probabilities (a no-op in float32)
            if UPCAST:
                p = p.to(tl.float32)
                vb = vb.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision=PRECISION)
            m_i = m_new
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)  # nothing seen: 0
        tl.store(o_ptr + b64 * so_b + head[:, None] * so_h + t[:, None] * so_t + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def live_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B,) int32 on the mask's device: 1 + the largest slot any query of row b attends (0: none). The boolean
    mask (B, 1, T, S) is reduced on the device (any over queries, then a max over slot numbers), no host sync."""
    S = mask.shape[-1]
    live = mask.any(2)[:, 0]  # (B, S)
    slot = torch.arange(1, S + 1, dtype=torch.int32, device=mask.device)
    return torch.where(live, slot, 0).amax(-1)


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"decode attention 'live' supports head_dim in {SUPPORTED_HEAD_DIMS}, got {head_dim}; "
                         "use ORTHRUS_DECODE_ATTN=sdpa (or set_decode_attention('sdpa')) for this model")


def live_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kv_len: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v over keys below kv_len[b] only.

    q (B, Hq, T, D); k, v (B, Hkv, S, D), Hq a multiple of Hkv (head h reads kv head h // (Hq / Hkv)); mask
    (B, 1, T, S) bool, True = attend (may be an expanded view); kv_len (B,) int32 (:func:`live_lengths` of the
    mask, or any bound with no attended slot at or past it). Returns (B, Hq, T, D) in q's dtype (a
    transposed view of a (B, T, Hq, D) buffer)."""
    if not HAS_TRITON:
        raise RuntimeError("decode attention 'live' needs triton")
    B, Hq, T, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    check_head_dim(D)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"decode attention 'live' supports {SUPPORTED_DTYPES}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"decode attention 'live': q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (Bk, Dk) != (B, D) or v.shape != k.shape or Hq % Hkv:
        raise ValueError(f"decode attention 'live': q {tuple(q.shape)} does not fit k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if mask.dtype != torch.bool or mask.shape != (B, 1, T, S):
        raise ValueError(f"decode attention 'live': mask must be bool {(B, 1, T, S)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    kv_len = kv_len.to(device=q.device, dtype=torch.int32)
    g = Hq // Hkv
    M = g * T
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(M)))
    out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    m8 = mask.view(torch.uint8)  # same strides (an expanded view stays one)
    grid = (B * Hkv, triton.cdiv(M, block_m))
    _live_attn_kernel[grid](
        q, k, v, m8, kv_len, out,
        float(scale), T, M, Hkv, g,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), m8.stride(0), m8.stride(2), m8.stride(3),
        out.stride(0), out.stride(2), out.stride(1),
        HEAD_D=D, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if (q.dtype == torch.float32 or interpreting()) else "tf32",
        UPCAST=interpreting() and q.dtype != torch.float32,
        num_warps=8 if block_m * D >= 128 * 128 else 4,
    )
    return out.transpose(1, 2)
