"""Write an Orthrus export folder: config, safetensors (sharded), tokenizer, generation config, modeling code, card.

Layouts:
* ``full``: backbone + twins in ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index); a tied
  ``lm_head.weight`` is not stored (``tie_word_embeddings: true``), as in the official checkpoints.
* ``heads``: only the ``*_diff`` tensors in ``orthrus_heads.safetensors`` plus ``orthrus_heads.json`` naming the
  base model, its revision and the sha256 of its weights (``modeling_orthrus.base_weights_sha256``).

The folder is built next to ``out_dir`` under a temporary name, validated, then renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import card
from .modeling_orthrus import (
    is_head_tensor,
    HEADS_META_NAME,
    HEADS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    OrthrusCheckpointError,
    OrthrusConfig,
    base_weights_sha256,
)
from .validate import AUTO_MAP, MODELING_FILE, validate_folder, validate_state_dict

HEADS_FORMAT = "orthrus-heads/1"
CHECKSUM_DEFINITION = (
    "sha256 over the backbone state dict sorted by name; per tensor: the line "
    "'{name}|{dtype}|{shape}\\n' then its raw bytes; *_diff tensors and a tied lm_head.weight excluded"
)


def parse_size(size) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected an int (bytes) or a string like '5GB' or '500MiB'")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit.upper() or " "))


def write_safetensors(tensors: dict, folder: Path, basename: str, max_shard_size: int) -> list[str]:
    """Write `tensors` as `basename` or as shards + `basename`.index.json; returns the file names written."""
    shards, current, current_size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and current_size + nbytes > max_shard_size:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensors[name]
        current_size += nbytes
    shards.append(current)
    stem, ext = basename.rsplit(".", 1)
    names = (
        [basename]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    )
    weight_map = {}
    for fname, shard in zip(names, shards):
        # contiguous CPU copies: safetensors refuses views and tensors sharing storage
        save_file(
            {k: v.detach().to("cpu").contiguous().clone() for k, v in shard.items()},
            str(folder / fname),
            metadata={"format": "pt"},
        )
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / f"{basename}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
        )
        names.append(f"{basename}.index.json")
    return names


def _state_dict(model_or_state_dict) -> dict:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return dict(model_or_state_dict.state_dict())
    return dict(model_or_state_dict)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def export_folder(
    model_or_state_dict,
    backbone_config,
    tokenizer,
    out_dir,
    *,
    layout: str = "full",
    block_size: int,
    mask_token_id: int,
    base_model_id: str | None = None,
    base_revision: str | None = None,
    extra_card_info: dict | None = None,
    run_dir=None,
    max_shard_size="5GB",
    dtype=None,
    generation_config=None,
    overwrite: bool = False,
) -> Path:
    """Export a trained Orthrus model (module or state dict with ``model.*`` / ``lm_head.weight`` keys).

    backbone_config: the backbone's transformers config (Qwen3Config, ...). tokenizer: saved with save_pretrained
    (None: no tokenizer files, stated in the card). extra_card_info: optional ``recipe`` (name), ``config`` (resolved
    config: dict or YAML text), ``training`` (dict: tokens, time, ...), ``license``, ``repo_id``, ``title``.
    run_dir: the run folder (orthrus_train.run_dir): its eval/data reports, train_summary.json, config.yaml and
    eval plots feed the card (values in extra_card_info win), and ``publish`` checks its eval report.
    dtype: cast the stored floating tensors (full: all; heads: the twins). Returns the folder path.
    """
    if layout not in ("full", "heads"):
        raise ValueError(f"layout={layout!r}: expected 'full' or 'heads'")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if layout == "heads" and not base_model_id:
        raise ValueError("layout='heads' needs base_model_id (the hub id or path the heads will be loaded on)")
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: a block must hold x_a and at least one mask")
    if not 0 <= mask_token_id <= backbone_config.vocab_size:
        raise ValueError(
            f"mask_token_id={mask_token_id} is outside the vocabulary (vocab_size={backbone_config.vocab_size}; "
            "vocab_size itself means a separate mask embedding)"
        )
    extra = dict(extra_card_info or {})
    sd = _state_dict(model_or_state_dict)
    config = OrthrusConfig.from_backbone_config(
        backbone_config,
        block_size,
        mask_token_id,
        **({"base_model_name_or_path": base_model_id, "base_revision": base_revision} if layout == "heads" else {}),
    )
    tied = bool(getattr(backbone_config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" in sd:
        embed = sd.get("model.embed_tokens.weight")
        if embed is None or not torch.equal(sd["lm_head.weight"].cpu(), embed.cpu()):
            raise OrthrusCheckpointError(
                "tie_word_embeddings is true but lm_head.weight differs from "
                "model.embed_tokens.weight; export with the backbone config it was trained with"
            )
        del sd["lm_head.weight"]
    validate_state_dict(sd, config, "full", where="model to export")
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t  # noqa: E731
    base_dtype = _dtype_name(sd["model.embed_tokens.weight"].dtype)
    if layout == "full":
        tensors = {k: cast(v) for k, v in sd.items()}
        config.dtype = _dtype_name(dtype) if dtype is not None else base_dtype
    else:
        tensors = {k: cast(v) for k, v in sd.items() if is_head_tensor(k)}
        config.dtype = base_dtype
    config.architectures = ["OrthrusLM"]
    run_dir = Path(run_dir) if run_dir is not None else None

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        files = write_safetensors(
            tensors, tmp, WEIGHTS_NAME if layout == "full" else HEADS_WEIGHTS_NAME, parse_size(max_shard_size)
        )
        config_dict = config.to_dict()
        config_dict["auto_map"] = dict(AUTO_MAP)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str))
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)
        if generation_config is None:
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_model_config(backbone_config)
        generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        base_sha = None
        if layout == "heads":
            base_sha = base_weights_sha256(sd, tied)
            meta = {
                "format": HEADS_FORMAT,
                "base_model": base_model_id,
                "base_revision": base_revision,
                "base_sha256": base_sha,
                "base_dtype": base_dtype,
                "checksum": CHECKSUM_DEFINITION,
                "backbone_model_type": config.backbone_model_type,
                "num_tensors": len(tensors),
            }
            (tmp / HEADS_META_NAME).write_text(json.dumps(meta, indent=2))
        hub_base, local_base = card.base_model_ref(base_model_id, getattr(backbone_config, "_name_or_path", None))
        found = card.run_folder_inputs(run_dir)
        plots = _copy_plots(found.pop("plot_files"), tmp)
        info = dict(
            found,
            **{k: v for k, v in extra.items() if v is not None},  # the caller's values win over the run folder's
            base_model=hub_base,
            base_model_local=local_base,
            base_revision=base_revision or getattr(backbone_config, "_commit_hash", None),
            layout=layout,
            backbone_model_type=config.backbone_model_type,
            block_size=block_size,
            mask_token_id=mask_token_id,
            dtype=config.dtype,
            base_sha256=base_sha,
            plots=plots,
            tokenizer_included=tokenizer is not None,
            num_twin_params=sum(v.numel() for k, v in sd.items() if "_diff." in k),
            num_params=sum(v.numel() for v in sd.values()),
        )
        info.setdefault("recipe", (info["eval_report"] or {}).get("recipe"))
        (tmp / "README.md").write_text(card.build_card(info))
        (tmp / "orthrus_export.json").write_text(
            json.dumps(
                {
                    "layout": layout,
                    "run_dir": str(run_dir.resolve()) if run_dir else None,
                    "weight_files": files,
                    "tokenizer_included": tokenizer is not None,
                    "transformers_version": _version("transformers"),
                    "torch_version": torch.__version__,
                },
                indent=2,
            )
        )
        validate_folder(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _copy_plots(files: list[Path], folder: Path) -> list[str]:
    """Copy the run's plot files into folder/plots/; returns their paths relative to the folder."""
    copied = []
    for src in files:
        if f"plots/{src.name}" not in copied:
            (folder / "plots").mkdir(exist_ok=True)
            shutil.copyfile(src, folder / "plots" / src.name)
            copied.append(f"plots/{src.name}")
    return copied


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename tmp -> out_dir; an existing out_dir (overwrite=True) is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None
