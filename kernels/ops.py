"""The decode kernels as torch custom ops (``torch.ops.orthrus.*``), for compiled decode steps.

Dynamo traces Python: the kernels' front doors (shape checks, grid arithmetic, the launch) are plain Python
that it would try to trace, and anything it cannot (an import, a cached lookup, the Triton interpreter on a
CPU) breaks the graph; a break inside a decode layer then compiles every layer as its own frame and runs into
the recompile limit (session 9, docs/benchmarks.md). As custom ops the kernels are one opaque node each, with a
fake implementation that gives the output's shape, dtype and strides. `orthrus_train.model.layers` calls these
while compiling and the front doors directly otherwise (the eager path stays as it was).
"""

from typing import Optional

import torch

from orthrus_kernels import decode_attn, lm_head_argmax as _lm_head_argmax, rmsnorm, rope, swiglu


@torch.library.custom_op("orthrus::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rmsnorm.rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("orthrus::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm.add_rms_norm(x, r, weight, eps)


@add_rms_norm.register_fake
def _(x, r, weight, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


@torch.library.custom_op("orthrus::apply_rope", mutates_args=())
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope.apply_rope(x, cos, sin)


@apply_rope.register_fake
def _(x, cos, sin):
    return rope._eager_layout_empty(x)


@torch.library.custom_op("orthrus::rope_kv_write", mutates_args=("k_cache", "v_cache"))
def rope_kv_write(x: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, index: torch.Tensor, q_heads: int, norm_weight: Optional[torch.Tensor] = None,
                  eps: float = 0.0) -> torch.Tensor:
    return rope.rope_kv_write(x, v, cos, sin, k_cache, v_cache, index, q_heads, norm_weight, eps)


@rope_kv_write.register_fake
def _(x, v, cos, sin, k_cache, v_cache, index, q_heads, norm_weight=None, eps=0.0):
    return rope._eager_layout_empty(x)


@torch.library.custom_op("orthrus::silu_mul", mutates_args=())
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return swiglu.silu_mul(g, u)


@silu_mul.register_fake
def _(g, u):
    return torch.empty(g.shape, dtype=g.dtype, device=g.device)


@torch.library.custom_op("orthrus::live_lengths", mutates_args=())
def live_lengths(mask: torch.Tensor) -> torch.Tensor:
    return decode_attn.live_lengths(mask)


@live_lengths.register_fake
def _(mask):
    return torch.empty(mask.shape[0], dtype=torch.int32, device=mask.device)


@torch.library.custom_op("orthrus::live_attention", mutates_args=())
def live_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kv_len: torch.Tensor,
                   scale: float, splits: Optional[int] = None) -> torch.Tensor:
    return decode_attn.live_attention(q, k, v, mask, kv_len, scale, splits)


@live_attention.register_fake
def _(q, k, v, mask, kv_len, scale, splits=None):
    B, Hq, T, D = q.shape
    return torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)


@torch.library.custom_op("orthrus::lm_head_argmax", mutates_args=())
def lm_head_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _lm_head_argmax.lm_head_argmax(hidden, weight)


@lm_head_argmax.register_fake
def _(hidden, weight):
    return torch.empty(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
