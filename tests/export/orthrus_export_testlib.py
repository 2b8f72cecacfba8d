"""Helpers for the export tests: tiny random backbones of every family, twins, tokenizer."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("qwen3", "qwen3_moe", "qwen2", "llama")
VOCAB = 300
MASK_ID = VOCAB - 1
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    eos_token_id=1,
    pad_token_id=2,
    bos_token_id=3,
)
FAMILY_FIELDS = {
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),  # tied, like the official small Qwen3 checkpoints
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2": dict(),
    "llama": dict(),
}


def tiny_backbone(family, seed=0):
    """(stock *ForCausalLM in eval mode, its config)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **COMMON, **FAMILY_FIELDS[family])
    return AutoModelForCausalLM.from_config(config).eval(), config


def with_twins(backbone, noise=0.02, seed=1):
    """Backbone state dict plus *_diff twins: a copy of each AR attention tensor, perturbed (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    sd = dict(backbone.state_dict())
    for name in list(sd):
        module, _, param = name.rpartition(".")
        if ".self_attn." in name and module.rsplit(".", 1)[1] in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "q_norm",
            "k_norm",
        ):
            t = sd[name]
            sd[f"{module}_diff.{param}"] = t + noise * torch.randn(t.shape, generator=gen)
    return sd


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t2", bos_token="t3")


def prompt(length=7, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB - 1, (1, length), generator=gen)  # no special or mask ids


def greedy_ar(backbone, ids, max_new_tokens, **kw):
    return backbone.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2, **kw
    )


def load_remote(folder, **kw):
    """The user's path: AutoModelForCausalLM + the folder's own modeling_orthrus.py."""
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kw).eval()
