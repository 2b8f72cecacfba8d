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
(register budget of a (BLOCK_M, D) float32 accumulator at D = 128). Neither is tuned on a GPU yet.

Split over the key axis (flash-decoding): with few rows and kv heads the grid is tiny (SmolLM2 at batch 1: 3
programs), and one program reading a 1,000-slot cache serially left the GPU idle (session 9: the AR step
1.69 ms against SDPA's 1.21). :func:`num_splits` picks, per shape, how many programs share each (row, kv head,
query tile): enough for about two programs per SM, each split holding at least ``MIN_SPLIT_KEYS`` slots of a
full cache. The split count is fixed per shape (CUDA-graph safe); each split's key range is cut from the live
length at run time (``cdiv(kv_len, splits)`` rounded up to BLOCK_N), so splits past a short live length load
nothing and exit. Each split writes its running max, sum and unnormalised float32 output; a second kernel
merges them: per BLOCK_R = 16 folded query rows, the global max over the splits first, then the partial outputs
summed with their weights exp(m_split - max) (the online-softmax rescaling, in one step; float32). With one split
the first kernel writes the output itself.

Under the Triton interpreter (CPU tests) the dots run on float32 operands (16-bit products are exact in
float32): the interpreter's 16-bit ``tl.dot`` is not trustworthy (see ``fused_kl._logit_tiles``).
"""

from __future__ import annotations

import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting, sm_count

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["live_attention", "live_lengths", "num_splits", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (64, 128)  # powers of two (tl.arange / tl.dot tiles over the head dim), the ones tested
BLOCK_N = 64
MAX_BLOCK_M = 128
MIN_SPLIT_KEYS = 128  # a split of a full cache holds at least this many slots (2 key blocks)
MAX_SPLITS = 32
PROGRAMS_PER_SM = 2
MERGE_BLOCK_R = 16  # folded query rows per merge program (a power of two <= the attention's BLOCK_M)


if HAS_TRITON:

    @triton.jit
    def _live_attn_kernel(
        q_ptr, k_ptr, v_ptr, m_ptr, len_ptr, o_ptr, pm_ptr, pl_ptr, pacc_ptr,
        scale, T, M, Hkv, G, M_PAD,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
        sm_b, sm_t, sm_s, so_b, so_h, so_t,
        HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(2)
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
        chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N  # this split's keys: [lo, hi), whole blocks
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < hi
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
        if SPLITS == 1:
            out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)  # nothing seen: 0
            tl.store(o_ptr + b64 * so_b + head[:, None] * so_h + t[:, None] * so_t + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:  # this split's partial result: running max, sum, unnormalised output (float32)
            prow = (pid.to(tl.int64) * SPLITS + split) * M_PAD + rows
            tl.store(pm_ptr + prow, m_i)
            tl.store(pl_ptr + prow, l_i)
            tl.store(pacc_ptr + prow[:, None] * HEAD_D + d[None, :], acc)

    @triton.jit
    def _live_attn_merge_kernel(
        pm_ptr, pl_ptr, pacc_ptr, o_ptr,
        T, M, Hkv, G, M_PAD, so_b, so_h, so_t,
        HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    ):
        # One program per (row, kv head, BLOCK_R folded query rows): the splits' maxima and sums of its rows are
        # loaded in one (SPLITS_P2, BLOCK_R) tile, the global max and each split's weight exp(m_s - max) computed
        # once, then the splits' partial outputs summed with those weights in an unrolled loop whose loads do not
        # wait on each other (session 18: the sequential online merge, one program per 64 rows, took 6.8 us per
        # drafted-step call on SmolLM2 at batch 16, latency-bound, about as long as the attention itself).
        pid = tl.program_id(0)
        b64 = (pid // Hkv).to(tl.int64)
        hk = pid % Hkv
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # < M_PAD: BLOCK_R divides M_PAD
        row_ok = rows < M
        head = (hk * G + rows // T).to(tl.int64)
        t = rows % T
        d = tl.arange(0, HEAD_D)
        base = pid.to(tl.int64) * SPLITS
        s_idx = tl.arange(0, SPLITS_P2)
        s_ok = s_idx[:, None] < SPLITS
        prow2 = (base + s_idx[:, None]) * M_PAD + rows[None, :]
        m_all = tl.load(pm_ptr + prow2, mask=s_ok, other=float("-inf"))  # (SPLITS_P2, BLOCK_R)
        m_max = tl.max(m_all, axis=0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # a row no split saw: every weight 0
        l_i = tl.sum(tl.load(pl_ptr + prow2, mask=s_ok, other=0.0) * tl.exp(m_all - m_safe[None, :]), axis=0)
        acc = tl.zeros([BLOCK_R, HEAD_D], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            prow = (base + s) * M_PAD + rows
            w = tl.exp(tl.load(pm_ptr + prow) - m_safe)
            acc += tl.load(pacc_ptr + prow[:, None] * HEAD_D + d[None, :]) * w[:, None]
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


def num_splits(programs: int, slots: int, device: torch.device) -> int:
    """How many programs share each (row, kv head, query tile) along the key axis: about PROGRAMS_PER_SM
    programs per SM in all, while a split of a full cache of `slots` keeps at least MIN_SPLIT_KEYS slots; 1 when
    the grid already fills the GPU or the cache is short. A function of the shape only (CUDA-graph safe).

    Rounded down to a power of two: a split's key range is rounded up to whole BLOCK_N blocks, so at a live
    length of a few blocks 3 or 6 splits leave programs idle and cost the merge more partials (measured on an
    H200, session 19, `scripts/sweep_decode_kernels.py`: SmolLM2's drafted pass at batch 16, live length 216, 9.8
    us per call at 6 splits, 8.8 at 4; the AR pass 6.9 and 6.3; no SmolLM2 shape was faster at 3 or 6)."""
    want = -(-PROGRAMS_PER_SM * sm_count(device) // programs)
    n = max(1, min(want, slots // MIN_SPLIT_KEYS, MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"decode attention 'live' supports head_dim in {SUPPORTED_HEAD_DIMS}, got {head_dim}; "
                         "use ORTHRUS_DECODE_ATTN=sdpa (or set_decode_attention('sdpa')) for this model")


def live_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kv_len: torch.Tensor,
                   scale: float, splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v over keys below kv_len[b] only.

    q (B, Hq, T, D); k, v (B, Hkv, S, D), Hq a multiple of Hkv (head h reads kv head h // (Hq / Hkv)); mask
    (B, 1, T, S) bool, True = attend (may be an expanded view); kv_len (B,) int32 (:func:`live_lengths` of the
    mask, or any bound with no attended slot at or past it); splits: programs per (row, kv head, query tile)
    along the key axis (None: :func:`num_splits`). Returns (B, Hq, T, D) in q's dtype (a transposed view of a
    (B, T, Hq, D) buffer)."""
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
    m_tiles = triton.cdiv(M, block_m)
    if splits is None:
        splits = num_splits(B * Hkv * m_tiles, S, q.device)
    if splits < 1:
        raise ValueError(f"decode attention 'live': splits must be >= 1, got {splits}")
    m_pad = m_tiles * block_m
    if splits > 1:  # per split: running max, sum and unnormalised output of every folded query row
        pm = torch.empty((B * Hkv, splits, m_pad), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((B * Hkv, splits, m_pad, D), dtype=torch.float32, device=q.device)
    else:
        pm = pl = pacc = out  # not read (the kernel writes the output itself)
    warps = 8 if block_m * D >= 128 * 128 else 4
    _live_attn_kernel[(B * Hkv, m_tiles, splits)](
        q, k, v, m8, kv_len, out, pm, pl, pacc,
        float(scale), T, M, Hkv, g, m_pad,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), m8.stride(0), m8.stride(2), m8.stride(3),
        out.stride(0), out.stride(2), out.stride(1),
        HEAD_D=D, BLOCK_M=block_m, BLOCK_N=BLOCK_N, SPLITS=splits,
        PRECISION="ieee" if (q.dtype == torch.float32 or interpreting()) else "tf32",
        UPCAST=interpreting() and q.dtype != torch.float32,
        num_warps=warps,
    )
    if splits > 1:
        block_r = min(block_m, MERGE_BLOCK_R)
        _live_attn_merge_kernel[(B * Hkv, m_pad // block_r)](
            pm, pl, pacc, out, T, M, Hkv, g, m_pad, out.stride(0), out.stride(2), out.stride(1),
            HEAD_D=D, BLOCK_R=block_r, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), num_warps=4,
        )
    return out.transpose(1, 2)
