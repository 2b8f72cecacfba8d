"""One decoder-layer step for either view, built from the backbone's own public modules.

`view="ar"` uses the frozen projections (`q_proj`, ...); `view="diff"` uses the twins
(`q_proj_diff`, ...). Layer norms, the MLP (dense or MoE) and the residual stream are shared. The
attention itself is supplied by the caller (`attend`), because the AR pass, the training diffusion
pass and the two decode passes differ only in which keys they see.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, T, D) as produced by the backbone's rotary module."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def project_qkv(attn, h: torch.Tensor, view: str, cos, sin):
    """q (B, Hq, T, D), k and v (B, Hkv, T, D): post-norm, post-RoPE, exactly as the backbone does."""
    sfx = "" if view == "ar" else "_diff"
    B, T, _ = h.shape
    D = attn.head_dim
    q = getattr(attn, "q_proj" + sfx)(h).view(B, T, -1, D)
    k = getattr(attn, "k_proj" + sfx)(h).view(B, T, -1, D)
    v = getattr(attn, "v_proj" + sfx)(h).view(B, T, -1, D)
    if hasattr(attn, "q_norm"):
        q = getattr(attn, "q_norm" + sfx)(q)
        k = getattr(attn, "k_norm" + sfx)(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def sdpa(q, k, v, mask: torch.Tensor | None, scale: float, causal: bool = False):
    """Scaled dot-product attention with grouped KV heads (no copy of K/V per query group).
    mask: bool, True = attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


_compiled_flex = None


def flex(q, k, v, block_mask, scale: float):
    """FlexAttention (compiled on CUDA; the unfused path on the CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def mlp_out(layer, h: torch.Tensor) -> torch.Tensor:
    out = layer.mlp(h)
    return out[0] if isinstance(out, tuple) else out  # older MoE blocks also return router logits


def layer_step(layer, h: torch.Tensor, cos, sin, view: str,
               attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    """Residual block of one decoder layer. `attend(q, k, v) -> (B, Hq, T, D)` sees this layer's
    own new keys/values and decides what else (cached AR keys) to attend to."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q, k, v = project_qkv(attn, x, view, cos, sin)
    o = attend(q, k, v)
    B, T = h.shape[:2]
    o = o.transpose(1, 2).reshape(B, T, -1)
    h = h + getattr(attn, "o_proj" + ("" if view == "ar" else "_diff"))(o)
    return h + mlp_out(layer, layer.post_attention_layernorm(h))
