"""Validation of Orthrus exports, on write and on load.

The tensor rules themselves (which keys a backbone family needs, header parsing, the error message) live in
``modeling_orthrus`` because the exported folder must validate itself without orthrus_train installed; this
module applies them to in-memory state dicts and to whole export folders.
"""

from __future__ import annotations

import json
from pathlib import Path

from .modeling_orthrus import (
    HEADS_META_NAME,
    HEADS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    OrthrusCheckpointError,
    OrthrusConfig,
    check_tensors,
    expected_shapes,
    read_weight_files,
)

MODELING_FILE = "modeling_orthrus.py"
AUTO_MAP = {"AutoConfig": "modeling_orthrus.OrthrusConfig", "AutoModelForCausalLM": "modeling_orthrus.OrthrusLM"}
HEADS_META_REQUIRED = ("format", "base_model", "base_revision", "base_sha256", "base_dtype", "checksum")

__all__ = ["OrthrusCheckpointError", "expected_shapes", "validate_state_dict", "validate_folder"]


def validate_state_dict(state_dict, config: OrthrusConfig, part: str = "full", where: str = "state dict") -> None:
    """Raise OrthrusCheckpointError unless `state_dict` ({name: tensor or shape}) is exactly the `part` layout."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in state_dict.items()}
    check_tensors(shapes, config, part, where)


def validate_folder(folder) -> dict:
    """Check an export folder without loading weights; returns {'layout', 'num_tensors', 'config'}.

    Checks config.json (model_type, auto_map, Orthrus fields), the modeling file, every safetensors header
    (truncation), the shard index, and the exact tensor set for the layout (heads-only folders also need a
    complete orthrus_heads.json).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise OrthrusCheckpointError(f"{folder}: no config.json; is this an Orthrus export folder?")
    raw = json.loads(config_path.read_text())
    problems = []
    if raw.get("model_type") != "orthrus":
        problems.append(f"model_type is {raw.get('model_type')!r}, expected 'orthrus'")
    if raw.get("auto_map") != AUTO_MAP:
        problems.append(f"auto_map is {raw.get('auto_map')!r}, expected {AUTO_MAP}")
    for key in ("backbone_model_type", "block_size", "mask_token_id"):
        if raw.get(key) is None:
            problems.append(f"{key} is missing")
    if not (folder / MODELING_FILE).exists():
        problems.append(f"{MODELING_FILE} is missing (needed for trust_remote_code loading)")
    if problems:
        raise OrthrusCheckpointError(f"{config_path}: " + "; ".join(problems) + ". Re-export the folder.")
    config = OrthrusConfig.from_pretrained(str(folder))
    if not 0 <= config.mask_token_id <= config.vocab_size:
        raise OrthrusCheckpointError(
            f"{config_path}: mask_token_id={config.mask_token_id} is outside the vocabulary "
            f"(vocab_size={config.vocab_size})"
        )
    heads_meta_path = folder / HEADS_META_NAME
    if heads_meta_path.exists():
        meta = json.loads(heads_meta_path.read_text())
        missing = [k for k in HEADS_META_REQUIRED if k not in meta]
        if missing or not meta.get("base_model") or not meta.get("base_sha256"):
            raise OrthrusCheckpointError(
                f"{heads_meta_path}: missing or empty fields {missing or ['base_model/base_sha256']}; "
                "re-export with layout='heads' and base_model_id set"
            )
        layout, basename = "heads", HEADS_WEIGHTS_NAME
        stray = sorted(p.name for p in folder.glob("model*.safetensors*"))
        if stray:
            raise OrthrusCheckpointError(
                f"{folder}: heads-only folder (has {HEADS_META_NAME}) also holds full weights "
                f"{stray}; keep one layout per folder"
            )
    else:
        layout, basename = "full", WEIGHTS_NAME
    found = read_weight_files(str(folder), basename)
    check_tensors({k: v[1] for k, v in found.items()}, config, layout, str(folder))
    return {"layout": layout, "num_tensors": len(found), "config": config}
