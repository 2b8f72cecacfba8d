"""Tiny models for the eval tests: sharp random backbones whose Orthrus twins are briefly trained, so drafts
are good enough for multi-token acceptance and bad enough that sampling from them is visibly wrong."""
from __future__ import annotations

import torch

from orthrus_train.losses import chunked_distill
from orthrus_train.model import OrthrusModel, build_random, tiny_config

VOCAB, VOCAB_LEN = 128, 120
_CACHE: dict = {}


def trained_model(family: str = "qwen3", K: int = 4, steps: int = 40, seed: int = 0) -> OrthrusModel:
    key = (family, K, steps, seed)
    if key in _CACHE:
        return _CACHE[key]
    torch.manual_seed(seed)
    bb = build_random(tiny_config(family, vocab_size=VOCAB, hidden_size=64, initializer_range=0.2), seed=seed)
    m = OrthrusModel(bb, block_size=K, vocab_len=VOCAB_LEN)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB_LEN, (16, 8), generator=g)
    with torch.no_grad():  # self-distillation data: the backbone writes the responses (greedy)
        for _ in range(40):
            ids = torch.cat([ids, bb(ids).logits[:, -1, :VOCAB_LEN].argmax(-1, keepdim=True)], 1)
    lm = torch.ones_like(ids, dtype=torch.bool)
    lm[:, :8] = False
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3)
    for _ in range(steps):
        out = m.train_outputs(ids, lm, 8, g)
        kl = chunked_distill(out.hs, out.ht, m.lm_weight(), chunk_size=64)[0]
        opt.zero_grad()
        kl.mean().backward()
        opt.step()
    m.eval()
    m.requires_grad_(False)
    _CACHE[key] = m
    return m


def random_prompts(n: int, lengths=(3, 12), seed: int = 0, vocab: int = VOCAB_LEN) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
