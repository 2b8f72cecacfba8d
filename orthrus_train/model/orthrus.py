"""Draft heads on a frozen causal LM: Orthrus dual-view twins, and the Medusa-style baseline.

Read top to bottom: `DraftModel` owns the frozen backbone and the AR view (training AR pass,
cached prefill/verify for decoding); `OrthrusModel` adds the twins and the diffusion view;
`MedusaModel` adds residual MLP heads on the final hidden state. Both expose the same training
interface (`student_hidden`) and the same decoding interface (`propose`), so training, decoding and
evaluation never branch on the head type.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import masks
from .anchors import Supervision, sample_anchors, supervision
from .backbones import family_of
from .cache import StaticKVCache
from .layers import (DecodeMask, cached_attention, decode_add_rms_norm, decode_layer_step, flex, layer_step,
                     rope_tables, sdpa)

TWINS = ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff", "q_norm_diff", "k_norm_diff")


def choose_mask_token(vocab_len: int, embed_rows: int, requested: int | None = None, force: bool = False):
    """Pick the mask token id. Returns (id, needs_extra_embedding).

    Default: the first id after the tokenizer's real vocabulary when the embedding has spare rows
    (Qwen3: 151669 = len(tokenizer)). With no spare row (SmolLM2), the id is `embed_rows` and its
    embedding is a separate frozen vector (the mean embedding): the output vocabulary is never
    changed, so the verify pass is exactly the backbone.
    """
    if requested is not None:
        if requested < 0:
            raise ValueError(f"mask_token_id must be >= 0, got {requested}")
        if requested < vocab_len and not force:
            raise ValueError(
                f"mask_token_id={requested} is a real token of the tokenizer (vocabulary size {vocab_len}); "
                f"drafting would confuse it with text. Use an id >= {vocab_len}, leave it unset for the "
                "default, or set model.force_mask_token_id=true if you really mean it.")
        if requested > embed_rows:
            raise ValueError(f"mask_token_id={requested} is beyond the embedding ({embed_rows} rows); "
                             f"use at most {embed_rows} (= one extra row)")
        return requested, requested >= embed_rows
    if embed_rows > vocab_len:
        return vocab_len, False
    return embed_rows, True


@dataclass
class DecodeState:
    """What a drafter may use at a decode step: the cache (positions < a), the newest committed
    token x_a (not in the cache) and the final hidden state that produced it."""
    cache: StaticKVCache
    last_token: torch.Tensor  # (B,)
    last_hidden: torch.Tensor  # (B, H)


@dataclass
class TrainBatchOut:
    hs: torch.Tensor  # (T, H) student hidden at supervised positions
    ht: torch.Tensor  # (T, H) teacher (AR) hidden at the matching positions
    sup: Supervision
    extra: dict = field(default_factory=dict)


def _partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


def make_twin(src: nn.Module) -> nn.Module:
    """A trainable copy of a frozen projection or norm. Under ZeRO-3 (the backbone built inside
    zero.Init, so each rank holds a slice) the twin is created partitioned too and filled from the
    gathered source, one module at a time; a full copy of the backbone never exists on one rank."""
    if not _partitioned(src):
        return copy.deepcopy(src)
    import deepspeed
    from transformers.integrations import deepspeed_config

    w = src.weight
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        if isinstance(src, nn.Linear):
            twin = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None, dtype=w.dtype)
        else:  # RMSNorm of the family
            twin = type(src)(w.ds_shape[0], eps=getattr(src, "variance_epsilon", 1e-6))
    params = list(src.parameters(recurse=False)) + list(twin.parameters(recurse=False))
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for (n, a), b in zip(src.named_parameters(recurse=False), twin.parameters(recurse=False)):
            b.copy_(a.to(b.dtype))
    return twin


class DraftModel(nn.Module):
    head_type = "base"
    draft_passes_per_step = 1  # backbone forward passes a proposal costs (for TPF)
    uses_last_hidden = False  # whether `propose` reads DecodeState.last_hidden (the engine keeps it only then)

    def __init__(self, backbone: nn.Module, block_size: int, mask_token_id: int | None = None,
                 vocab_len: int | None = None, force_mask_token_id: bool = False, attn_backend: str = "sdpa",
                 grad_checkpointing: bool = False):
        super().__init__()
        self.family = family_of(backbone.config)
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (one anchor + at least one proposal), got {block_size}")
        if attn_backend not in ("sdpa", "flex"):
            raise ValueError(f"attn_backend must be 'sdpa' or 'flex', got {attn_backend!r}")
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.block_size = block_size
        self.attn_backend = attn_backend
        self.grad_checkpointing = grad_checkpointing
        emb = backbone.get_input_embeddings()
        rows = getattr(emb.weight, "ds_shape", emb.weight.shape)[0]
        vocab_len = rows if vocab_len is None else vocab_len
        self.mask_token_id, extra = choose_mask_token(vocab_len, rows, mask_token_id, force_mask_token_id)
        if extra:
            import contextlib
            gather = contextlib.nullcontext()
            if hasattr(emb.weight, "ds_id"):
                import deepspeed
                gather = deepspeed.zero.GatheredParameters([emb.weight])
            with gather, torch.no_grad():
                mean = emb.weight.float().mean(0).to(emb.weight.dtype)
            self.register_buffer("mask_embedding", mean.clone(), persistent=True)
        else:
            self.mask_embedding = None

    # ---- shared pieces --------------------------------------------------------------------
    @property
    def decoder(self):
        return self.backbone.model

    @property
    def config(self):
        return self.backbone.config

    def lm_weight(self) -> torch.Tensor:
        return self.backbone.get_output_embeddings().weight

    def embed(self, ids: torch.Tensor, real_tokens: bool = False) -> torch.Tensor:
        """Embeddings of `ids`; real_tokens: the caller guarantees that no id is the mask token (e.g. the verify
        pass over sampled tokens), which skips the mask token's separate embedding (3 ops)."""
        emb = self.decoder.embed_tokens
        if self.mask_embedding is None or real_tokens:
            return emb(ids)
        is_mask = ids == self.mask_token_id
        h = emb(ids.masked_fill(is_mask, 0))
        return torch.where(is_mask[..., None], self.mask_embedding.to(h.dtype), h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over hidden (..., H) as one GEMM over all rows: leading dims are flattened to (rows, H) first (a
        view of a contiguous input; a copy of a strided one, e.g. the draft pass's `h[:, :-1]`). `F.linear` on a
        strided 3-D input dispatches to `bmm` with the weight expanded over the batch (stride 0), which re-read
        the whole weight once per batch row on a GPU (an H200 profile, SmolLM2 shape, batch 16: 172 us for the
        draft pass's LM head). The values: those of the bmm for the profiled step's shape at the CPU tests' reduced
        width (tests/model/test_lm_head.py); elsewhere a BLAS may block one GEMM differently from its batched
        ones (an ulp apart, e.g. float32 at SmolLM2's full width on the CPU); the verify pass's LM head was
        already this one GEMM."""
        if hidden.dim() > 2:
            flat = self.backbone.lm_head(hidden.reshape(-1, hidden.shape[-1]))
            return flat.view(*hidden.shape[:-1], flat.shape[-1])
        return self.backbone.lm_head(hidden)

    def rope(self, h, positions):
        """RoPE tables of a pass (`layers.rope_tables` of the backbone's rotary cos/sin)."""
        return rope_tables(*self.decoder.rotary_emb(h, positions))

    def embed_block(self, first: torch.Tensor, K: int) -> torch.Tensor:
        """Embeddings (B, K, H) of the draft block [first, mask, ..., mask]: the token's embedding and the mask
        token's, concatenated (the same values as embedding the block's ids, in 2 ops instead of 6)."""
        h0 = self.embed(first[:, None], real_tokens=True)
        m = self.mask_embedding if self.mask_embedding is not None else \
            self.decoder.embed_tokens.weight[self.mask_token_id]
        return torch.cat([h0, m.to(h0.dtype).expand(h0.shape[0], K - 1, h0.shape[-1])], 1)

    # ---- AR view ----------------------------------------------------------------------------
    @torch.no_grad()
    def ar_pass(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """Frozen causal pass over whole rows: final (normed) hidden states (B, L, H) and every layer's
        post-RoPE keys/values (the 'AR cache' the diffusion view attends to during training).
        Packed rows: with `segment_ids` each document sees only itself, at `position_ids` (restarting
        at 0 per document), exactly as it would alone at serving time."""
        B, L = input_ids.shape
        h = self.embed(input_ids)
        pos = position_ids if position_ids is not None else torch.arange(L, device=input_ids.device)[None].expand(B, L)
        cos, sin = self.rope(h, pos)
        mask = masks.document_causal_mask(segment_ids) if segment_ids is not None else None
        kv = []
        for layer in self.decoder.layers:
            def attend(q, k, v, layer=layer):
                kv.append((k, v))
                return sdpa(q, k, v, mask, layer.self_attn.scaling, causal=True)
            h = layer_step(layer, h, cos, sin, "ar", attend)
        return self.decoder.norm(h), kv

    def ar_cached(self, ids: torch.Tensor, cache: StaticKVCache, real_tokens: bool = False) -> torch.Tensor:
        """Prefill / verify: causal pass of `ids` (B, T) at positions lengths+t, writing its K/V to the
        cache. Returns final hidden (B, T, H). Does not advance `cache.lengths`. real_tokens: see `embed`."""
        return self._cached_pass(self.embed(ids, real_tokens), cache,
                                 masks.cached_causal_mask(cache.lengths, cache.slots, ids.shape[1]), "ar")

    def _cached_pass(self, h: torch.Tensor, cache: StaticKVCache, mask: torch.Tensor, view: str) -> torch.Tensor:
        """One pass of the embedded tokens `h` (B, T, H) at positions lengths..lengths+T-1 through the `view`
        ("ar" | "diff") projections: every layer writes its K/V into those cache slots and attends over the cache
        under `mask` (B, 1, T, S). Returns final hidden (B, T, H); `cache.lengths` is not advanced.
        What every layer shares is built once per pass: RoPE tables, the cache write index, the prepared mask.
        Each layer's MLP output stays pending (`decode_layer_step`) and is added by the next layer's input norm, the
        last one by the final norm: with the "triton" decode norm each residual add runs in its norm's kernel.
        Each layer writes its K/V right after its RoPE (`cache.layer_slots`: with the "triton" K/V write, in the RoPE's
        kernel), before it attends."""
        T = h.shape[1]
        pos = cache.lengths[:, None] + torch.arange(T, device=h.device)[None]
        cos, sin = self.rope(h, pos)
        idx = cache.write_index(T)
        dm = DecodeMask(mask, self.config.num_attention_heads, self.config.num_key_value_heads, h.dtype,
                        self.decoder.layers[0].self_attn.head_dim)
        r = None  # the previous layer's MLP output, not yet added to h
        for i, layer in enumerate(self.decoder.layers):
            def attend(q, k, v, i=i, layer=layer):  # k, v: already in the cache (written by the layer step)
                return cached_attention(q, cache.k[i].to(q.dtype), cache.v[i].to(q.dtype), dm,
                                        layer.self_attn.scaling)
            h, r = decode_layer_step(layer, h, r, cos, sin, view, attend, cache.layer_slots(i, idx))
        return decode_add_rms_norm(self.decoder.norm, h, r)[1]

    def new_cache(self, batch: int, slots: int, device=None, dtype=None) -> StaticKVCache:
        p = next(self.backbone.parameters())
        attn = self.decoder.layers[0].self_attn
        kvh = self.config.num_key_value_heads
        return StaticKVCache.allocate(len(self.decoder.layers), batch, kvh, slots, attn.head_dim,
                                      dtype=dtype or p.dtype, device=device or p.device)

    # ---- training ---------------------------------------------------------------------------
    def student_hidden(self, input_ids, ar_hidden, kv, anchors, valid, sup: Supervision, docs=None) -> torch.Tensor:
        raise NotImplementedError

    def train_outputs(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, n_anchors: int,
                      generator: torch.Generator | None = None, anchors=None,
                      segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      sup: Supervision | None = None) -> TrainBatchOut:
        """Frozen AR pass + the heads' pass over N sampled anchor blocks; student/teacher hidden states
        at every supervised position, for a loss over the shared lm_head. `segment_ids`/`position_ids`
        (from the packer) keep documents of a packed row apart. `sup`: the supervision map of `anchors`,
        already computed (the trainer builds it on the host ahead of the step: no device sync here)."""
        if anchors is None:
            anchors, valid = sample_anchors(loss_mask, n_anchors, generator)
        else:
            anchors, valid = anchors
        if sup is None:
            sup = supervision(anchors, valid, loss_mask, self.block_size, segment_ids)
        ar_hidden, kv = self.ar_pass(input_ids, segment_ids, position_ids)
        docs = (segment_ids, position_ids) if segment_ids is not None else None
        hs = self.student_hidden(input_ids, ar_hidden, kv, anchors, valid, sup, docs)
        ht = ar_hidden[sup.batch, sup.teacher_pos]
        return TrainBatchOut(hs=hs, ht=ht, sup=sup)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changed (or added), under the names export uses. The values are the live
        parameters/buffers themselves (copying into them loads a checkpoint)."""
        raise NotImplementedError

    # ---- decoding ---------------------------------------------------------------------------
    def propose_hidden(self, state: DecodeState) -> torch.Tensor:
        """Final hidden states (B, K-1, H) whose LM head gives the draft logits (`propose`); the greedy decode paths
        take their argmax without the logits (`decode.lm_head`). May be a strided view."""
        raise NotImplementedError

    def propose(self, state: DecodeState) -> torch.Tensor:
        """Draft logits (B, K-1, V) for the next K-1 tokens after x_a."""
        return self.logits(self.propose_hidden(state))

    def forward(self, input_ids, **kw):
        """Diffusion off: the stock backbone, untouched."""
        return self.backbone(input_ids=input_ids, **kw)


class OrthrusModel(DraftModel):
    head_type = "orthrus"

    def __init__(self, backbone, block_size: int = 32, trainable: tuple[str, ...] | list[str] = TWINS, **kw):
        super().__init__(backbone, block_size, **kw)
        unknown = set(trainable) - set(TWINS)
        if unknown:
            raise ValueError(f"unknown twins in heads.trainable: {sorted(unknown)}; choose from {list(TWINS)}")
        for layer in self.decoder.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj") + (("q_norm", "k_norm") if self.family.qk_norm else ()):
                twin = make_twin(getattr(attn, name))  # starts as a copy of the frozen AR weights
                twin.requires_grad_(name + "_diff" in trainable)
                setattr(attn, name + "_diff", twin)
        if not any(p.requires_grad for p in self.parameters()):
            warnings.warn("heads.trainable selects no parameter of this backbone family: nothing will train")

    def twin_names(self) -> list[str]:
        return [n for n, _ in self.backbone.named_parameters() if "_diff." in n]

    def head_state_dict(self):
        tensors = dict(self.backbone.named_parameters())
        out = {n: p for n, p in tensors.items() if "_diff." in n}
        if self.mask_embedding is not None:
            out["mask_embedding"] = self.mask_embedding
        return out

    def _diffusion_layers(self, h, cos, sin, prefix, attention):
        """The diffusion view over a block stream. In every layer the block's keys/values are appended
        to `prefix(layer_idx) -> (K, V)` (the AR keys it may see) and `attention(q, k, v, scale)` applies
        the visibility rule of the caller (dual-pass mask in training, prefix+block at decode time)."""
        for i, layer in enumerate(self.decoder.layers):
            def attend(q, k, v, i=i, layer=layer):
                pk, pv = prefix(i)
                return attention(q, torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2),
                                 layer.self_attn.scaling)

            def step(h, attend=attend, layer=layer):
                return layer_step(layer, h, cos, sin, "diff", attend)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(step, h, use_reentrant=False)
            else:
                h = step(h)
        return self.decoder.norm(h)

    def diffusion_train(self, input_ids, kv, anchors, docs=None) -> torch.Tensor:
        """All N blocks of every row in one pass under the dual-pass mask. Returns (B, N*K, H).
        docs = (segment_ids, position_ids) of packed rows, or None."""
        B, L = input_ids.shape
        N, K = anchors.shape[1], self.block_size
        seg, position_ids = docs if docs is not None else (None, None)
        i = torch.arange(K, device=input_ids.device)
        start = position_ids.gather(1, anchors) if position_ids is not None else anchors
        pos = (start[:, :, None] + i).view(B, N * K)
        ids = torch.full((B, N, K), self.mask_token_id, dtype=torch.long, device=input_ids.device)
        ids[:, :, 0] = input_ids.gather(1, anchors)
        h = self.embed(ids.view(B, N * K))
        cos, sin = self.rope(h, pos)
        if self.attn_backend == "flex":
            bm = masks.dual_pass_block_mask(anchors, L, K, heads=self.config.num_attention_heads, segment_ids=seg)
            attention = lambda q, k, v, scale: flex(q, k, v, bm, scale)  # noqa: E731
        else:
            dense = masks.dual_pass_mask_dense(anchors, L, K, seg)
            attention = lambda q, k, v, scale: sdpa(q, k, v, dense, scale)  # noqa: E731
        return self._diffusion_layers(h, cos, sin, lambda li: kv[li], attention)

    def student_hidden(self, input_ids, ar_hidden, kv, anchors, valid, sup, docs=None):
        stream = self.diffusion_train(input_ids, kv, anchors, docs)
        return stream[sup.batch, sup.stream_pos]

    def draft(self, block_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Inference diffusion pass: block (B, K) at positions lengths..lengths+K-1 over the cache
        prefix (< lengths). Returns final hidden (B, K, H)."""
        # The block's keys/values go into the cache slots it occupies (lengths..lengths+K-1, past every
        # committed slot; the verify pass over the same K positions overwrites them before they count), so
        # attention reads the cache in place instead of a per-layer copy of cache + block.
        return self._draft(self.embed(block_ids), cache)

    def _draft(self, h: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        return self._cached_pass(h, cache, masks.draft_cached_mask(cache.lengths, cache.slots, h.shape[1]), "diff")

    def propose_hidden(self, state: DecodeState) -> torch.Tensor:
        # == self.draft([x_a, mask, ..., mask]), with the block embedded without building its ids; the last
        # position predicts past the block (unused): a (B, K-1, H) view of the pass's output
        return self._draft(self.embed_block(state.last_token, self.block_size), state.cache)[:, :-1]


class ResBlock(nn.Module):
    def __init__(self, hidden: int, dtype=None):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, dtype=dtype)
        nn.init.zeros_(self.linear.weight)  # starts as identity: every head first predicts the next token
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class MedusaModel(DraftModel):
    """Medusa-style baseline: K-1 residual MLP heads on the final hidden state at a-1, sharing the frozen
    lm_head. Head i proposes x_{a+i+1} (same targets as Orthrus block offset i). It needs no extra
    backbone pass to draft (it reads the hidden state the last verify pass produced)."""
    head_type = "medusa"
    draft_passes_per_step = 0
    uses_last_hidden = True

    def __init__(self, backbone, block_size: int = 32, **kw):
        super().__init__(backbone, block_size, **kw)
        p = next(backbone.parameters())
        self.heads = nn.ModuleList([ResBlock(self.config.hidden_size, dtype=p.dtype).to(p.device)
                                    for _ in range(block_size - 1)])

    def head_state_dict(self):
        return {f"medusa_heads.{k}": v for k, v in self.heads.named_parameters()}

    def _apply_heads(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., K-1, H)"""
        return torch.stack([head(h) for head in self.heads], dim=-2)

    def student_hidden(self, input_ids, ar_hidden, kv, anchors, valid, sup, docs=None):
        base = ar_hidden[sup.batch, sup.teacher_pos - sup.offset - 1]  # hidden at a-1
        out = torch.empty_like(base)
        for i, head in enumerate(self.heads):
            sel = sup.offset == i
            if sel.any():
                out = out.index_put((sel.nonzero(as_tuple=True)[0],), head(base[sel]))
        return out

    def propose_hidden(self, state: DecodeState) -> torch.Tensor:
        return self._apply_heads(state.last_hidden)


def build_draft_model(head_type: str, backbone, **kw) -> DraftModel:
    if head_type == "orthrus":
        return OrthrusModel(backbone, **kw)
    if head_type == "medusa":
        kw.pop("trainable", None)
        return MedusaModel(backbone, **kw)
    raise ValueError(f"heads.type must be 'orthrus' or 'medusa', got {head_type!r}")
