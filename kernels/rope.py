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

:func:`rope_kv_write` (``ORTHRUS_DECODE_KV_WRITE=triton``) is the same RoPE fused with the decode passes' K/V
cache write: for the joint q/k tensor x (B, Hq + Hkv, T, D), v (B, Hkv, T, D) and one layer's static cache
slots k_cache, v_cache (B, Hkv, S, D), it returns :func:`apply_rope`'s result (the same bits, the same layout)
and stores its k heads (rows Hq..) and v at the slots ``index[b, 0, t, 0]`` of each row, as
``StaticKVCache.write``'s two ``scatter_`` do: one launch instead of three. The rotation is the same jit helper
as :func:`apply_rope`'s, compiled with the same flags. Rows (b, t, head) run over Hq + 2 Hkv heads: q and k
heads rotated, v heads copied (no arithmetic, bits kept). Where a row's slots repeat (``write_index`` clamps
positions past the last slot onto it, the slack slot no committed token uses) the last position writes the slot,
as the CPU's ``scatter_`` leaves it (CUDA's ``scatter_`` leaves any one of them): the index must be
non-decreasing along t per row, as ``StaticKVCache.write_index`` makes it (the front door does not check: that
would cost a host sync). Given ``norm_weight``, it also runs Qwen3's joint q/k RMSNorm on the q and k heads before
rotating them (the norm kernel's arithmetic; each row's sum of squares is taken once and serves the row and its
roll): norm, RoPE and K/V write in one launch instead of two.
"""

from __future__ import annotations

import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    from orthrus_kernels.rmsnorm import _inv_rms, _scale_rows, _to_bf16_rne

__all__ = ["apply_rope", "rope_kv_write", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TILE = 4096  # elements per program: ROWS * BLOCK <= MAX_TILE (untuned)


if HAS_TRITON:

    @triton.jit
    def _rotate(x, xr, c, s, o_ptr, ROUND: tl.constexpr, BF16_RNE: tl.constexpr):
        """x * c + xr * s (float32 operands) with eager torch's roundings, in o_ptr's element type."""
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
        return o

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
        o = _rotate(x, xr, c, s, o_ptr, ROUND, BF16_RNE)
        tl.store(o_ptr + (b * so_b + h * so_h + t * so_t)[:, None] + cols[None, :], o, mask=ok)

    @triton.jit
    def _rope_kv_kernel(
        x_ptr, v_ptr, c_ptr, s_ptr, o_ptr, kc_ptr, vc_ptr, i_ptr, w_ptr, eps, inv_n, R, H, HQ, HKV, T, D,
        sx_b, sx_h, sx_t, sv_b, sv_h, sv_t, sc_b, sc_t, ss_b, ss_t, so_b, so_h, so_t,
        skc_b, skc_h, skc_s, svc_b, svc_h, svc_s, si_b, si_t, sw_h,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr, BF16_RNE: tl.constexpr,
        NORM: tl.constexpr, BY_RECIPROCAL: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # row = (b * T + t) * (H + HKV) + head
        row_ok = rows < R
        hr = H + HKV
        h = (rows % hr).to(tl.int64)  # 0..HQ-1: q, HQ..H-1: k, H..H+HKV-1: v
        bt = rows // hr
        t = (bt % T).to(tl.int64)
        b = (bt // T).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        col_ok = (cols < D)[None, :]
        # the slot of (b, t), and whether this position writes it (the last one of a run of equal slots)
        slot = tl.load(i_ptr + b * si_b + t * si_t, mask=row_ok, other=0).to(tl.int64)
        nxt = tl.load(i_ptr + b * si_b + tl.minimum(t + 1, T - 1) * si_t, mask=row_ok, other=0).to(tl.int64)
        writes = row_ok & ((t == T - 1) | (nxt != slot))
        # q and k heads: rotated as _rope_kernel does, stored to the output; k heads also to the cache
        okx = (row_ok & (h < H))[:, None] & col_ok
        rolled = (cols + D - D // 2) % D  # x.roll(D // 2, -1)[j] == x[(j - D // 2) mod D]
        xrow = x_ptr + (b * sx_b + h * sx_h + t * sx_t)[:, None]
        x = tl.load(xrow + cols[None, :], mask=okx, other=0.0).to(tl.float32)
        xr = tl.load(xrow + rolled[None, :], mask=okx, other=0.0).to(tl.float32)
        if NORM:  # the joint q/k RMSNorm first (rmsnorm._rms_norm_kernel's arithmetic, weight row h): x and its roll
            rs = _inv_rms(x, eps, inv_n, D, BY_RECIPROCAL)
            wrow = w_ptr + (h * sw_h)[:, None]
            w = tl.load(wrow + cols[None, :], mask=okx, other=0.0).to(tl.float32)
            wr = tl.load(wrow + rolled[None, :], mask=okx, other=0.0).to(tl.float32)
            x = _scale_rows(x, rs, w, o_ptr, ROUND, BF16_RNE).to(tl.float32)
            xr = _scale_rows(xr, rs, wr, o_ptr, ROUND, BF16_RNE).to(tl.float32)
        c = tl.load(c_ptr + (b * sc_b + t * sc_t)[:, None] + cols[None, :], mask=okx, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + (b * ss_b + t * ss_t)[:, None] + cols[None, :], mask=okx, other=0.0).to(tl.float32)
        o = _rotate(x, xr, c, s, o_ptr, ROUND, BF16_RNE)
        tl.store(o_ptr + (b * so_b + h * so_h + t * so_t)[:, None] + cols[None, :], o, mask=okx)
        okk = (writes & (h >= HQ) & (h < H))[:, None] & col_ok
        tl.store(kc_ptr + (b * skc_b + (h - HQ) * skc_h + slot * skc_s)[:, None] + cols[None, :], o, mask=okk)
        # v heads: copied into the cache as they are (no conversion: the bits are kept)
        okv = (writes & (h >= H))[:, None] & col_ok
        vv = tl.load(v_ptr + (b * sv_b + (h - H) * sv_h + t * sv_t)[:, None] + cols[None, :], mask=okv, other=0.0)
        tl.store(vc_ptr + (b * svc_b + (h - H) * svc_h + slot * svc_s)[:, None] + cols[None, :], vv, mask=okv)


def _eager_layout_empty(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor of x's shape and dtype in the layout eager torch gives ``x * cos + ...``: dense, H
    and T in x's memory order where both exceed 1 (the joint q/k view: (B, T, H, D) memory), else contiguous."""
    B, H, T, D = x.shape
    if H > 1 and T > 1 and x.stride(2) > x.stride(1):
        return torch.empty((B, T, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _checked(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, what: str = "rope kernel"):
    """x, cos, sin checked (dtypes, shapes) and made launchable: tables expanded to x's B, last dims contiguous."""
    if not HAS_TRITON:
        raise RuntimeError("orthrus_kernels.rope needs triton")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} supports {SUPPORTED_DTYPES}, got {x.dtype}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise TypeError(f"{what}: cos/sin dtypes {cos.dtype}/{sin.dtype} must be x's dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{what}: x must be (B, H, T, D), got shape {tuple(x.shape)}")
    B, H, T, D = x.shape
    if (cos.dim() != 4 or sin.dim() != 4 or cos.shape[1] != 1 or sin.shape[1] != 1 or cos.shape[-1] != D
            or sin.shape[-1] != D):
        raise ValueError(f"{what}: cos/sin must be (B, 1, T, {D}), got {tuple(cos.shape)}/{tuple(sin.shape)}")
    cos, sin = cos.expand(B, 1, T, D), sin.expand(B, 1, T, D)  # B = 1 tables broadcast over x's B (no copy)
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (x, cos, sin))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``layers.apply_rope(x, cos, sin)`` in one Triton kernel (see the module docstring for the shapes)."""
    out = _eager_layout_empty(x) if x.dim() == 4 else None
    x, cos, sin = _checked(x, cos, sin)
    B, H, T, D = x.shape
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


def rope_kv_write(x: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, index: torch.Tensor, q_heads: int, norm_weight: torch.Tensor | None = None,
                  eps: float = 0.0) -> torch.Tensor:
    """``apply_rope(x, cos, sin)`` (returned) with its k heads (``x[:, q_heads:]``) and ``v`` written into one layer's
    cache slots at ``index``, as ``StaticKVCache.write`` writes them, in one Triton kernel (module docstring).

    x (B, Hq + Hkv, T, D) and cos, sin as :func:`apply_rope` takes them; v (B, Hkv, T, D) in x's dtype, any strides
    with a contiguous last dim; k_cache, v_cache (B, Hkv, S, D) in x's dtype with a contiguous last dim (written in
    place); index (B, 1, T, 1) integer slots in 0..S-1, non-decreasing along T (``StaticKVCache.write_index``).

    norm_weight (Hq + Hkv, D) in x's dtype (Qwen3's joint q/k norm weight, ``layers._JointNormWeight``): x is
    RMS-normed first, row by row with ``eps``, in the same kernel: ``rmsnorm.rms_norm(x, norm_weight, eps)``'s
    arithmetic, so the result equals that norm followed by this RoPE (bit for bit under the interpreter; on a GPU
    up to the order of the float32 sum of squares, as the norm kernel is to torch). One launch fewer per layer and
    pass. The K/V written are the normed, rotated k heads and the plain v."""
    what = "rope_kv_write kernel"
    if x.dim() != 4:
        raise ValueError(f"{what}: x must be (B, H, T, D), got shape {tuple(x.shape)}")
    B, H, T, D = x.shape
    if norm_weight is not None:
        if norm_weight.shape != (H, D):
            raise ValueError(f"{what}: norm_weight must be (Hq + Hkv, D) = {(H, D)}, got {tuple(norm_weight.shape)}")
        if norm_weight.dtype != x.dtype:
            raise TypeError(f"{what}: norm_weight dtype {norm_weight.dtype} must be x's dtype {x.dtype}")
        if norm_weight.stride(-1) != 1:
            norm_weight = norm_weight.contiguous()
    hkv = H - q_heads
    if not 0 < q_heads < H:
        raise ValueError(f"{what}: q_heads must be in 1..{H - 1} for x of {H} heads, got {q_heads}")
    if v.shape != (B, hkv, T, D):
        raise ValueError(f"{what}: v must be {(B, hkv, T, D)} (x's k heads), got {tuple(v.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[:2] != (B, hkv) or c.shape[3] != D:
            raise ValueError(f"{what}: {name} must be ({B}, {hkv}, S, {D}), got {tuple(c.shape)}")
        if c.stride(-1) != 1:
            raise ValueError(f"{what}: {name} must have a contiguous last dim (it is written in place)")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != x.dtype:
            raise TypeError(f"{what}: {name} dtype {t.dtype} must be x's dtype {x.dtype}")
    if index.shape != (B, 1, T, 1) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: index must be ({B}, 1, {T}, 1) int64/int32 slots, got {tuple(index.shape)} "
                         f"{index.dtype}")
    out = _eager_layout_empty(x)
    x, cos, sin = _checked(x, cos, sin, what)
    if v.stride(-1) != 1:
        v = v.contiguous()
    rows = B * T * (H + hkv)
    if rows == 0 or D == 0:
        return out
    block = triton.next_power_of_2(D)
    per = min(triton.next_power_of_2(rows), max(1, MAX_TILE // block))  # rows per program
    norm = norm_weight is not None
    _rope_kv_kernel[(triton.cdiv(rows, per),)](
        x, v, cos, sin, out, k_cache, v_cache, index, norm_weight if norm else x, float(eps), 1.0 / D, rows, H,
        q_heads, hkv, T, D,
        x.stride(0), x.stride(1), x.stride(2), v.stride(0), v.stride(1), v.stride(2),
        cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2), out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), index.stride(0), index.stride(2), norm_weight.stride(0) if norm else 0,
        ROWS=per, BLOCK=block, ROUND=x.dtype != torch.float32,
        BF16_RNE=interpreting() and x.dtype == torch.bfloat16, NORM=norm, BY_RECIPROCAL=x.is_cuda,
        num_warps=4 if per * block <= 2048 else 8, enable_fp_fusion=False,
    )
    return out
