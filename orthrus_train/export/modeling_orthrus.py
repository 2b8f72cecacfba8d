"""Orthrus: twin-projection draft heads on a frozen, stock transformers causal LM.

Standalone (imports only torch and transformers); copied into every exported folder and loaded with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

* The backbone is the stock transformers model of ``config.backbone_model_type`` (qwen3, qwen3_moe,
  qwen2, llama), held as ``self.model`` (its ``*Model``) plus ``self.lm_head``, so state-dict names
  are exactly ``model.*`` and ``lm_head.weight``.
* Every ``model.layers[i].self_attn`` gets twins ``{q,k,v,o}_proj_diff`` (bias where the backbone's
  projection has one) and ``{q,k}_norm_diff`` where the backbone has q/k norms.
* ``forward`` is the backbone's causal LM forward. ``generate(..., use_diffusion_mode=True)`` runs
  Orthrus decoding: draft K-1 tokens in one bidirectional pass of the twins over ``[x_a, M, ..., M]``
  (attending to the cached AR keys/values of positions < a), verify them with one causal AR pass,
  keep the longest accepted prefix (greedy match or rejection sampling) plus one bonus token.
  The decoding passes use their own per-layer K/V list cache, not ``transformers.Cache``.
"""

import copy
import hashlib
import json
import os
import struct

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

FAMILIES = ("qwen3", "qwen3_moe", "qwen2", "llama")
TWIN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
TWIN_NORMS = ("q_norm", "k_norm")
WEIGHTS_NAME = "model.safetensors"
HEADS_WEIGHTS_NAME = "orthrus_heads.safetensors"
HEADS_META_NAME = "orthrus_heads.json"
# config.json keys that belong to Orthrus / the folder, not to the backbone config
_ORTHRUS_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
                 "backbone_model_type", "block_size", "mask_token_id", "base_model_name_or_path", "base_revision",
                 "base_sha256")  # fmt: skip


class OrthrusCheckpointError(ValueError):
    """An Orthrus folder / state dict does not match its config; the message lists the offending keys."""


class OrthrusConfig(PretrainedConfig):
    """The backbone's own config fields (flat, as in the official format) plus the Orthrus fields."""

    model_type = "orthrus"

    def __init__(
        self,
        backbone_model_type="qwen3",
        block_size=16,
        mask_token_id=None,
        base_model_name_or_path=None,
        base_revision=None,
        base_sha256=None,
        **kwargs,
    ):
        self.backbone_model_type = backbone_model_type
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.base_model_name_or_path = base_model_name_or_path  # set only for the heads-only layout
        self.base_revision = base_revision
        self.base_sha256 = base_sha256
        super().__init__(**kwargs)

    @classmethod
    def from_backbone_config(cls, backbone_config, block_size, mask_token_id, **orthrus_fields):
        fields = {k: v for k, v in backbone_config.to_dict().items() if k not in _ORTHRUS_KEYS}
        return cls(
            backbone_model_type=backbone_config.model_type,
            block_size=block_size,
            mask_token_id=mask_token_id,
            **orthrus_fields,
            **fields,
        )

    def backbone_config(self):
        if self.backbone_model_type not in FAMILIES:
            raise ValueError(
                f"backbone_model_type={self.backbone_model_type!r} is not supported; expected one of {FAMILIES}"
            )
        fields = {k: v for k, v in self.to_dict().items() if k not in _ORTHRUS_KEYS}
        return AutoConfig.for_model(self.backbone_model_type, **fields)


def attach_twins(decoder):
    """Give every layer's self_attn the *_diff twins, mirroring the AR modules (shape, bias, dtype, device)."""
    for layer in decoder.layers:
        attn = layer.self_attn
        for name in TWIN_PROJS + TWIN_NORMS:
            if hasattr(attn, name) and not hasattr(attn, name + "_diff"):
                setattr(attn, name + "_diff", copy.deepcopy(getattr(attn, name)))


def base_weights_sha256(state_dict, tie_word_embeddings):
    """sha256 over the sorted (name, dtype, shape, bytes) of the backbone weights (twins and tied lm_head excluded)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        if is_head_tensor(name) or (tie_word_embeddings and name == "lm_head.weight"):
            continue
        t = state_dict[name].detach()
        digest.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}\n".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # buffer, no copy
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- validation
def read_safetensors_header(path):
    """{name: (dtype, shape)} from a .safetensors header; raises if the file is truncated or corrupt."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise OrthrusCheckpointError(
                f"{path}: truncated or corrupt safetensors file (header does not fit in "
                f"{size} bytes); re-export or re-download it"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise OrthrusCheckpointError(
                f"{path}: corrupt safetensors header ({err}); re-export or re-download it"
            ) from None
    header.pop("__metadata__", None)
    data_end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + header_len + data_end != size:
        raise OrthrusCheckpointError(
            f"{path}: file is {size} bytes but its header describes {8 + header_len + data_end}; "
            "it is truncated or corrupt: re-export or re-download it"
        )
    return {name: (v["dtype"], tuple(v["shape"])) for name, v in header.items()}


def read_weight_files(folder, basename):
    """{name: (dtype, shape, file)} over `basename` or its sharded index; checks the index against the shards."""
    index_path = os.path.join(folder, basename + ".index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, basename)):
        weight_map, files = None, [basename]
    else:
        raise OrthrusCheckpointError(
            f"{folder}: neither {basename} nor {basename}.index.json exists; is this an Orthrus export folder?"
        )
    found = {}
    for fname in files:
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
            raise OrthrusCheckpointError(f"{index_path} lists {fname}, which is missing from {folder}; re-download it")
        for name, (dtype, shape) in read_safetensors_header(path).items():
            if name in found:
                raise OrthrusCheckpointError(f"{folder}: tensor {name} is stored twice ({found[name][2]} and {fname})")
            found[name] = (dtype, shape, fname)
    if weight_map is not None:
        stored_in = {name: v[2] for name, v in found.items()}
        wrong = sorted(k for k in set(weight_map) | set(stored_in) if weight_map.get(k) != stored_in.get(k))
        if wrong:
            raise OrthrusCheckpointError(
                f"{index_path} disagrees with the shard files for {len(wrong)} tensors: "
                f"{_listing(wrong)}; re-export the folder"
            )
    return found


def is_head_tensor(name):
    """Tensors Orthrus adds to the backbone: the twins, and the mask embedding of backbones whose
    vocabulary has no spare row for the mask token (e.g. SmolLM2)."""
    return "_diff." in name or name == "mask_embedding"


def expected_shapes(config, part="full"):
    """{name: shape} the checkpoint must hold: 'full' = backbone + twins (no lm_head if tied), 'heads' = twins only."""
    with torch.device("meta"):
        model = OrthrusLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    if part == "heads":
        shapes = {k: s for k, s in shapes.items() if is_head_tensor(k)}
    return shapes


def check_tensors(found_shapes, config, part, where):
    """Raise OrthrusCheckpointError listing missing / unexpected / wrong-shape tensors, if any."""
    expected = expected_shapes(config, part)
    missing = sorted(set(expected) - set(found_shapes))
    unexpected = sorted(set(found_shapes) - set(expected))
    bad = sorted(
        f"{k}: found {tuple(found_shapes[k])}, config expects {expected[k]}"
        for k in set(expected) & set(found_shapes)
        if tuple(found_shapes[k]) != expected[k]
    )
    if missing or unexpected or bad:
        lines = [
            f"{where}: tensors do not match the Orthrus {part} layout of a {config.backbone_model_type} backbone "
            f"with {config.num_hidden_layers} layers "
            f"(tie_word_embeddings={getattr(config, 'tie_word_embeddings', False)})"
        ]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {_listing(keys)}")
        lines.append(
            "  Nothing was loaded. Re-export from the trained model, or fix config.json if it describes another model."
        )
        raise OrthrusCheckpointError("\n".join(lines))


def _listing(keys, limit=12):
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------- decoding helpers
class OrthrusKVCache:
    """Per-layer lists of post-RoPE keys/values [B, kv_heads, length, head_dim]; truncation is a slice."""

    def __init__(self, num_layers):
        self.keys = [None] * num_layers
        self.values = [None] * num_layers

    def __len__(self):
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def truncate(self, length):
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _filtered_probs(logits, temperature, top_k, top_p):
    """Softmax of logits/temperature after top-k and top-p (nucleus) filtering, in float32."""
    logits = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p  # mass before this token already >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


# ----------------------------------------------------------------------------------------------- the model
class OrthrusLM(PreTrainedModel, GenerationMixin):
    config_class = OrthrusConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config):
        super().__init__(config)
        attn = {"attn_implementation": config._attn_implementation} if config._attn_implementation else {}
        self.model = AutoModel.from_config(config.backbone_config(), **attn)  # the stock Qwen3Model / LlamaModel / ...
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        attach_twins(self.model)
        if config.mask_token_id is not None and config.mask_token_id >= config.vocab_size:
            # No spare embedding row: the mask token gets its own vector, and the output vocabulary
            # (lm_head) stays exactly the backbone's, so verification is unchanged.
            self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    # ---- ordinary causal LM forward (the backbone's; twins unused)
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    # ---- Orthrus passes over an OrthrusKVCache (positions continue from len(cache))
    def _attention(self, attn, x, cos, sin, cache, past, layer_idx, draft):
        sfx = "_diff" if draft else ""
        bsz, length, _ = x.shape
        shape = (bsz, length, -1, attn.head_dim)
        q, k = getattr(attn, "q_proj" + sfx)(x).view(shape), getattr(attn, "k_proj" + sfx)(x).view(shape)
        v = getattr(attn, "v_proj" + sfx)(x).view(shape).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3 family: per-head RMSNorm before RoPE
            q, k = getattr(attn, "q_norm" + sfx)(q), getattr(attn, "k_norm" + sfx)(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past:
            k = torch.cat([cache.keys[layer_idx], k], dim=2)
            v = torch.cat([cache.values[layer_idx], v], dim=2)
        if draft:  # block queries see every cached AR key (< a) and the whole block (bidirectional)
            mask = None
        else:  # causal AR pass; appends its keys/values at positions past..past+length-1
            cache.keys[layer_idx], cache.values[layer_idx] = k, v
            mask = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(past)
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask, scale=attn.scaling
        )
        return getattr(attn, "o_proj" + sfx)(out.transpose(1, 2).reshape(bsz, length, -1))

    def _run(self, input_ids, cache, draft):
        if any(t != "full_attention" for t in (getattr(self.config, "layer_types", None) or [])):
            raise NotImplementedError(
                "Orthrus decoding supports full attention only; this config has sliding-window layers"
            )
        start = len(cache)
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand(
            input_ids.shape[0], -1
        )
        h = self.embed(input_ids)
        cos, sin = (t.unsqueeze(1) for t in self.model.rotary_emb(h, positions))
        for i, layer in enumerate(self.model.layers):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, cache, start, i, draft)
            mlp_out = layer.mlp(layer.post_attention_layernorm(h))
            h = h + (mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out)
        return self.lm_head(self.model.norm(h))

    def embed(self, input_ids):
        if getattr(self, "mask_embedding", None) is None:
            return self.model.embed_tokens(input_ids)
        is_mask = input_ids == self.config.mask_token_id
        h = self.model.embed_tokens(input_ids.masked_fill(is_mask, 0))
        return torch.where(is_mask[..., None], self.mask_embedding.to(h.dtype), h)

    @torch.no_grad()
    def prefill(self, input_ids, cache=None):
        """AR pass over the prompt; returns (logits, cache holding the prompt's keys/values)."""
        cache = cache if cache is not None else OrthrusKVCache(len(self.model.layers))
        return self._run(input_ids, cache, draft=False), cache

    @torch.no_grad()
    def draft(self, block_ids, cache):
        """Diffusion pass on [x_a, M, ..., M] at positions len(cache)...; logits[:, i] proposes d_{i+1}.
        The cache is read (positions < a), never written."""
        return self._run(block_ids, cache, draft=True)

    @torch.no_grad()
    def verify(self, block_ids, cache):
        """Causal AR pass on [x_a, d_1, ...], appending its keys/values to the cache."""
        return self._run(block_ids, cache, draft=False)

    # ---- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        max_new_tokens=None,
        max_length=None,
        temperature=0.0,
        top_k=20,
        top_p=0.8,
        eos_token_id=None,
        use_diffusion_mode=True,
        attention_mask=None,
        pad_token_id=None,
        streamer=None,
        **kwargs,
    ):
        """Orthrus decoding (default) or plain AR decoding (use_diffusion_mode=False, via GenerationMixin).

        temperature 0 (default) is greedy and lossless. Returns [batch, prompt + new] token ids, rows that stopped
        early padded with pad_token_id. Counts of the last call are in ``self.last_generate_stats``. A
        ``streamer`` (e.g. TextStreamer, batch 1) receives the prompt, then each accepted run of tokens.
        """
        gen_cfg = self.generation_config
        eos_token_id = eos_token_id if eos_token_id is not None else gen_cfg.eos_token_id
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        pad_token_id = pad_token_id if pad_token_id is not None else gen_cfg.pad_token_id
        if pad_token_id is None:
            pad_token_id = min(eos) if eos else 0
        if not use_diffusion_mode:
            do_sample = kwargs.pop("do_sample", None)  # plain generate() vocabulary also accepted
            if do_sample is False:
                temperature = 0.0
            sampling = (
                dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
                if temperature
                else dict(do_sample=False)
            )
            return super().generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                streamer=streamer,
                **sampling,
                **kwargs,
            )
        ignored = sorted(k for k, v in kwargs.items() if v not in (None, False) and k not in ("do_sample", "use_cache"))
        if ignored:
            raise ValueError(
                f"generate(use_diffusion_mode=True) does not support {ignored}; pass use_diffusion_mode=False"
            )
        prompt_len = input_ids.shape[1]
        if max_new_tokens is None:
            max_new_tokens = (max_length if max_length is not None else gen_cfg.max_length or 20) - prompt_len
        self.last_generate_stats = dict(new_tokens=0, draft_passes=0, verify_passes=0)
        if streamer is not None:
            if input_ids.shape[0] != 1:
                raise ValueError("a streamer needs batch size 1")
            streamer.put(input_ids.cpu())
        new_rows = []
        for b in range(input_ids.shape[0]):
            row = input_ids[b : b + 1]
            if attention_mask is not None:  # drop left padding
                row = row[:, attention_mask[b].bool()]
            new_rows.append(self._generate_row(row, max(max_new_tokens, 0), temperature, top_k, top_p, eos, streamer))
        if streamer is not None:
            streamer.end()
        width = max(len(r) for r in new_rows)
        new = torch.full((input_ids.shape[0], width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        for b, r in enumerate(new_rows):
            new[b, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)

    def _generate_row(self, prompt, max_new, temperature, top_k, top_p, eos, streamer=None):
        greedy = not temperature or temperature <= 0
        stats = self.last_generate_stats
        block_size, mask_id = self.config.block_size, self.config.mask_token_id
        if max_new == 0:
            return []
        logits, cache = self.prefill(prompt)
        last = logits[:, -1]
        x = (
            int(last.argmax(-1))
            if greedy
            else int(torch.multinomial(_filtered_probs(last, temperature, top_k, top_p), 1))
        )
        out = [x]
        emit = (lambda tokens: streamer.put(torch.tensor(tokens))) if streamer is not None else (lambda tokens: None)
        emit(out)
        while len(out) < max_new and x not in eos:
            a, k = len(cache), min(block_size, max_new - len(out) + 1)  # drafts never exceed what is still needed
            block = torch.full((1, k), mask_id, dtype=prompt.dtype, device=prompt.device)
            block[0, 0] = x
            draft_logits = self.draft(block, cache)[0, : k - 1]
            if greedy:
                drafts = draft_logits.argmax(-1)
            else:
                q = _filtered_probs(draft_logits, temperature, top_k, top_p)
                drafts = torch.multinomial(q, 1)[:, 0]
            block[0, 1:] = drafts
            target_logits = self.verify(block, cache)[0]
            if greedy:
                targets = target_logits.argmax(-1)
                m = int((drafts == targets[:-1]).long().cumprod(0).sum())
                bonus = int(targets[m])
            else:
                m, bonus = self._rejection_sample(drafts, q, _filtered_probs(target_logits, temperature, top_k, top_p))
            cache.truncate(a + m + 1)
            stats["draft_passes"] += 1
            stats["verify_passes"] += 1
            accepted = []
            for t in drafts[:m].tolist() + [bonus]:
                accepted.append(t)
                if t in eos:
                    break
            accepted = accepted[: max_new - len(out)]
            out += accepted
            emit(accepted)
            x = out[-1]
        stats["new_tokens"] += len(out)
        return out

    @staticmethod
    def _rejection_sample(drafts, q, p):
        """Accept d_i with prob min(1, p/q); at the first rejection resample from norm(max(0, p - q));
        after full acceptance the bonus token ~ p."""
        for i, d in enumerate(drafts.tolist()):
            if torch.rand(()) * q[i, d] >= p[i, d]:
                residual = (p[i] - q[i]).clamp_min(0)
                residual = residual if residual.sum() > 0 else p[i]
                return i, int(torch.multinomial(residual / residual.sum(), 1))
        return len(drafts), int(torch.multinomial(p[len(drafts)], 1))

    # ---- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, base=None, **kwargs):
        """Validate the folder before loading anything; heads-only folders load their base model (``base=`` or
        config.base_model_name_or_path) and refuse it unless its weights match the recorded sha256."""
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            hub = {
                k: kwargs[k]
                for k in ("revision", "cache_dir", "token", "local_files_only")
                if kwargs.get(k) is not None
            }
            folder = snapshot_download(folder, **hub)
        if kwargs.get("subfolder"):
            folder = os.path.join(folder, kwargs.pop("subfolder"))
        config = kwargs.pop("config", None)
        if not isinstance(config, OrthrusConfig):
            config = OrthrusConfig.from_pretrained(folder)
        if os.path.exists(os.path.join(folder, HEADS_META_NAME)):
            return cls._from_heads(folder, config, base, **kwargs)
        found = read_weight_files(folder, WEIGHTS_NAME)
        check_tensors({k: v[1] for k, v in found.items()}, config, "full", folder)
        return super().from_pretrained(folder, *model_args, config=config, **kwargs)

    @classmethod
    def _from_heads(cls, folder, config, base, dtype=None, torch_dtype=None, device_map=None, **kwargs):
        with open(os.path.join(folder, HEADS_META_NAME)) as f:
            meta = json.load(f)
        base = base or config.base_model_name_or_path or meta.get("base_model")
        if not base:
            raise OrthrusCheckpointError(
                f"{folder} holds Orthrus heads only and names no base model; pass base=<path or hub id>"
            )
        found = read_weight_files(folder, HEADS_WEIGHTS_NAME)
        check_tensors({k: v[1] for k, v in found.items()}, config, "heads", folder)
        revision = meta.get("base_revision") if base == meta.get("base_model") else None
        load_kw = {
            k: kwargs[k]
            for k in ("cache_dir", "token", "local_files_only", "attn_implementation")
            if kwargs.get(k) is not None
        }
        backbone = AutoModelForCausalLM.from_pretrained(
            base, revision=revision, dtype=meta.get("base_dtype", "auto"), device_map=device_map, **load_kw
        )
        if backbone.config.model_type != config.backbone_model_type:
            raise OrthrusCheckpointError(
                f"base {base} is a {backbone.config.model_type} model; the heads in {folder} "
                f"were trained on {config.backbone_model_type}"
            )
        tied = getattr(config, "tie_word_embeddings", False)
        got = base_weights_sha256(backbone.state_dict(), tied)
        if got != meta["base_sha256"]:
            raise OrthrusCheckpointError(
                f"base model {base} (revision {revision or 'default'}) does not match the base the heads in {folder} "
                f"were trained on: weights sha256 {got} != recorded {meta['base_sha256']} ({meta.get('base_model')} @ "
                f"{meta.get('base_revision')}). Pass base=<the exact base checkpoint>."
            )
        with torch.device("meta"):
            model = cls(config)
        model.model, model.lm_head = backbone.model, backbone.lm_head  # the loaded stock modules, untouched
        attach_twins(model.model)
        from safetensors import safe_open

        params = dict(model.named_parameters(remove_duplicate=False))
        for fname in sorted({v[2] for v in found.values()}):
            with safe_open(os.path.join(folder, fname), framework="pt") as f:
                for name in f.keys():
                    params[name].data.copy_(f.get_tensor(name))
        dtype = dtype or torch_dtype
        if dtype not in (None, "auto"):
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        gen_path = os.path.join(folder, "generation_config.json")
        model.generation_config = (
            type(backbone.generation_config).from_pretrained(folder)
            if os.path.exists(gen_path)
            else backbone.generation_config
        )
        return model.eval()
