from .backbones import FAMILIES, build_random, family_of, load_backbone, load_tokenizer, qwen3_shape, tiny_config
from .orthrus import TWINS, DecodeState, DraftModel, MedusaModel, OrthrusModel, build_draft_model, choose_mask_token

__all__ = ["FAMILIES", "build_random", "family_of", "load_backbone", "load_tokenizer", "qwen3_shape", "tiny_config",
           "TWINS", "DecodeState", "DraftModel", "MedusaModel", "OrthrusModel", "build_draft_model", "choose_mask_token"]
