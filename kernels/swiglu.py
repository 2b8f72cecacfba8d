"""The SwiGLU product of the decode passes' MLP in one kernel (``ORTHRUS_DECODE_MLP=triton``).

``orthrus_train.model.layers.mlp_out`` (decode, fused gate/up projection) computes ``act(g) * u`` on the two halves
of the gate/up output: for SiLU, 2 eager kernels (silu, mul) per layer and pass; the decode steps are
launch-bound, so :func:`silu_mul` does the same arithmetic in one kernel, with eager torch's roundings:

* silu as torch computes it, in float32 (its opmath type for 16-bit inputs too): ``g / (1 + exp(-g))``, the
  division correctly rounded (``div_rn``; Triton's plain ``/`` is an approximate division on CUDA), exp the CUDA
  math library's ``expf`` (libdevice ``exp``, what torch's CUDA silu kernel calls), then rounded to g's dtype once
  (16-bit: the first rounding);
* the product with u as torch's multiply: float32 operands, product rounded to the dtype once (16-bit: exact in
  float32, so one correctly rounded product, the second rounding; float32: the plain product).

Compiled with ``enable_fp_fusion=False`` (no fused multiply-add anywhere). Where exp is the same function as
torch's, the result is torch's bit for bit. On a CPU the Triton interpreter's exp is numpy's, not torch's (Sleef):
bfloat16 is still bit-identical for every normal gate value and zero (an exhaustive test; the interpreter (Triton
3.9) widens bfloat16 subnormals to wrong float32 values, a bug of its own that compiled kernels do not have),
float16 differs from torch's CPU silu in the last bit for 3 of the 63,488 finite gate values, float32 by a few
ulps where the two exps differ. On
CUDA, libdevice's expf is the CUDA math library's (torch's CUDA silu): designed to be bit-identical, not checked
on a GPU yet (the "auto" probe checks bfloat16 exactly over every gate value and float32 within float32's
tolerance on the device before taking the kernel).

Shapes: g and u of one shape (..., N), one dtype, each with a contiguous last dim and any strides for the leading
dims (the two halves of the fused gate/up output are strided views); returns a new contiguous tensor of that shape
and dtype (what eager ``silu(g) * u`` returns for such views). A program computes BLOCK columns (at most MAX_BLOCK)
of ROWS rows (ROWS * BLOCK <= MAX_TILE; the values measured below).

Under the Triton interpreter (CPU tests) the float32 -> bfloat16 casts are rounded to nearest even by hand
(``rmsnorm._to_bf16_rne``): the interpreter's cast truncates.
"""

from __future__ import annotations

import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from orthrus_kernels.rmsnorm import _to_bf16_rne

__all__ = ["silu_mul", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns per program and elements per program (ROWS * BLOCK <= MAX_TILE). Measured on an H200 (session 19,
# `scripts/sweep_decode_kernels.py`, bfloat16, per call inside a CUDA graph): 512 / 512 against the first 1024 /
# 4096, SmolLM2's 16 rows 1.5 us against 6.0 (eager silu + mul: 4.5), its 256 rows 1.9 against 6.1, Qwen3-8B's
# one row 1.4 against 1.6: small programs, many of them, for this latency-bound elementwise work.
MAX_BLOCK = 512
MAX_TILE = 512


if HAS_TRITON:

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, R, N, n_blocks, sg_r, su_r, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr, ROUND: tl.constexpr, BF16_RNE: tl.constexpr, LIBDEVICE: tl.constexpr):
        pid = tl.program_id(0)
        rows = (pid // n_blocks) * ROWS + tl.arange(0, ROWS)
        cols = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        ok = (rows < R)[:, None] & (cols < N)[None, :]
        rows = rows.to(tl.int64)[:, None]
        g = tl.load(g_ptr + rows * sg_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rows * su_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if LIBDEVICE:  # the CUDA math library's expf (torch's CUDA silu); the interpreter has no libdevice
            e = libdevice.exp(-g)
        else:  # the interpreter: numpy's exp
            e = tl.exp(-g)
        s = tl.div_rn(g, 1.0 + e)  # torch's silu, in float32
        if ROUND:  # 16-bit: silu rounded to the dtype (torch's silu output), widened again for the product
            if BF16_RNE:
                s = _to_bf16_rne(s).to(tl.float32)
            else:
                s = s.to(o_ptr.dtype.element_ty).to(tl.float32)
        o = s * u
        if BF16_RNE:
            o = _to_bf16_rne(o)
        else:
            o = o.to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + rows * N + cols[None, :], o, mask=ok)


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """t (..., N) as (rows, N) with a contiguous last dim: a view where its strides allow it."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, N)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``F.silu(g) * u`` in one Triton kernel (see the module docstring for the roundings and shapes)."""
    if not HAS_TRITON:
        raise RuntimeError("orthrus_kernels.swiglu needs triton")
    if g.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"silu_mul kernel supports {SUPPORTED_DTYPES}, got {g.dtype}")
    if u.dtype != g.dtype:
        raise TypeError(f"silu_mul kernel: u dtype {u.dtype} must be g's dtype {g.dtype}")
    if u.shape != g.shape or g.dim() == 0:
        raise ValueError(f"silu_mul kernel: g and u must have one shape (..., N), got {tuple(g.shape)} and "
                         f"{tuple(u.shape)}")
    N = g.shape[-1]
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if out.numel() == 0:
        return out
    g2, u2 = _rows(g, N), _rows(u, N)
    rows = g2.shape[0]
    block = min(MAX_BLOCK, triton.next_power_of_2(N))
    per = min(triton.next_power_of_2(rows), max(1, MAX_TILE // block))  # rows per program
    n_blocks = triton.cdiv(N, block)
    _silu_mul_kernel[(triton.cdiv(rows, per) * n_blocks,)](
        g2, u2, out, rows, N, n_blocks, g2.stride(0), u2.stride(0), ROWS=per,
        BLOCK=block, ROUND=g.dtype != torch.float32, BF16_RNE=interpreting() and g.dtype == torch.bfloat16,
        LIBDEVICE=not interpreting(),
        num_warps=4, enable_fp_fusion=False,
    )
    return out
