"""The exported runtime (modeling_orthrus), loaded the way users load it: AutoModelForCausalLM + trust_remote_code."""

import copy
import math

import pytest
import torch
from orthrus_export_testlib import FAMILIES, MASK_ID, VOCAB, greedy_ar, load_remote, prompt, tiny_backbone

from orthrus_train.export.modeling_orthrus import OrthrusConfig, OrthrusLM


# ------------------------------------------------------------------------------------------------ structure
def test_state_dict_names_are_the_official_layout():
    backbone, config = tiny_backbone("qwen3")
    model = OrthrusLM(OrthrusConfig.from_backbone_config(config, block_size=4, mask_token_id=MASK_ID))
    keys = set(model.state_dict())
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in keys)
    assert not any(k.startswith("model.model.") for k in keys)
    assert set(backbone.state_dict()) <= keys  # every stock name, unchanged
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        assert {p + f"{n}_diff.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")} <= keys
    assert keys - set(backbone.state_dict()) == {k for k in keys if "_diff." in k}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as configured


@pytest.mark.parametrize(
    "family,bias,norms", [("qwen2", True, False), ("llama", False, False), ("qwen3_moe", False, True)]
)
def test_twins_mirror_the_family(family, bias, norms):
    _, config = tiny_backbone(family)
    keys = set(OrthrusLM(OrthrusConfig.from_backbone_config(config, 4, MASK_ID)).state_dict())
    p = "model.layers.1.self_attn."
    assert all((p + f"{n}_proj_diff.bias" in keys) == bias for n in "qkv")
    assert p + "o_proj_diff.bias" not in keys  # no backbone here has an o_proj bias
    assert (p + "q_norm_diff.weight" in keys) == norms and (p + "k_norm_diff.weight" in keys) == norms


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_the_backbone_config(family):
    _, config = tiny_backbone(family)
    orthrus = OrthrusConfig.from_backbone_config(config, block_size=8, mask_token_id=MASK_ID)
    assert orthrus.model_type == "orthrus" and orthrus.backbone_model_type == family
    assert orthrus.backbone_config().to_dict() == config.to_dict()


# ------------------------------------------------------------------------------------------------ AR equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_plain_generate_equal_the_backbone(exported, family):
    backbone, _, _, folder = exported[family]
    model = load_remote(folder)
    assert type(model).__module__.startswith("transformers_modules")  # the folder's own copy of the code
    ids = prompt(9)
    with torch.no_grad():
        got, want = model(ids).logits, backbone(ids).logits
    if family == "qwen3_moe":  # same weights and code; the grouped-mm expert kernel differs by ~1e-7 per buffer
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, want)
    ar = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, use_diffusion_mode=False)
    assert torch.equal(ar, greedy_ar(backbone, ids, 8))


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusion_greedy_is_lossless(exported, family):
    backbone, _, _, folder = exported[family]
    model = load_remote(folder)
    ids = prompt(7)
    no_eos = VOCAB + 1  # decode the whole budget (EOS handling: test_stops_at_eos_like_ar_generate)
    expected = greedy_ar(backbone, ids, 30, eos_token_id=no_eos)
    assert torch.equal(model.generate(ids, max_new_tokens=30, eos_token_id=no_eos), expected)
    stats = model.last_generate_stats
    assert stats["new_tokens"] == 30
    assert stats["draft_passes"] == stats["verify_passes"] < 29  # some drafts were accepted
    for n in (1, 2, 5):  # short budgets: the last block is cut to what is still needed
        assert torch.equal(model.generate(ids, max_new_tokens=n, eos_token_id=no_eos), expected[:, : 7 + n])


def test_stops_at_eos_like_ar_generate(exported):
    backbone, _, _, folder = exported["llama"]
    model = load_remote(folder)
    ids = prompt(6)
    free_run = greedy_ar(backbone, ids, 20)[0, 6:].tolist()
    eos = free_run[6]
    expected = greedy_ar(backbone, ids, 20, eos_token_id=eos)
    got = model.generate(ids, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(got, expected)
    assert got[0, -1].item() == eos and got.shape[1] == 6 + free_run.index(eos) + 1


def test_every_acceptance_length_is_lossless(exported):
    """Oracle drafts (right except at chosen positions) drive full, partial and zero acceptance."""
    backbone, _, _, folder = exported["qwen2"]
    model = load_remote(folder)
    ids = prompt(5)
    truth = greedy_ar(backbone, ids, 24)[0].tolist()
    calls = []

    def oracle_draft(block, cache):
        start, k = len(cache), block.shape[1]
        wrong_at = [None, 0, 1, 2][len(calls) % 4]  # full acceptance, then 0, 1, 2 accepted drafts
        logits = torch.zeros(1, k, VOCAB)
        for i in range(k - 1):
            target = truth[start + i + 1] if start + i + 1 < len(truth) else 0
            logits[0, i, (target + 1) % VOCAB if i == wrong_at else target] = 1.0
        calls.append(k)
        return logits

    model.draft = oracle_draft
    assert model.generate(ids, max_new_tokens=24)[0].tolist() == truth
    assert model.last_generate_stats["verify_passes"] == len(calls) < 12


# ------------------------------------------------------------------------------------------------ draft pass
def _rms(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x, positions, theta):
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions[:, None].double() * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def dense_reference(model, prompt_ids, block_ids):
    """float64 dual pass over [prompt; block] with one explicit mask: prompt rows are causal AR rows (AR weights);
    block rows use the *_diff weights and see every prompt key and every block key. Returns all rows' logits."""
    m = copy.deepcopy(model).double()
    cfg = m.config
    a, n = prompt_ids.shape[1], prompt_ids.shape[1] + block_ids.shape[1]
    q_idx, k_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = torch.where(q_idx < a, k_idx <= q_idx, torch.ones(n, n, dtype=torch.bool))
    is_block = torch.arange(n) >= a
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    x = m.model.embed_tokens(torch.cat([prompt_ids, block_ids], 1))[0]
    for i, layer in enumerate(m.model.layers):
        attn = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)

        def proj(name, rows):  # rows of `h` through the AR module or its twin
            return torch.where(rows[:, None], getattr(attn, name + "_diff")(h), getattr(attn, name)(h))

        q = proj("q_proj", is_block).view(n, heads, head_dim)
        k = proj("k_proj", is_block).view(n, kv_heads, head_dim)
        v = proj("v_proj", is_block).view(n, kv_heads, head_dim)
        if hasattr(attn, "q_norm"):
            q = torch.where(
                is_block[:, None, None],
                _rms(q, attn.q_norm_diff.weight, cfg.rms_norm_eps),
                _rms(q, attn.q_norm.weight, cfg.rms_norm_eps),
            )
            k = torch.where(
                is_block[:, None, None],
                _rms(k, attn.k_norm_diff.weight, cfg.rms_norm_eps),
                _rms(k, attn.k_norm.weight, cfg.rms_norm_eps),
            )
        pos = torch.arange(n)
        q, k = _rope(q.transpose(0, 1), pos, theta), _rope(k.transpose(0, 1), pos, theta)
        out = torch.zeros(heads, n, head_dim, dtype=torch.float64)
        for hd in range(heads):
            kv = hd // (heads // kv_heads)
            scores = (q[hd] @ k[kv].T) / math.sqrt(head_dim)
            out[hd] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.transpose(0, 1)[kv]
        out = out.transpose(0, 1).reshape(n, heads * head_dim)
        x = x + torch.where(is_block[:, None], attn.o_proj_diff(out), attn.o_proj(out))
        h = _rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):
            x = x + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        else:  # MoE block: shared and frozen, not what is tested here; its expert kernel has no float64
            x = x + model.model.layers[i].mlp(h[None].float())[0].double()
    return m.lm_head(_rms(x, m.model.norm.weight, cfg.rms_norm_eps))


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_pass_matches_dense_reference(exported, family):
    backbone, _, _, folder = exported[family]
    model = load_remote(folder)
    ids = prompt(6)
    block = torch.tensor([[17] + [MASK_ID] * 3])
    ref = dense_reference(model, ids, block)
    with torch.no_grad():
        torch.testing.assert_close(
            ref[:6].float(), backbone(ids).logits[0], atol=1e-4, rtol=1e-4
        )  # the reference's AR rows
    logits, cache = model.prefill(ids)
    draft = model.draft(block, cache)
    assert len(cache) == 6  # drafting leaves the cache untouched
    torch.testing.assert_close(draft[0].double(), ref[6:], atol=1e-4, rtol=1e-4)
    causal = dense_reference_with_causal_block(model, ids, block)
    assert (draft[0].double() - causal).abs().max() > 1e-3  # the block really is bidirectional


def dense_reference_with_causal_block(model, prompt_ids, block_ids):
    """Same as dense_reference, but the block is fed one prefix at a time (so it can only look backwards)."""
    rows = [dense_reference(model, prompt_ids, block_ids[:, : i + 1])[-1] for i in range(block_ids.shape[1])]
    return torch.stack(rows)


def test_verify_appends_ar_keys(exported):
    backbone, _, _, folder = exported["qwen3"]
    model = load_remote(folder)
    ids = prompt(9)
    _, cache = model.prefill(ids[:, :5])
    verify = model.verify(ids[:, 5:], cache)
    assert len(cache) == 9
    with torch.no_grad():
        torch.testing.assert_close(verify[0], backbone(ids).logits[0, 5:], atol=1e-5, rtol=1e-5)
    cache.truncate(6)
    assert len(cache) == 6 and all(k.shape[2] == 6 for k in cache.keys + cache.values)


# ------------------------------------------------------------------------------------------------ batch, sampling
def test_batch_rows_match_single_row_decoding(exported):
    backbone, _, _, folder = exported["qwen3_moe"]
    model = load_remote(folder)
    a, b = prompt(7, seed=1), prompt(4, seed=2)
    padded = torch.cat([a, torch.cat([torch.full((1, 3), 2), b], 1)])  # left padding with pad id 2
    mask = torch.cat([torch.ones(1, 7), torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], 1)]).long()
    got = model.generate(padded, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(got[0, 7:], greedy_ar(backbone, a, 10)[0, 7:])
    assert torch.equal(got[1, 7:], greedy_ar(backbone, b, 10)[0, 4:])


def test_streamer_receives_prompt_then_every_token(exported):
    _, _, _, folder = exported["qwen3"]
    model = load_remote(folder)

    class Streamer:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer, ids = Streamer(), prompt(5)
    out = model.generate(ids, max_new_tokens=11, eos_token_id=VOCAB + 1, streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 5:].tolist() and len(out[0, 5:]) == 11


def test_sampling_runs_and_respects_budget(exported):
    _, _, _, folder = exported["llama"]
    model = load_remote(folder)
    torch.manual_seed(0)
    out = model.generate(prompt(5), max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.95)
    assert out.shape == (1, 17) and int(out.min()) >= 0 and int(out.max()) < VOCAB
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(prompt(5), max_new_tokens=4, num_beams=2)


def test_rejection_sampling_preserves_the_target_distribution():
    """First emitted token ~ p whatever the draft distribution q (accept min(1,p/q), else residual)."""
    torch.manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    counts = torch.zeros(4)
    n = 10000
    for _ in range(n):
        draft = torch.multinomial(q[0], 1)
        m, bonus = OrthrusLM._rejection_sample(draft, q, p)
        counts[draft.item() if m == 1 else bonus] += 1
    torch.testing.assert_close(counts / n, p[0], atol=0.02, rtol=0)
