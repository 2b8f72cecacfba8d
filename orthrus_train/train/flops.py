"""FLOPs of one training row and MFU against a measured bf16 peak.

Counted (multiply-add = 2 FLOPs), per row of L tokens with N blocks of K:
  * frozen AR forward: 2 * P_layers * L + causal attention 2 * 2 * L^2/2 * d_attn per layer
  * diffusion forward over N*K tokens: 2 * P_layers * N*K + attention: every block query sees its
    anchor's prefix (about L/2 on average) plus K block keys
  * diffusion backward: activation gradients through every layer (2x forward) + weight gradients of the
    twins only (2 * P_twins * N*K) + attention backward (2x its forward)
  * activation recomputation (grad checkpointing): one more diffusion forward
  * loss: student and teacher vocabulary projections + the student gradient (3 * 2 * V * H per supervised token)
P_layers counts the decoder layers' weights the stream passes through (attention of its view + MLP;
for MoE only the active experts). Embeddings are lookups and cost nothing.
"""
from __future__ import annotations

import time

import torch


def layer_params(config, active_only: bool = True) -> tuple[int, int]:
    """(matmul params per token through one layer, attention projection params of one layer)."""
    H = config.hidden_size
    D = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    attn = H * q + 2 * H * kv + q * H
    if getattr(config, "num_experts", None):
        per_expert = 3 * H * config.moe_intermediate_size
        mlp = per_expert * (config.num_experts_per_tok if active_only else config.num_experts) + H * config.num_experts
    else:
        mlp = 3 * H * config.intermediate_size
    return attn + mlp, attn


def row_flops(config, L: int, N: int, K: int, supervised: int, grad_ckpt: bool, medusa: bool = False) -> float:
    layers = config.num_hidden_layers
    per_layer, attn_p = layer_params(config)
    H = config.hidden_size
    D = getattr(config, "head_dim", None) or H // config.num_attention_heads
    d_attn = config.num_attention_heads * D
    V = config.vocab_size
    ar = layers * (2 * per_layer * L + 4 * (L * L / 2) * d_attn)
    loss = 3 * 2 * V * H * supervised
    if medusa:
        heads = 3 * 2 * H * H * supervised
        return ar + loss + heads
    T = N * K
    keys = L / 2 + K
    dif_fwd = layers * (2 * per_layer * T + 4 * T * keys * d_attn)
    dif_bwd = 2 * dif_fwd + layers * 2 * attn_p * T
    recompute = dif_fwd if grad_ckpt else 0.0
    return ar + dif_fwd + dif_bwd + recompute + loss


_PEAK: dict[str, float] = {}


def measured_peak_flops(device: torch.device, dtype=torch.bfloat16, n: int = 8192, iters: int = 20) -> float | None:
    """Dense bf16 matmul throughput of this device (the MFU denominator). None on the CPU."""
    if device.type != "cuda":
        return None
    key = f"{torch.cuda.get_device_name(device)}:{dtype}"
    if key not in _PEAK:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize(device)
        _PEAK[key] = 2 * n ** 3 * iters / (time.perf_counter() - t)
        del a, b
    return _PEAK[key]
