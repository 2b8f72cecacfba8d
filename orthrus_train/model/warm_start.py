"""Warm starts: `heads.init_from=PATH` copies the twins of an export into a freshly built model.

PATH is an Orthrus export folder (or a Hub id): this project's full or heads-only layout, or a
checkpoint in the official Orthrus layout (github.com/chiennv2000/orthrus, src/model.py: a Qwen3
config.json with `block_size` and `mask_token_id`, and `model.layers.{i}.self_attn.{q,k,v,o}_proj_diff`,
`{q,k}_norm_diff` tensors next to the backbone's). Only the head tensors are read; the backbone stays
the run's own (e.g. your fine-tuned Qwen3), so the shapes must agree: hidden size, layers, heads, kv
heads, head dim, vocabulary, block size and mask token are checked first and any mismatch is refused,
named, before anything is loaded. The optimizer state always starts fresh. A run that resumes from
one of its own checkpoints ignores `heads.init_from`: the checkpoint wins.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config.schema import ConfigError

# (config.json key, what to call it in a message) of the backbone shape the twins depend on
SHAPE_KEYS = (("hidden_size", "hidden size"), ("num_hidden_layers", "layers"), ("num_attention_heads", "heads"),
              ("num_key_value_heads", "kv heads"), ("head_dim", "head dim"), ("vocab_size", "vocabulary"))


class WarmStartError(ConfigError):
    """heads.init_from names something that cannot initialise this run's heads (one line, names the mismatch)."""


def source_problem(path: str) -> str | None:
    """Why `path` can be neither a local export folder nor a Hub id (ORG/NAME), or None (checked at config time)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return None
    if p.exists() or path.count("/") != 1 or path.startswith((".", "/", "~")):
        return f"heads.init_from={path}: no such export folder (give a local export folder or a Hub id ORG/NAME)"
    return None


def _folder(path: str) -> Path:
    """A local folder, or a Hub id downloaded without the backbone-only files it does not need."""
    bad = source_problem(path)
    if bad:
        raise WarmStartError(bad)
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, no access: all the user's to fix
        raise WarmStartError(f"heads.init_from={path}: not a local folder and not downloadable from the Hub "
                             f"({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None


def read_export(path: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(config.json, {head tensor name: tensor}, layout) of an export folder; layout is 'heads' or 'full'."""
    from safetensors import safe_open

    from ..export.modeling_orthrus import (HEADS_META_NAME, HEADS_WEIGHTS_NAME, WEIGHTS_NAME, is_head_tensor,
                                           read_weight_files)

    folder = _folder(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise WarmStartError(f"heads.init_from={path}: {cfg_file} not found; point it at an Orthrus export folder")
    config = json.loads(cfg_file.read_text())
    layout = "heads" if (folder / HEADS_META_NAME).exists() else "full"
    found = read_weight_files(str(folder), HEADS_WEIGHTS_NAME if layout == "heads" else WEIGHTS_NAME)
    tensors = {}
    for fname in sorted({f for _, _, f in found.values()}):
        with safe_open(str(folder / fname), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if is_head_tensor(k)})
    if not tensors:
        raise WarmStartError(f"heads.init_from={path}: the export holds no twin tensors (*_diff); "
                             "is it an Orthrus export?")
    return config, tensors, layout


def _shape(config) -> dict:
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    out = {k: get(k) for k, _ in SHAPE_KEYS}
    if out["head_dim"] is None and out["hidden_size"] and out["num_attention_heads"]:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out


def mismatches(config: dict, model) -> list[str]:
    """What differs between an export's config.json and the run's model, as 'what: export X, this run Y'."""
    out = []
    family = config.get("backbone_model_type") or config.get("model_type")
    family = "qwen3" if family in (None, "orthrus") else family  # official configs: Qwen3Config
    if family != model.config.model_type:
        out.append(f"backbone family: export {family}, this run {model.config.model_type}")
    theirs, ours = _shape(config), _shape(model.config)
    out += [f"{label}: export {theirs[k]}, this run {ours[k]}" for k, label in SHAPE_KEYS if theirs[k] != ours[k]]
    if config.get("block_size") != model.block_size:
        out.append(f"block size: export {config.get('block_size')}, this run {model.block_size} (heads.block_size)")
    if config.get("mask_token_id") != model.mask_token_id:
        out.append(f"mask token: export {config.get('mask_token_id')}, this run {model.mask_token_id} "
                   "(model.mask_token_id)")
    return out


def load_into(model, path: str) -> str:
    """Check `path` against `model` and copy its head tensors into the model's. Returns the layout read."""
    if model.head_type != "orthrus":
        raise WarmStartError("heads.init_from: exports carry Orthrus twins only, so Medusa heads cannot be "
                             "warm-started; use heads.type=orthrus or drop heads.init_from")
    config, tensors, layout = read_export(path)
    bad = mismatches(config, model)
    if bad:
        raise WarmStartError(f"heads.init_from={path} does not fit this run's backbone; refused: " + "; ".join(bad))
    expected = model.head_state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        raise WarmStartError(f"heads.init_from={path}: its twins do not match this model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}, wrong shape {sorted(wrong)[:3]}")
    with torch.no_grad():
        for name, dst in expected.items():
            with _writable(dst):
                dst.copy_(tensors[name].to(device=dst.device, dtype=dst.dtype))
    return layout


def _writable(param):
    """Under ZeRO-3 a twin is partitioned: gather it, write on rank 0, re-partition on exit."""
    import contextlib

    if hasattr(param, "ds_id"):
        import deepspeed
        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


def resume_target(cfg, run) -> Path | None:
    """The checkpoint this training run will resume from, if any (the same rule as the trainer's)."""
    from ..train.checkpoint import find_resumable

    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return find_resumable(run.checkpoints, log=lambda *_: None)
    return Path(cfg.resume)


def warm_start(model, cfg, run, log=print) -> bool:
    """Apply heads.init_from to a freshly built model before the optimizer exists. Returns True if loaded."""
    path = cfg.heads.init_from
    if not path:
        return False
    ckpt = resume_target(cfg, run)
    if ckpt is not None:
        log(f"[train] heads.init_from={path} ignored: resuming from checkpoint {ckpt} "
            "(the checkpoint wins: its heads and optimizer state)")
        return False
    layout = load_into(model, os.fspath(path))
    log(f"[train] heads initialised from {path} (optimizer state fresh); twins read from its {layout} layout")
    return True
