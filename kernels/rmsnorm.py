"""RMSNorm of the decode passes in one kernel (``ORTHRUS_DECODE_NORM=triton``).

``orthrus_train.model.layers.rms_norm`` is 7 kernels in eager torch (``.float()``, pow, mean, add eps, rsqrt,
mul, mul weight); the decode steps are launch-bound, so :func:`rms_norm` does the same arithmetic in one
kernel, row by row: x loaded and widened to float32, the mean of its squares (float32 sum, then divided by N on
a CPU / multiplied by 1/N on CUDA, as torch's mean does on each), + eps, rsqrt, times x, rounded to x's dtype
once (no rounding at all for float32 x), then times the weight in x's dtype (16-bit products are exact in
float32, so widening both factors and rounding the product once is what torch's 16-bit multiply does). The
output is a new contiguous tensor of x's shape and dtype. Only the order of the float32 sum (and, on a GPU,
the rsqrt implementation: libdevice's, as torch's CUDA rsqrt) can differ from torch's.

Shapes: x (..., N) with a contiguous last dim (any strides for the leading dims, e.g. the joint q/k view of
the fused projection output); weight (N,), or (H, N) with H = x.shape[-2] (per-head rows: the joint q/k norm
of ``layers.project_qkv``). weight has x's dtype. BLOCK = next power of two of N; a program normalizes
ROWS rows (ROWS * BLOCK <= MAX_TILE: several short rows, e.g. the q/k heads of D = 64, or one long one).

:func:`add_rms_norm` fuses the residual add before the norm (the decode passes' ``h + attn_out`` then
``post_attention_layernorm``, ``h + mlp_out`` then the next layer's ``input_layernorm``): the same kernel with
``HAS_RES`` set loads x and r, adds them in float32 and rounds the sum to x's dtype once (eager torch's 16-bit
add: both widened, one rounding; float32: the plain add), stores that sum s and normalizes the ROUNDED s with
the arithmetic above. One launch instead of the add's and the norm's.

Under the Triton interpreter (CPU tests) the float32 -> bfloat16 casts are rounded to nearest even by hand
(:func:`_to_bf16_rne`): the interpreter's cast truncates.
"""

from __future__ import annotations

import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rms_norm", "add_rms_norm", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TILE = 4096  # elements per program: rows of N <= 2048 are batched, ROWS * BLOCK <= MAX_TILE (untuned)


if HAS_TRITON:

    @triton.jit
    def _to_bf16_rne(v):
        """float32 -> bfloat16 rounded to nearest even. The Triton interpreter's own cast truncates (toward zero);
        rounding the float32 bits first makes its truncation exact (finite values; the GPU cast already rounds)."""
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _inv_rms(x, eps, inv_n, N, BY_RECIPROCAL: tl.constexpr):
        """1 / sqrt(mean(x^2) + eps) of each row of the float32 tile x (columns past N zero): the float32 sum of
        squares, then divided by N (CPU) or times 1/N (CUDA), as torch's mean does on each."""
        ss = tl.sum(x * x, axis=1)
        if BY_RECIPROCAL:
            ms = ss * inv_n
        else:
            ms = ss / N
        return tl.math.rsqrt(ms + eps)

    @triton.jit
    def _scale_rows(x, r, w, o_ptr, ROUND: tl.constexpr, BF16_RNE: tl.constexpr):
        """The norm's output in o_ptr's dtype: x * r (r per row) rounded to that dtype (16-bit x), then times the
        weight w (float32 tile; the product of two 16-bit values is exact in float32) and rounded once more."""
        y = x * r[:, None]
        if ROUND:
            if BF16_RNE:
                y = _to_bf16_rne(y).to(tl.float32)
            else:
                y = y.to(o_ptr.dtype.element_ty).to(tl.float32)
        if BF16_RNE:
            return _to_bf16_rne(w * y)
        return (w * y).to(o_ptr.dtype.element_ty)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, w_ptr, o_ptr, r_ptr, s_ptr, eps, inv_n, N, H, R, sx_g, sx_h, sr_g, sr_h, sw_h,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, BY_RECIPROCAL: tl.constexpr, ROUND: tl.constexpr,
        BF16_RNE: tl.constexpr, HAS_RES: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row = group * H + h: the leading dims as (groups, H)
        row_ok = rows < R
        g = (rows // H).to(tl.int64)
        h = (rows % H).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = row_ok[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + g[:, None] * sx_g + h[:, None] * sx_h + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:  # s = x + r as eager torch adds (float32 add, one rounding to x's dtype), stored; normed below
            x = x + tl.load(r_ptr + g[:, None] * sr_g + h[:, None] * sr_h + cols[None, :], mask=ok,
                            other=0.0).to(tl.float32)
            if ROUND:
                if BF16_RNE:
                    s = _to_bf16_rne(x)
                else:
                    s = x.to(s_ptr.dtype.element_ty)
                x = s.to(tl.float32)
            else:
                s = x
            tl.store(s_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], s, mask=ok)
        r = _inv_rms(x, eps, inv_n, N, BY_RECIPROCAL)
        w = tl.load(w_ptr + h[:, None] * sw_h + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        o = _scale_rows(x, r, w, o_ptr, ROUND, BF16_RNE)
        tl.store(o_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], o, mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``layers.rms_norm(x, weight, eps)`` in one Triton kernel (see the module docstring for the shapes)."""
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float):
    """``s = x + r; (s, layers.rms_norm(s, weight, eps))`` in one Triton kernel. r: x's shape and dtype; s and the
    norm are new contiguous tensors of x's shape and dtype (shapes as :func:`rms_norm`'s)."""
    if r.shape != x.shape:
        raise ValueError(f"add_rms_norm kernel: r {tuple(r.shape)} must have x's shape {tuple(x.shape)}")
    if r.dtype != x.dtype:
        raise TypeError(f"add_rms_norm kernel: r dtype {r.dtype} must be x's dtype {x.dtype}")
    return _launch(x, r, weight, eps)


def _rows3(t: torch.Tensor, H: int, N: int) -> torch.Tensor:
    """t (..., N) as (groups, H, N) with a contiguous last dim: a view where its strides allow it."""
    t = t.reshape(1, N) if t.dim() == 1 else t
    if t.stride(-1) != 1:
        t = t.contiguous()
    t3 = t.reshape(-1, H, N)
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def _launch(x: torch.Tensor, r: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(s, norm): the kernel over x (r None: the plain norm, s None) or over s = x + r."""
    if not HAS_TRITON:
        raise RuntimeError("orthrus_kernels.rmsnorm needs triton")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rms_norm kernel supports {SUPPORTED_DTYPES}, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"rms_norm kernel: weight dtype {weight.dtype} must be x's dtype {x.dtype}")
    N = x.shape[-1]
    H = 1 if x.dim() == 1 else x.shape[-2]
    if weight.shape == (N,):
        sw_h = 0
    elif weight.shape == (H, N):
        sw_h = weight.stride(0)
    else:
        raise ValueError(f"rms_norm kernel: weight must be ({N},) or ({H}, {N}) for x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
        sw_h = weight.stride(0) if weight.dim() == 2 else 0
    # leading dims as (groups, H): a view where their strides allow it (e.g. (B, T) of the fused q/k/v output)
    x3 = _rows3(x, H, N)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if r is None:
        r3, s = x3, None
    else:
        r3, s = _rows3(r, H, N), torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x3.shape[0] * H
    if rows == 0:
        return s, out
    block = triton.next_power_of_2(N)
    per = min(triton.next_power_of_2(rows), max(1, MAX_TILE // block))  # rows per program
    _rms_norm_kernel[(triton.cdiv(rows, per),)](
        x3, weight, out, r3, out if s is None else s, float(eps), 1.0 / N, N, H, rows,
        x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), sw_h,
        ROWS=per, BLOCK=block, BY_RECIPROCAL=x.is_cuda, ROUND=x.dtype != torch.float32,
        BF16_RNE=interpreting() and x.dtype == torch.bfloat16, HAS_RES=r is not None,
        num_warps=4 if per * block <= 2048 else 8,
    )
    return s, out
