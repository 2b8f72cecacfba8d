"""Shared fixtures for the data-stage tests.

Real material lives beside the repository in ../shared (tokenizers, data files); tests that use it skip
with the reason when it is absent. Everything else is built in code: the project's byte tokenizer (ChatML)
and tiny random backbones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

# Tiny models on 2 shared cores: one intra-op thread is ~10x faster than two under contention.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
SHARED = (REPO / "../shared").resolve()
QWEN3_TOKENIZER = SHARED / "models" / "qwen3-tokenizer"
SMOLLM_DIR = SHARED / "models" / "smollm2-135m-instruct"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def need_shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: these tests read real files from ../shared beside the repository")
    return p


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def byte_tok():
    from orthrus_train.model.tiny_tokenizer import build_byte_tokenizer

    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def qwen3_tok():
    need_shared("models", "qwen3-tokenizer", "tokenizer.json")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))


@pytest.fixture(scope="session")
def smollm_tok(tmp_path_factory):
    need_shared("models", "smollm2-135m-instruct", SMOLLM_GGUF + ".part0")
    pytest.importorskip("gguf", reason="loading a GGUF tokenizer needs the `gguf` package")
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("smollm")
    with open(d / SMOLLM_GGUF, "wb") as out:
        for part in sorted(SMOLLM_DIR.glob(SMOLLM_GGUF + ".part*")):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    return AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM_GGUF)


def tiny_backbone(tok, family: str = "llama", seed: int = 0):
    """A tiny random backbone whose vocabulary and eos/pad match `tok`."""
    from orthrus_train.model.backbones import build_random, tiny_config

    cfg = tiny_config(family, vocab_size=len(tok), hidden_size=32, layers=2, heads=4, kv_heads=2,
                      intermediate=64, initializer_range=0.5, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    return build_random(cfg, seed=seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, byte_tok):
    """Byte tokenizer + tiny random Llama saved as one HF folder (what data.model points at)."""
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_backbone(byte_tok).save_pretrained(d)
    byte_tok.save_pretrained(d)
    return d
