"""Attention visibility rules, in one place.

Training (dual-pass mask): the diffusion stream holds N blocks of K queries per row; block n has
anchor a_n. Keys are [AR keys of the row (L)] ++ [diffusion keys (N*K)]. A block query sees AR key j
iff j < a_n (strictly before its anchor; the anchor token itself is the block's first diffusion
token) and diffusion key j' iff j' is in the same block (bidirectional inside the block).

Decoding, static cache of S slots with per-row committed length `lengths[b]`:
  * draft:  block queries see cache slot j iff j < lengths[b], and all K keys of their block;
  * AR (prefill/verify): the pass first writes its K/V at lengths[b] + t; query t sees slot j iff
    j <= lengths[b] + t (the committed prefix plus the causal part of its own block).
"""
from __future__ import annotations

import torch


def dual_pass_mask_dense(anchors: torch.Tensor, L: int, K: int, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, 1, N*K, L + N*K) mask, True = may attend. Reference and CPU path.
    With `segment_ids` (packed rows), AR keys must also belong to the anchor's document."""
    B, N = anchors.shape
    dev = anchors.device
    q_block = torch.arange(N * K, device=dev) // K  # (NK,)
    limit = anchors[:, q_block]  # (B, NK): AR keys must be < anchor of the query's block
    ar = torch.arange(L, device=dev)[None, None, :] < limit[:, :, None]  # (B, NK, L)
    if segment_ids is not None:
        q_seg = segment_ids.gather(1, limit)  # (B, NK)
        ar &= segment_ids[:, None, :] == q_seg[:, :, None]
    same = (q_block[:, None] == q_block[None, :])  # (NK, NK)
    diff = same[None].expand(B, -1, -1)
    return torch.cat([ar, diff], dim=-1)[:, None]


def dual_pass_block_mask(anchors: torch.Tensor, L: int, K: int, heads: int, block: int = 128,
                         segment_ids: torch.Tensor | None = None):
    """The same rule as a FlexAttention BlockMask (sparse: blocks past every anchor are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, N = anchors.shape
    anchors = anchors.contiguous()
    seg = segment_ids.contiguous() if segment_ids is not None else None

    def rule(b, h, q, kv):
        n = q // K
        is_ar = kv < L
        a = anchors[b, n]
        ar_ok = is_ar & (kv < a)
        if seg is not None:
            ar_ok = ar_ok & (seg[b, kv.clamp(max=L - 1)] == seg[b, a])
        return ar_ok | (~is_ar & ((kv - L) // K == n))

    return create_block_mask(rule, B=B, H=None, Q_LEN=N * K, KV_LEN=L + N * K, BLOCK_SIZE=block,
                             device=anchors.device)


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) for the AR pass over packed rows: causal, and only within the query's document."""
    L = segment_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def draft_cached_mask(lengths: torch.Tensor, S: int, K: int) -> torch.Tensor:
    """(B, 1, K, S): the draft block written into the cache at slots lengths..lengths+K-1 sees the committed
    prefix and the whole block."""
    return (torch.arange(S, device=lengths.device)[None, :] < (lengths + K)[:, None])[:, None, None, :].expand(
        lengths.shape[0], 1, K, S)


def cached_causal_mask(lengths: torch.Tensor, S: int, T: int) -> torch.Tensor:
    """(B, 1, T, S): query t (at position lengths+t) sees slots j <= lengths + t."""
    qpos = lengths[:, None] + torch.arange(T, device=lengths.device)[None, :]  # (B, T)
    return (torch.arange(S, device=lengths.device)[None, None, :] <= qpos[:, :, None])[:, None]
