"""RoPE of the decode passes in one kernel (``ORTHRUS_DECODE_ROPE=triton``).

``orthrus_train.model.layers.apply_rope`` is ``x * cos + x.roll(D // 2, -1) * sin`` (sin with the rotate_half
sign folded in: ``layers.rope_tables``): 4 eager kernels (mul, roll, mul, add); the decode steps are
launch-bound, so :func:`apply_rope` does the same arithmetic in one kernel, with eager torch's roundings: each
product rounded to x's dtype (16-bit factors: the float32 product is exact, so this is one correctly rounded
product, as torch's 16-bit multiply), then the float32 sum of the two rounded products rounded to x's dtype
once more (float32: two products and an add, each rounded to float32; never a fused multiply-add: the kernel
is compiled with ``enable_fp_fusion=False``, as two separate eager kernels cannot fuse). Bit-identical to
``layers.apply_rope`` in float32, bfloat16 and float16.

Shapes: x (B, H, T, D) with a contiguous last dim and any strides for B, H and T (e.g. the joint q/k view
``qk.transpose(1, 2)`` of the fused projection output in ``layers.project_qkv``); cos, sin (B, 1, T, D) in x's
dtype, broadcast over H (expanded or strided views are read in place; B = 1 broadcasts over x's B). The output
is a new tensor of x's shape and dtype in the layout eager torch gives the same expression (dense, in x's
memory order of H and T where both exceed 1, else contiguous): downstream code sees the strides it sees with
"torch". BLOCK = next power of two of D; a program rotates ROWS rows (ROWS * BLOCK <= MAX_TILE), taken in
(B, T, H) order so that the heads of one position share their cos/sin row.

Under the Triton interpreter (CPU tests) the float32 -> bfloat16 casts are rounded to nearest even by hand
(``rmsnorm._to_bf16_rne``, shared): the interpreter's cast truncates.
"""

from __future__ import annotations

import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    from orthrus_kernels.rmsnorm import _to_bf16_rne

__all__ = ["apply_rope", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TILE = 4096  # elements per program: ROWS * BLOCK <= MAX_TILE (untuned)


if HAS_TRITON:

    @triton.jit
    def _rope_kernel(
        x_ptr, c_ptr, s_ptr, o_ptr, R, H, T, D,
        sx_b, sx_h, sx_t, sc_b, sc_t, ss_b, ss_t, so_b, so_h, so_t,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr, BF16_RNE: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row = (b * T + t) * H + h
        row_ok = rows < R
        h = (rows % H).to(tl.int64)
        bt = rows // H
        t = (bt % T).to(tl.int64)
        b = (bt // T).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = row_ok[:, None] & (cols < D)[None, :]
        rolled = (cols + D - D // 2) % D  # x.roll(D // 2, -1)[j] == x[(j - D // 2) mod D]
        xrow = x_ptr + (b * sx_b + h * sx_h + t * sx_t)[:, None]
        x = tl.load(xrow + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        xr = tl.load(xrow + rolled[None, :], mask=ok, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + (b * sc_b + t * sc_t)[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + (b * ss_b + t * ss_t)[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        p = x * c
        q = xr * s
        if ROUND:  # 16-bit x: each product rounded to x's dtype (exact in float32, so rounded once), as eager
            if BF16_RNE:
                p = _to_bf16_rne(p).to(tl.float32)
                q = _to_bf16_rne(q).to(tl.float32)
            else:
                p = p.to(o_ptr.dtype.element_ty).to(tl.float32)
                q = q.to(o_ptr.dtype.element_ty).to(tl.float32)
        o = p + q  # float32 add (of the rounded products), rounded to x's dtype once
        if BF16_RNE:
            o = _to_bf16_rne(o)
        else:
            o = o.to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + (b * so_b + h * so_h + t * so_t)[:, None] + cols[None, :], o, mask=ok)


def _eager_layout_empty(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor of x's shape and dtype in the layout eager torch gives ``x * cos + ...``: dense, H
    and T in x's memory order where both exceed 1 (the joint q/k view: (B, T, H, D) memory), else contiguous."""
    B, H, T, D = x.shape
    if H > 1 and T > 1 and x.stride(2) > x.stride(1):
        return torch.empty((B, T, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``layers.apply_rope(x, cos, sin)`` in one Triton kernel (see the module docstring for the shapes)."""
    if not HAS_TRITON:
        raise RuntimeError("orthrus_kernels.rope needs triton")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rope kernel supports {SUPPORTED_DTYPES}, got {x.dtype}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise TypeError(f"rope kernel: cos/sin dtypes {cos.dtype}/{sin.dtype} must be x's dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"rope kernel: x must be (B, H, T, D), got shape {tuple(x.shape)}")
    B, H, T, D = x.shape
    if cos.dim() != 4 or sin.dim() != 4 or cos.shape[1] != 1 or sin.shape[1] != 1:
        raise ValueError(f"rope kernel: cos/sin must be (B, 1, T, D), got {tuple(cos.shape)}/{tuple(sin.shape)}")
    cos, sin = cos.expand(B, 1, T, D), sin.expand(B, 1, T, D)  # B = 1 tables broadcast over x's B (no copy)
    out = _eager_layout_empty(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    rows = B * H * T
    if rows == 0 or D == 0:
        return out
    block = triton.next_power_of_2(D)
    per = min(triton.next_power_of_2(rows), max(1, MAX_TILE // block))  # rows per program
    _rope_kernel[(triton.cdiv(rows, per),)](
        x, cos, sin, out, rows, H, T, D,
        x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        ROWS=per, BLOCK=block, ROUND=x.dtype != torch.float32,
        BF16_RNE=interpreting() and x.dtype == torch.bfloat16,
        num_warps=4 if per * block <= 2048 else 8, enable_fp_fusion=False,
    )
    return out
