"""Load an Orthrus export folder (full or heads-only) without trust_remote_code.

Uses this package's copy of ``modeling_orthrus`` (the same file every export folder carries).
"""

from __future__ import annotations

from .modeling_orthrus import OrthrusLM


def load_orthrus(path, base=None, dtype=None, device_map=None, **kwargs) -> OrthrusLM:
    """Load an export folder or hub id.

    Full layout: validated (exact tensor set, shapes, intact shards) then loaded. Heads-only layout: the base model
    is ``base`` (local path or hub id) or the one recorded in the folder; it is refused with OrthrusCheckpointError
    unless its weights' sha256 equals the recorded one. Extra kwargs go to ``from_pretrained``.
    """
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    return OrthrusLM.from_pretrained(str(path), base=base, **kwargs).eval()
