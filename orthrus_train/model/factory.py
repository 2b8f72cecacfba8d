"""Build the backbone, tokenizer and draft model a config describes (used by every stage)."""
from __future__ import annotations

from pathlib import Path

import torch

from .backbones import build_random, load_backbone, load_tokenizer, qwen3_shape, tiny_config
from .orthrus import DraftModel, build_draft_model

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def tokenizer_for(cfg, run_tokenizer_dir: Path | None = None):
    """The tokenizer of the run: the model's own, or for random tiny backbones the byte tokenizer
    (written to the run folder so every stage and the export use the same files)."""
    m = cfg.model
    if run_tokenizer_dir is not None and (run_tokenizer_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(run_tokenizer_dir))
    if m.tokenizer:
        tok = load_tokenizer(m.tokenizer, key="model.tokenizer")
    elif m.init == "random":
        if m.shape != "tiny":
            return None  # a planning run: no tokenizer needed
        from .tiny_tokenizer import build_byte_tokenizer
        tok = build_byte_tokenizer()
    else:
        tok = load_tokenizer(m.path, revision=m.revision)
    if run_tokenizer_dir is not None:
        tok.save_pretrained(str(run_tokenizer_dir))
    return tok


def build_backbone(cfg, device: torch.device | str = "cpu"):
    m = cfg.model
    dtype = DTYPES[m.dtype]
    if m.init == "random":
        if m.shape == "tiny":
            t = m.tiny
            config = tiny_config(t.family, vocab_size=t.vocab_size, hidden_size=t.hidden_size, layers=t.layers,
                                 heads=t.heads, kv_heads=t.kv_heads, intermediate=t.intermediate,
                                 initializer_range=t.initializer_range,
                                 max_positions=max(2048, cfg.train.seq_len + 64))
        else:
            config = qwen3_shape(m.shape)
        config._attn_implementation = "sdpa"
        return build_random(config, dtype=dtype, seed=cfg.train.seed, device=device)
    return load_backbone(m.path, dtype=dtype, revision=m.revision, device=str(device))


def build_model(cfg, backbone, tokenizer) -> DraftModel:
    h = cfg.heads
    backend = h.attn_backend
    if backend == "auto":
        backend = "flex" if next(backbone.parameters()).is_cuda else "sdpa"
    vocab_len = len(tokenizer) if tokenizer is not None else None
    kw = dict(block_size=h.block_size, mask_token_id=cfg.model.mask_token_id, vocab_len=vocab_len,
              force_mask_token_id=cfg.model.force_mask_token_id, attn_backend=backend,
              grad_checkpointing=cfg.train.grad_checkpointing)
    if h.type == "orthrus":
        kw["trainable"] = tuple(h.trainable)
    return build_draft_model(h.type, backbone, **kw)
