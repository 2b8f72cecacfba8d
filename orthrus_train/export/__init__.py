"""Export, load, validate and publish Orthrus checkpoints (GitHub issue 8).

``modeling_orthrus.py`` is the standalone runtime copied into every export folder.
"""

from .loader import load_orthrus
from .modeling_orthrus import OrthrusCheckpointError, OrthrusConfig, OrthrusLM, base_weights_sha256
from .publish import PublishError, publish
from .validate import validate_folder, validate_state_dict
from .writer import export_folder

__all__ = [
    "OrthrusCheckpointError",
    "OrthrusConfig",
    "OrthrusLM",
    "PublishError",
    "base_weights_sha256",
    "export_folder",
    "load_orthrus",
    "publish",
    "validate_folder",
    "validate_state_dict",
]
