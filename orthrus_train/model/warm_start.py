"""Warm starts: `heads.init_from=PATH` copies trained heads into a freshly built model.

PATH is one of
  * an Orthrus export folder (or a Hub id): this project's full or heads-only layout, or a checkpoint in
    the official Orthrus layout (github.com/chiennv2000/orthrus, src/model.py: a Qwen3 config.json with
    `block_size` and `mask_token_id`, and `model.layers.{i}.self_attn.{q,k,v,o}_proj_diff`, `{q,k}_norm_diff`
    tensors next to the backbone's). Exports carry Orthrus twins only (stage=export skips Medusa runs);
  * a training checkpoint of this project, RUN/checkpoints/step-N (only its heads.safetensors is read, so
    a copy of that one file in a folder is enough), Orthrus twins or Medusa heads;
  * a run folder of this project: its newest complete checkpoint, as resume=auto would pick it.
Only the head tensors are read; the backbone stays the run's own (e.g. your fine-tuned Qwen3), so the shapes
must agree: the head type, and hidden size, layers, heads, kv heads, head dim, vocabulary, block size and
mask token (Orthrus) or hidden size, vocabulary and number of heads = block size - 1 (Medusa) are checked
first and any mismatch is refused, named, before anything is loaded. The optimizer state always starts
fresh. Under ZeRO-3 each twin is gathered, written on rank 0 and re-partitioned. A run that resumes from
one of its own checkpoints ignores `heads.init_from`: the checkpoint wins.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.schema import ConfigError
from ..errors import exc_line

# (config.json key, what to call it in a message) of the backbone shape the heads depend on
SHAPE_KEYS = (("hidden_size", "hidden size"), ("num_hidden_layers", "layers"), ("num_attention_heads", "heads"),
              ("num_key_value_heads", "kv heads"), ("head_dim", "head dim"), ("vocab_size", "vocabulary"))
# what Medusa heads (hidden -> hidden MLPs before the shared lm_head) depend on; the number of heads is
# block_size - 1, checked through the block size
MEDUSA_KEYS = ("hidden_size", "vocab_size")
CHECKPOINT_HEADS = "heads.safetensors"  # written by the trainer into every checkpoint (train/engine.py:_save)
HEAD_KIND = {"orthrus": "Orthrus twins", "medusa": "Medusa heads"}


class WarmStartError(ConfigError):
    """heads.init_from names something that cannot initialise this run's heads (one line, names the mismatch)."""


@dataclass
class Source:
    """What heads.init_from points at, read: the head tensors and what they were trained for."""
    kind: str  # 'export' or 'checkpoint'
    layout: str  # export: 'full' | 'heads'; checkpoint: the folder read
    head_type: str  # 'orthrus' | 'medusa'
    config: dict  # config.json keys: backbone family/shape (SHAPE_KEYS), block_size, mask_token_id
    tensors: dict[str, torch.Tensor]
    final_lr: float | None = None  # a checkpoint's learning rate at its step (its trainer_state.json), if known

    @property
    def described(self) -> str:
        return f"its {self.layout} layout" if self.kind == "export" else f"checkpoint {self.layout}"


def source_problem(path: str) -> str | None:
    """Why `path` can be neither a local folder nor a Hub id (ORG/NAME), or None (checked at config time)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return None
    if p.exists() or path.count("/") != 1 or path.startswith((".", "/", "~")):
        return (f"heads.init_from={path}: no such folder (give an export folder, a Hub id ORG/NAME, a run "
                "folder or one of its checkpoints/step-N)")
    return None


def hub_problem(repo_id: str) -> str | None:
    """Why the Hub id `repo_id` cannot be read here, or None: checked before any stage runs (a data stage can take
    hours, and the heads are read only after it). Cached in the local Hub cache: fine. Otherwise one metadata
    request (10 s timeout), which HF_HUB_OFFLINE=1 turns into an error at once."""
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise RuntimeError("HF_HUB_OFFLINE=1 and not in the local Hub cache")
        HfApi().model_info(repo_id, timeout=10)
        return None
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated, no network: all the user's to fix
        return (f"heads.init_from={repo_id}: not a local folder, and the Hub does not give it here "
                f"({exc_line(e, 160)}); download it where the Hub is reachable (huggingface-cli download {repo_id} "
                "--local-dir DIR) and set heads.init_from=DIR")


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
                             f"({exc_line(e, 160)})") from None


def read_export(path: str, folder: Path | None = None) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(config.json, {head tensor name: tensor}, layout) of an export folder; layout is 'heads' or 'full'."""
    from safetensors import safe_open

    from ..export.modeling_orthrus import (HEADS_META_NAME, HEADS_WEIGHTS_NAME, WEIGHTS_NAME, is_head_tensor,
                                           read_weight_files)

    folder = folder or _folder(path)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise WarmStartError(f"heads.init_from={path}: {cfg_file} not found; point it at an Orthrus export folder, "
                             "a run folder or one of its checkpoints/step-N")
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


def read_checkpoint(path: str, folder: Path) -> Source:
    """The heads.safetensors of a training checkpoint, with what its metadata says they were trained for."""
    from safetensors import safe_open

    if (folder / "manifest.json").exists() and not (folder / "COMPLETE").exists():
        raise WarmStartError(f"heads.init_from={path}: {folder} has no COMPLETE marker (the write was interrupted); "
                             "give a complete checkpoint")
    with safe_open(str(folder / CHECKPOINT_HEADS), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head_type = meta.get("head_type") or ("medusa" if any(k.startswith("medusa_heads.") for k in tensors)
                                          else "orthrus")
    config = json.loads(meta["backbone"]) if meta.get("backbone") else {}  # absent in checkpoints before it
    for k in ("block_size", "mask_token_id"):
        if meta.get(k) not in (None, "None"):
            config[k] = int(meta[k])
    return Source("checkpoint", str(folder), head_type, config, tensors, _final_lr(folder))


def _final_lr(folder: Path) -> float | None:
    try:
        lr = json.loads((folder / "trainer_state.json").read_text())["metrics"]["lr"]
        return float(lr) if lr is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Measured (docs/benchmarks.md, sessions 12 and 13, SmolLM2-135M): continuing heads whose schedule had ended at
# lr 1e-4 with a fresh optimizer re-warmed to 1e-3 spent the first 200-500 steps regaining the source's level.
REWARM_RATIO = 3.0


def rewarm_note(final_lr: float | None, lr: float, warmup_ratio: float) -> str | None:
    """A notice when a warm start re-warms to well above the learning rate its source checkpoint ended at."""
    if final_lr is None or lr <= REWARM_RATIO * final_lr:
        return None
    times = f"{lr / final_lr:.0f}x" if final_lr > 0 else "from 0"
    return (f"[train] note: the heads' checkpoint ended its schedule at lr {final_lr:.3g}; this run warms up to "
            f"train.lr={lr:.3g} ({times}) over train.warmup_ratio={warmup_ratio:g} of its steps with a fresh optimizer. "
            "Measured on SmolLM2 (docs/benchmarks.md, sessions 12-13), a re-warm from 1e-4 to 1e-3 spent the first "
            "200-500 steps regaining the checkpoint's level; a continuation may waste less with a lower train.lr")


def read_source(path: str) -> Source:
    """Read whatever heads.init_from names: a checkpoint, a run folder (its newest checkpoint) or an export."""
    from ..train.checkpoint import find_resumable

    folder = _folder(path)
    if not (folder / CHECKPOINT_HEADS).exists() and (folder / "checkpoints").is_dir():  # a run folder
        notes = []
        ckpt = find_resumable(folder / "checkpoints", log=notes.append)
        if ckpt is None:
            raise WarmStartError(f"heads.init_from={path}: a run folder without a complete checkpoint "
                                 f"in {folder / 'checkpoints'}" + (f" ({'; '.join(notes)[:300]})" if notes else ""))
        folder = ckpt
    if (folder / CHECKPOINT_HEADS).exists():
        return read_checkpoint(path, folder)
    config, tensors, layout = read_export(path, folder)
    return Source("export", layout, "orthrus", config, tensors)


def _shape(config) -> dict:
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    out = {k: get(k) for k, _ in SHAPE_KEYS}
    if out["head_dim"] is None and out["hidden_size"] and out["num_attention_heads"]:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out


def backbone_meta(config) -> dict:
    """The backbone family and shape a checkpoint's heads were trained on (stored in heads.safetensors)."""
    return {"backbone_model_type": config.model_type, **_shape(config)}


def mismatches(config: dict, model, head_type: str = "orthrus") -> list[str]:
    """What differs between a source's config and the run's model, as 'what: export X, this run Y'.
    A checkpoint written before its metadata named the backbone has no shape keys: they are skipped there
    (the tensor shapes are still checked)."""
    what = "source" if config.get("_checkpoint") else "export"
    out = []
    family = config.get("backbone_model_type") or config.get("model_type")
    if not config.get("_checkpoint") or family:
        family = "qwen3" if family in (None, "orthrus") else family  # official configs: Qwen3Config
        if family != model.config.model_type:
            out.append(f"backbone family: {what} {family}, this run {model.config.model_type}")
    theirs, ours = _shape(config), _shape(model.config)
    keys = [(k, label) for k, label in SHAPE_KEYS if head_type == "orthrus" or k in MEDUSA_KEYS]
    out += [f"{label}: {what} {theirs[k]}, this run {ours[k]}" for k, label in keys
            if theirs[k] != ours[k] and not (config.get("_checkpoint") and theirs[k] is None)]
    if config.get("block_size") != model.block_size:
        extra = f" ({model.block_size - 1} Medusa heads)" if head_type == "medusa" else ""
        out.append(f"block size: {what} {config.get('block_size')}, this run {model.block_size}{extra} "
                   "(heads.block_size)")
    if head_type == "orthrus" and config.get("mask_token_id") != model.mask_token_id:
        out.append(f"mask token: {what} {config.get('mask_token_id')}, this run {model.mask_token_id} "
                   "(model.mask_token_id)")
    return out


def load_into(model, path: str, src: Source | None = None) -> str:
    """Check `path` (or `src`, already read from it) against `model` and copy its head tensors into the model's.
    Returns what was read (and how many of the model's head tensors were ZeRO-3 partitions)."""
    src = src if src is not None else read_source(path)
    if src.head_type != model.head_type:
        what = "an export" if src.kind == "export" else f"checkpoint {src.layout}"
        hint = (" (exports carry Orthrus twins only; give a Medusa run folder or one of its checkpoints/step-N)"
                if model.head_type == "medusa" else "")
        raise WarmStartError(f"heads.init_from={path} holds {HEAD_KIND.get(src.head_type, src.head_type)} "
                             f"({what}) but this run trains {HEAD_KIND[model.head_type]} "
                             f"(heads.type={model.head_type}); refused{hint}")
    config = dict(src.config, _checkpoint=src.kind == "checkpoint")
    bad = mismatches(config, model, model.head_type)
    if bad:
        raise WarmStartError(f"heads.init_from={path} does not fit this run's backbone; refused: " + "; ".join(bad))
    expected = model.head_state_dict()
    tensors = src.tensors
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != _full_shape(expected[k])]
    if missing or extra or wrong:
        raise WarmStartError(f"heads.init_from={path}: its heads do not match this model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}, wrong shape "
                             + ", ".join(f"{k} {tuple(tensors[k].shape)} (this run {_full_shape(expected[k])})"
                                         for k in sorted(wrong)[:3]))
    partitioned = sum(hasattr(dst, "ds_id") for dst in expected.values())
    with torch.no_grad():
        for name, dst in expected.items():
            with _writable(dst):
                dst.copy_(tensors[name].to(device=dst.device, dtype=dst.dtype))
    if partitioned:
        return (f"{src.described}; {partitioned} of {len(expected)} partitioned (ZeRO-3): gathered, written, "
                "re-partitioned")
    return src.described


def _full_shape(param) -> tuple:
    """The whole shape, also of a ZeRO-3 partitioned parameter (whose .shape is empty outside a gather)."""
    return tuple(getattr(param, "ds_shape", param.shape))


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
    src = read_source(os.fspath(path))
    described = load_into(model, os.fspath(path), src)
    noun = "twins" if model.head_type == "orthrus" else "Medusa heads"
    log(f"[train] heads initialised from {path} (optimizer state fresh); {noun} read from {described}")
    note = rewarm_note(src.final_lr, float(cfg.train.lr), float(cfg.train.warmup_ratio))
    if note:
        log(note)
    return True
