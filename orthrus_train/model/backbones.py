"""Backbone families we can attach Orthrus heads to, how to load them, and tiny random configs.

We hook into `transformers` models through their public modules only (`model.embed_tokens`,
`model.layers[i].self_attn.{q,k,v,o}_proj`, `q_norm`/`k_norm`, `input_layernorm`, `mlp`,
`post_attention_layernorm`, `model.norm`, `model.rotary_emb`, `lm_head`). Every family listed here
has exactly that module tree; anything else is refused with an error naming the supported ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import exc_line


@dataclass(frozen=True)
class Family:
    name: str
    qk_norm: bool  # Qwen3 normalizes q and k per head before RoPE; the twins get their own norms
    config_class: str  # transformers config class, for tiny random configs


FAMILIES: dict[str, Family] = {
    "qwen3": Family("qwen3", qk_norm=True, config_class="Qwen3Config"),
    "qwen3_moe": Family("qwen3_moe", qk_norm=True, config_class="Qwen3MoeConfig"),
    "qwen2": Family("qwen2", qk_norm=False, config_class="Qwen2Config"),
    "llama": Family("llama", qk_norm=False, config_class="LlamaConfig"),
}


class UnsupportedBackbone(ValueError):
    pass


def family_of(config) -> Family:
    """The family of a backbone config, or a clear refusal."""
    mt = getattr(config, "model_type", None)
    if mt == "orthrus":
        mt = getattr(config, "backbone_model_type", "qwen3")
    if mt not in FAMILIES:
        raise UnsupportedBackbone(
            f"backbone model_type {mt!r} is not supported; supported families: "
            f"{', '.join(sorted(FAMILIES))} (Qwen3 dense, Qwen3-MoE, Qwen2/Qwen2.5, Llama incl. SmolLM2)"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedBackbone(
            f"backbone uses layer types {sorted(set(layer_types))}; Orthrus heads are implemented for "
            "full-attention layers only (set use_sliding_window=false in the backbone config)"
        )
    return FAMILIES[mt]


def tiny_config(family: str = "qwen3", vocab_size: int = 512, hidden_size: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate: int = 128, max_positions: int = 2048,
                tie: bool = True, **extra):
    """A tiny random config of a supported family, for tests and the CPU demo."""
    import transformers

    fam = FAMILIES[family]
    cls = getattr(transformers, fam.config_class)
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
              max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if family in ("qwen3", "qwen3_moe"):
        kw["head_dim"] = hidden_size // heads
    if family == "qwen3_moe":
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate // 2,
                  decoder_sparse_step=1, mlp_only_layers=[])
    kw.update(extra)
    cfg = cls(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def qwen3_shape(name: str, vocab_size: int = 151936):
    """Published Qwen3 shapes (random weights are fine for memory and speed planning)."""
    import transformers

    shapes = {
        "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                           intermediate_size=3072, head_dim=128, tie_word_embeddings=True),
        "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                           intermediate_size=6144, head_dim=128, tie_word_embeddings=True),
        "qwen3-4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=9728, head_dim=128, tie_word_embeddings=True),
        "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=12288, head_dim=128, tie_word_embeddings=False),
        "qwen3-14b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                          intermediate_size=17408, head_dim=128, tie_word_embeddings=False),
        "qwen3-32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                          intermediate_size=25600, head_dim=128, tie_word_embeddings=False),
        # 72B class: the shape of Qwen2.5-72B with Qwen3's q/k norms (no Qwen3-72B checkpoint is published)
        "qwen3-72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          intermediate_size=29568, head_dim=128, tie_word_embeddings=False),
    }
    if name == "qwen3-30b-a3b":
        return transformers.Qwen3MoeConfig(
            vocab_size=vocab_size, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
            num_experts=128, num_experts_per_tok=8, max_position_embeddings=40960, tie_word_embeddings=False,
            rope_theta=1e6, rms_norm_eps=1e-6)
    if name not in shapes:
        raise KeyError(f"unknown Qwen3 shape {name!r}; known: {sorted(shapes) + ['qwen3-30b-a3b']}")
    return transformers.Qwen3Config(vocab_size=vocab_size, max_position_embeddings=40960, rope_theta=1e6,
                                    rms_norm_eps=1e-6, **shapes[name])


def build_random(config, dtype=torch.float32, seed: int = 0, device="cpu"):
    """A backbone with random weights (tests, the CPU demo, memory/throughput planning)."""
    from transformers import AutoModelForCausalLM

    family_of(config)
    torch.manual_seed(seed)
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_backbone(path: str, dtype=torch.bfloat16, gguf_file: str | None = None, revision: str | None = None,
                  device: str | None = None, local_files_only: bool | None = None):
    """Load a frozen backbone from a local folder, a Hub id, or a GGUF file (dequantized).

    `path` may point straight at a `.gguf` file; then the folder and file name are split for
    transformers' GGUF loader. Returns the model in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {}
    p = Path(os.path.expanduser(path))
    if gguf_file is None and p.suffix == ".gguf":
        if not p.exists():  # the CLI checks this first (config/preflight.py); same line for library callers
            from ..config.preflight import MODEL_WHAT, missing
            raise FileNotFoundError(missing("model.path", path, MODEL_WHAT) or f"GGUF file {p} does not exist (model.path)")
        gguf_file, path = p.name, str(p.parent)
    if local_files_only is None:
        local_files_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    if gguf_file is not None:
        from transformers import GgufConfig

        kw.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, local_files_only=local_files_only,
                                            **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as e:
        raise _unreadable("a model config", "model.path", path, e) from e
    family_of(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision,
                                                 local_files_only=local_files_only,
                                                 attn_implementation="sdpa", **kw)
    if device is not None:
        model.to(device)
    return model.eval()


def _unreadable(what: str, key: str, path: str, e: OSError) -> FileNotFoundError:
    """One line for a model or tokenizer that neither a local folder nor the Hub could provide (transformers'
    own message runs over several lines: its first is kept)."""
    return FileNotFoundError(
        f"could not read {what} from {path!r} ({exc_line(e)}); set {key} to a local Hugging Face "
        "folder, a .gguf file, or a Hub id reachable from this machine (HF_HUB_OFFLINE=1: the local cache only)")


def load_tokenizer(path: str, gguf_file: str | None = None, revision: str | None = None, key: str = "model.path"):
    from transformers import AutoTokenizer

    p = Path(os.path.expanduser(path))
    if gguf_file is None and p.suffix == ".gguf":
        gguf_file, path = p.name, str(p.parent)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    local = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=local, **kw)
    except OSError as e:
        raise _unreadable("a tokenizer", key, path, e) from e
