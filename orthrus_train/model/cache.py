"""A static KV cache with per-row committed lengths.

Fixed shapes (S slots per row, allocated once) so the draft and verify passes can be captured as
CUDA graphs. "Cropping" after a verify pass is only a change of `lengths`: slots past a row's length
are never read (see `masks.py`) and are overwritten by the next pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerSlots:
    """Where one layer of a cached pass writes its new keys and values: the layer's static cache K and V
    (B, Hkv, S, D) and the pass's write index (B, 1, T, 1) (`StaticKVCache.write_index`, the same for every layer).
    The decode passes hand it to the layer step (`layers.project_qkv`), which writes right after the RoPE: with
    `write`, or with the RoPE kernel itself (`layers.set_decode_kv_write`)."""
    k: torch.Tensor
    v: torch.Tensor
    index: torch.Tensor

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write (B, Hkv, T, D) at slots index[b, 0, t, 0]: one `scatter_` for K, one for V."""
        B, H, T, D = k_new.shape
        idx = self.index.expand(B, H, T, D)
        self.k.scatter_(2, idx, k_new.to(self.k.dtype))
        self.v.scatter_(2, idx, v_new.to(self.v.dtype))


@dataclass
class StaticKVCache:
    k: list[torch.Tensor]  # per layer (B, Hkv, S, D)
    v: list[torch.Tensor]
    lengths: torch.Tensor  # (B,) long: committed tokens per row

    @classmethod
    def allocate(cls, layers: int, batch: int, kv_heads: int, slots: int, head_dim: int,
                 dtype=torch.float32, device="cpu") -> "StaticKVCache":
        shape = (batch, kv_heads, slots, head_dim)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   lengths=torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    def write_index(self, T: int) -> torch.Tensor:
        """(B, 1, T, 1) slots lengths[b] .. lengths[b]+T-1 (clamped to the last slot, which callers keep as
        slack: it is never a committed position). The same for every layer: a pass computes it once."""
        idx = (self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]).clamp_(max=self.slots - 1)
        return idx[:, None, :, None]

    def layer_slots(self, layer: int, index: torch.Tensor) -> LayerSlots:
        """Layer `layer`'s slots at `index` (`write_index(T)`)."""
        return LayerSlots(self.k[layer], self.v[layer], index)

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write (B, Hkv, T, D) at slots lengths[b] .. lengths[b]+T-1 (`write_index(T)`, if not given)."""
        self.layer_slots(layer, self.write_index(k_new.shape[2]) if index is None else index).write(k_new, v_new)

    def reset(self) -> None:
        self.lengths.zero_()
