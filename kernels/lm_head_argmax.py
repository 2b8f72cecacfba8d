"""Greedy LM head in one pass: ``argmax_v (hidden @ weight.T)[t, v]`` without writing the logits.

The greedy decode paths (greedy drafts, the greedy verify, the AR greedy step) need only each position's argmax
of the LM head's logits. Unfused, cuBLAS writes the (tokens, V) logits and argmax reads them back; and for the
verify pass of an SmolLM2-shaped model at batch 16, K = 16 ((256 x 576) @ (576 x 49152), bf16) an H200 profile
showed cuBLAS picking a small-N tiling that re-read the 56 MB weight once per 16-token tile: 166 us, against
~20 us of memory traffic. :func:`lm_head_argmax` reads the weight once for up to MAX_BLOCK_T tokens.

Layout (two kernels):

* ``_tile_argmax_kernel``, grid (token tiles, vocab programs): a program holds BLOCK_T token rows (all tokens of
  a decode step where they fit: BLOCK_T = their count rounded up to a power of two, 16..MAX_BLOCK_T) and walks
  TILES consecutive (BLOCK_T, BLOCK_V) tiles of the vocabulary. Each tile's logits are accumulated in float32
  over H in BLOCK_K steps (``tl.dot``; IEEE float32 products for float32 inputs, as torch's float32 matmul
  without TF32), then ROUNDED to the weight's dtype, as the unfused logits are (cuBLAS writes bf16 logits from a
  float32 accumulator; argmax must compare the same rounded values, ties included), and reduced to a per-row
  (max, lowest index attaining it). Across its tiles a program keeps the first maximum (strict ``>``: tiles come
  in increasing vocab order). Columns at or past V are masked to -inf. Writes one (max, index) pair per
  (row, program).
* ``_merge_kernel``, grid (rows,): the row's per-program pairs reduced to the max with the LOWEST index among
  equal maxima: exactly ``torch.argmax``'s rule (first occurrence), so ties between vocab programs break the
  same way as ties inside a tile.

The number of vocab programs is chosen per shape so that the grid has about PROGRAMS_PER_SM programs per SM
(a fixed function of the shape: CUDA-graph safe); each token tile re-reads the weight, so more than MAX_BLOCK_T
tokens read it more than once.

What is exact and what is not: the float32 sum over H runs in the kernel's own order, not cuBLAS's (nor the
CPU BLAS's), so a logit whose float32 value lies within a few float32 ulps of a rounding boundary of the
weight's dtype can round the other way than in the unfused path, and the argmax can then differ where two
logits tie or nearly tie after rounding. Tested on the CPU (Triton interpreter) against
``torch.argmax(F.linear(h, W))`` on random inputs in float32 / bfloat16 / float16, odd vocabularies, 1 and 256
tokens, and constructed exact ties (tests/kernels/test_lm_head_argmax.py); NOT yet run or timed on a GPU (block
sizes untuned). NaN logits (a broken model): not tested, the pick is unspecified (torch returns the first NaN).

Under the Triton interpreter (CPU tests) the dots run on float32 operands (16-bit products are exact in float32;
the interpreter's 16-bit ``tl.dot`` is not trustworthy, see ``fused_kl._logit_tiles``) and the float32 ->
bfloat16 rounding is done by hand (``rmsnorm._to_bf16_rne``: the interpreter's cast truncates).
"""

from __future__ import annotations

import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting, sm_count

if HAS_TRITON:
    import triton
    import triton.language as tl

    from orthrus_kernels.rmsnorm import _to_bf16_rne

__all__ = ["lm_head_argmax", "launch_config", "SUPPORTED_DTYPES", "MAX_BLOCK_T"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK_T = 256  # token rows per program (a decode step's verify pass at batch 16, K = 16: 256 tokens)
MIN_BLOCK_T = 16  # tl.dot's minimum tile side
PROGRAMS_PER_SM = 4  # target grid size (untuned)


if HAS_TRITON:

    @triton.jit
    def _tile_argmax_kernel(
        x_ptr, w_ptr, pmax_ptr, pidx_ptr,
        N, R1, V, H, P, TILES, sx0, sx1, sw_v,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND: tl.constexpr, BF16_RNE: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_p = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # row r = (r // R1, r % R1) of the (R0, R1, H) input
        row_ok = rows < N
        x_row = x_ptr + ((rows // R1).to(tl.int64) * sx0 + (rows % R1).to(tl.int64) * sx1)
        offs_v = tl.arange(0, BLOCK_V)
        offs_k = tl.arange(0, BLOCK_K)
        best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        best_i = tl.zeros([BLOCK_T], dtype=tl.int32)
        for i in range(0, TILES):
            cols = (pid_p * TILES + i) * BLOCK_V + offs_v
            col_ok = cols < V
            w_col = w_ptr + cols.to(tl.int64) * sw_v
            acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + offs_k
                k_ok = ks < H
                a = tl.load(x_row[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_col[None, :] + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if ROUND:  # the logits as the unfused path stores them: rounded to the weight's dtype
                if BF16_RNE:
                    acc = _to_bf16_rne(acc).to(tl.float32)
                else:
                    acc = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            m = tl.max(acc, axis=1)
            idx = tl.min(tl.where(acc == m[:, None], cols[None, :], 2147483647), axis=1)
            take = m > best  # strict: an earlier tile (lower indices) keeps a tie
            best = tl.where(take, m, best)
            best_i = tl.where(take, idx, best_i)
        out = rows.to(tl.int64) * P + pid_p
        tl.store(pmax_ptr + out, best, mask=row_ok)
        tl.store(pidx_ptr + out, best_i, mask=row_ok)

    @triton.jit
    def _merge_kernel(pmax_ptr, pidx_ptr, out_ptr, P, BLOCK_P: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_P)
        ok = offs < P
        m = tl.load(pmax_ptr + row * P + offs, mask=ok, other=float("-inf"))
        i = tl.load(pidx_ptr + row * P + offs, mask=ok, other=2147483647)
        best = tl.max(m, axis=0)
        idx = tl.min(tl.where(ok & (m == best), i, 2147483647), axis=0)  # the lowest index among the maxima
        tl.store(out_ptr + row, idx.to(tl.int64))


def launch_config(n: int, v: int, h: int, dtype: torch.dtype, device: torch.device,
                  block_t: int | None = None, block_v: int | None = None) -> dict:
    """Block sizes and grid of a call with n token rows, vocabulary v, hidden size h (a function of the shape only:
    CUDA-graph safe). block_t / block_v override the heuristics (powers of two, >= 16; for tuning runs)."""
    if block_t is None:
        block_t = min(MAX_BLOCK_T, max(MIN_BLOCK_T, triton.next_power_of_2(max(n, 1))))
    if block_v is None:
        block_v = 64 if block_t >= 128 else 128
    for name, b in (("block_t", block_t), ("block_v", block_v)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"lm_head_argmax: {name} must be a power of two >= 16, got {b}")
    # float32 operands take twice the shared memory per pipeline stage: half the K step
    block_k = 32 if dtype == torch.float32 else 64
    block_k = min(block_k, max(16, triton.next_power_of_2(h)))
    t_tiles = triton.cdiv(max(n, 1), block_t)
    v_tiles = triton.cdiv(v, block_v)
    want = max(1, triton.cdiv(PROGRAMS_PER_SM * sm_count(device), t_tiles))
    tiles = triton.cdiv(v_tiles, min(v_tiles, want))  # vocab tiles per program
    programs = triton.cdiv(v_tiles, tiles)  # no program without a tile
    warps = 8 if block_t * block_v >= 128 * 64 else 4
    return dict(block_t=block_t, block_v=block_v, block_k=block_k, t_tiles=t_tiles, programs=programs,
                tiles=tiles, num_warps=warps)


def _rows3(hidden: torch.Tensor) -> torch.Tensor:
    """hidden (..., H) as (R0, R1, H) with a contiguous last dim: a view where the strides allow it (a (B, T, H)
    slice such as the draft pass's h[:, :-1] stays a view), else a copy."""
    if hidden.dim() == 1:
        hidden = hidden[None]
    if hidden.dim() == 2:
        hidden = hidden[None]
    elif hidden.dim() > 3:
        hidden = hidden.reshape(-1, hidden.shape[-2], hidden.shape[-1])
    return hidden if hidden.stride(-1) == 1 else hidden.contiguous()


def lm_head_argmax(hidden: torch.Tensor, weight: torch.Tensor, *, block_t: int | None = None,
                   block_v: int | None = None) -> torch.Tensor:
    """``torch.argmax(F.linear(hidden, weight), -1)`` without the logits (see the module docstring for what is
    exact). hidden (..., H); weight (V, H) (an lm_head's weight; tied embeddings are the same tensor) in hidden's
    dtype, float32 / bfloat16 / float16, last dim contiguous (else copied). No bias: add it to the logits and
    this is no longer an argmax of ``hidden @ weight.T``, so callers with a biased lm_head take the unfused path.
    Returns int64 ids of shape hidden.shape[:-1], on hidden's device."""
    if not HAS_TRITON:
        raise RuntimeError("orthrus_kernels.lm_head_argmax needs triton")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lm_head_argmax supports {SUPPORTED_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_argmax: weight dtype {weight.dtype} must be hidden's dtype {hidden.dtype}")
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_argmax: weight must be (V, {hidden.shape[-1] if hidden.dim() else '?'}), got "
                         f"{tuple(weight.shape)} for hidden {tuple(hidden.shape)}")
    V, H = weight.shape
    if V == 0:
        raise ValueError("lm_head_argmax: the weight has no rows (empty vocabulary)")
    out_shape = hidden.shape[:-1]
    x = _rows3(hidden)
    R0, R1, _ = x.shape
    n = R0 * R1
    out = torch.empty(n, dtype=torch.long, device=hidden.device)
    if n == 0:
        return out.view(out_shape)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    cfg = launch_config(n, V, H, hidden.dtype, hidden.device, block_t, block_v)
    P = cfg["programs"]
    pmax = torch.empty((n, P), dtype=torch.float32, device=hidden.device)
    pidx = torch.empty((n, P), dtype=torch.int32, device=hidden.device)
    interp = interpreting()
    _tile_argmax_kernel[(cfg["t_tiles"], P)](
        x, weight, pmax, pidx, n, R1, V, H, P, cfg["tiles"], x.stride(0), x.stride(1), weight.stride(0),
        BLOCK_T=cfg["block_t"], BLOCK_V=cfg["block_v"], BLOCK_K=cfg["block_k"],
        PRECISION="ieee" if (hidden.dtype == torch.float32 or interp) else "tf32",
        UPCAST=interp and hidden.dtype != torch.float32, ROUND=hidden.dtype != torch.float32,
        BF16_RNE=interp and hidden.dtype == torch.bfloat16, num_warps=cfg["num_warps"],
    )
    _merge_kernel[(n,)](pmax, pidx, out, P, BLOCK_P=triton.next_power_of_2(P), num_warps=1 if P <= 128 else 4)
    return out.view(out_shape)
