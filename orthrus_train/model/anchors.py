"""Anchor sampling and the map from (block, offset) to supervised targets.

Block position i of the block anchored at a proposes x_{a+i+1}; its teacher is the AR distribution
at row position a+i. It is supervised iff 0 <= i <= K-2, a+i+1 < L and loss_mask[a+i+1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def sample_anchors(loss_mask: torch.Tensor, n_anchors: int, generator: torch.Generator | None = None):
    """Uniformly without replacement among positions a >= 1 whose next token is a response token.

    Returns anchors (B, N) long (sorted; invalid slots hold 0) and valid (B, N) bool. Anchors start
    at 1 so that the Medusa baseline (which drafts from the hidden state at a-1) sees the same blocks.
    """
    B, L = loss_mask.shape
    scores = torch.rand(B, L, generator=generator, device="cpu").to(loss_mask.device)
    return _select_anchors(loss_mask, scores, n_anchors)


def sample_anchors_seeded(loss_mask: torch.Tensor, n_anchors: int, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_anchors` of each row b alone with its own generator seeded `seeds[b]`, in one batched
    selection: row b gets exactly the anchors of `sample_anchors(loss_mask[b:b+1], n, Generator().manual_seed(
    seeds[b]))`, so a row's anchors depend on its seed only, not on the micro-batch it is in."""
    L = loss_mask.shape[1]
    scores = torch.stack([torch.rand(L, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return _select_anchors(loss_mask, scores.to(loss_mask.device), n_anchors)


def _select_anchors(loss_mask: torch.Tensor, scores: torch.Tensor, n_anchors: int):
    B, L = loss_mask.shape
    cand = torch.zeros(B, L, dtype=torch.bool, device=loss_mask.device)
    cand[:, 1:L - 1] = loss_mask[:, 2:].bool()
    scores = scores.masked_fill(~cand, -1.0)
    n = min(n_anchors, L)
    top, idx = scores.topk(n, dim=1)
    valid = top >= 0
    anchors = torch.where(valid, idx, torch.zeros_like(idx))
    # sort valid anchors ascending (deterministic layout; invalid ones at the end)
    key = torch.where(valid, anchors, torch.full_like(anchors, L + 1))
    key, order = key.sort(dim=1)
    anchors, valid = anchors.gather(1, order), valid.gather(1, order)
    return anchors, valid


@dataclass
class Supervision:
    batch: torch.Tensor  # (T,) row index
    block: torch.Tensor  # (T,) block index n
    offset: torch.Tensor  # (T,) i in [0, K-2]
    teacher_pos: torch.Tensor  # (T,) a+i: where the teacher distribution is read
    stream_pos: torch.Tensor  # (T,) n*K+i: where the student hidden state is read

    @property
    def count(self) -> int:
        return int(self.batch.numel())

    def apply(self, fn) -> "Supervision":
        """The same map with `fn` applied to each of its tensors (e.g. a copy to the device)."""
        return Supervision(*(fn(getattr(self, f)) for f in ("batch", "block", "offset", "teacher_pos", "stream_pos")))


def supervision(anchors: torch.Tensor, valid: torch.Tensor, loss_mask: torch.Tensor, K: int,
                segment_ids: torch.Tensor | None = None) -> Supervision:
    """With `segment_ids` (packed rows) a target must also lie in the anchor's document."""
    B, N = anchors.shape
    L = loss_mask.shape[1]
    i = torch.arange(K - 1, device=anchors.device)
    tgt = anchors[:, :, None] + i[None, None, :] + 1  # (B, N, K-1): index of the proposed token
    ok = valid[:, :, None] & (tgt < L)
    tgt_c = tgt.clamp(max=L - 1).view(B, -1)
    ok &= loss_mask.bool().gather(1, tgt_c).view(B, N, K - 1)
    if segment_ids is not None:
        ok &= (segment_ids.gather(1, tgt_c).view(B, N, K - 1) == segment_ids.gather(1, anchors)[:, :, None])
    b, n, off = ok.nonzero(as_tuple=True)
    a = anchors[b, n]
    return Supervision(batch=b, block=n, offset=off, teacher_pos=a + off, stream_pos=n * K + off)
