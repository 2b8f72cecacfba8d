"""Decode steps stay lean: op budgets of one AR step and one drafted step (a CPU proxy for the kernels a CUDA
graph replays; `orthrus_train/decode/opcount.py`), and the lean decode path computes exactly what the
backbone's own modules compute."""
import pytest
import torch

from orthrus_train.decode import opcount, rng
from orthrus_train.model import build_random, layers, tiny_config

# Non-view aten ops of one step, 2-layer tiny models in bf16, K=4 (opcount.build_engine(shape, B, block_size=4,
# layers=2, slots=32, prompt_len=5)), as measured when the budget was set (session 4, 2026-11-30). The code
# before that session took, in the same order: qwen3 AR 372 / drafted 527 (B=1), 537 (B=2); sampled AR 441,
# drafted 793 / 803; llama AR 343 / drafted 469 / 479; sampled AR 412, drafted 735 / 745.
# If a change lowers a count, lower the budget to the new count (print it with
# `python scripts/count_decode_ops.py --shape tiny-qwen3 tiny-llama` or the loop below); if a change must add
# ops to a decode step, raise it only with a reason in the commit message (every op is ~1-2 us per step on a GPU).
# Session 5 fused the decode projections (one q/k/v matmul per view, one gate/up matmul: 4 ops fewer per layer
# and pass): from (136, 271), (275, 513), (136, 280), (275, 522), (120, 239), (259, 481), (120, 248), (259, 490).
# The drafted step at batch > 1 then gained one op (copy): its LM head runs as one GEMM over the (B*(K-1), H) rows,
# copied out of the draft pass's (B, K, H) output, instead of a bmm over the strided slice that read the weight
# expanded over the batch (re-read once per row on a GPU: 172 us on an H200 at batch 16; tests/model/test_lm_head.py).
# The joint q/k norm weight built once per fusion (no cat per layer and pass; after session 18's profile): Qwen3
# from (128, 255), (267, 497), (128, 265), (267, 507).
BUDGET = {  # (shape, batch, sampled): (AR step, drafted step)
    ("tiny-qwen3", 1, False): (126, 251), ("tiny-qwen3", 1, True): (265, 493),
    ("tiny-qwen3", 2, False): (126, 261), ("tiny-qwen3", 2, True): (265, 503),
    ("tiny-llama", 1, False): (112, 223), ("tiny-llama", 1, True): (251, 465),
    ("tiny-llama", 2, False): (112, 233), ("tiny-llama", 2, True): (251, 475),
}


@pytest.mark.parametrize("shape", ["tiny-qwen3", "tiny-llama"])
def test_decode_step_op_budget(shape):
    for B in (1, 2):  # B=2: batched blocks take the "fold" attention
        eng, prompts = opcount.build_engine(shape, B, block_size=4, layers=2, slots=32, prompt_len=5)
        for sampled in (False, True):
            c = opcount.count_engine(eng, prompts, sampled)
            got = (c["ar"].total(), c["spec"].total())
            ar, spec = BUDGET[(shape, B, sampled)]
            assert got[0] <= ar and got[1] <= spec, (
                f"{shape} B={B} {'sampled' if sampled else 'greedy'}: AR step {got[0]} ops (budget {ar}), drafted "
                f"step {got[1]} ops (budget {spec}); top ops {c['spec'].most_common(8)}")
            assert c["ar_syncs"] == c["spec_syncs"] == 0  # no host synchronization inside a step


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_decode_layer_is_bit_identical(family, dtype):
    """layer_step(decode=True) (joint q/k norm + RoPE, RMSNorm with the cast in the multiply) == the backbone's
    modules (decode=False, what training runs), and the sign-folded RoPE == transformers' rotate_half form."""
    bb = build_random(tiny_config(family, vocab_size=64, layers=1), seed=0).to(dtype)
    layer, dec = bb.model.layers[0], bb.model
    with torch.no_grad():
        for p in layer.parameters():  # norms away from 1, so their weights matter
            p.add_(torch.randn_like(p) * 0.1)
        g = torch.Generator().manual_seed(1)
        h = torch.randn(3, 5, bb.config.hidden_size, generator=g).to(dtype)
        pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [30, 31, 32, 33, 34]])
        cos, sin = dec.rotary_emb(h, pos)
        tables = layers.rope_tables(cos, sin)
        seen = {}

        def attend(q, k, v, key):
            seen[key] = (q, k, v)
            return layers.sdpa(q, k, v, None, layer.self_attn.scaling, causal=True)

        out = {d: layers.layer_step(layer, h, *tables, "ar", lambda q, k, v, d=d: attend(q, k, v, d), decode=d)
               for d in (False, True)}
        assert torch.equal(out[False], out[True])
        for a, b in zip(seen[False], seen[True]):
            assert torch.equal(a, b)
        # RoPE as transformers writes it
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        q, k = seen[False][0], seen[False][1]
        x = torch.randn(q.shape, generator=g).to(dtype)
        ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
        assert torch.equal(layers.apply_rope(x, *tables), ref)
        # RMSNorm as the module computes it
        n = layer.input_layernorm
        assert torch.equal(layers.rms_norm(h, n.weight, n.variance_epsilon), n(h))


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_projections_are_bit_identical_and_stay_in_sync(family, dtype):
    """DecodeFusion: the decode layer with one q/k/v matmul per view and one gate/up matmul == the backbone's
    modules bit for bit (qwen2: with q/k/v biases); the parameters become slices of the fused weights (same
    values, nothing kept twice); the fused weights are attached only inside `with fusion:`; writes into the
    parameters (load_state_dict) reach the fused weights; a replaced parameter is noticed and fused again."""
    from types import SimpleNamespace

    bb = build_random(tiny_config(family, vocab_size=64, layers=1), seed=0).to(dtype)
    layer, dec = bb.model.layers[0], bb.model
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, bb.config.hidden_size, generator=g).to(dtype)
    pos = torch.arange(5)[None].expand(3, 5) + torch.tensor([[0], [7], [30]])
    tables = layers.rope_tables(*dec.rotary_emb(h, pos))

    def step(decode):
        with torch.no_grad():
            return layers.layer_step(layer, h, *tables, "ar",
                                     lambda q, k, v: layers.sdpa(q, k, v, None, layer.self_attn.scaling, causal=True),
                                     decode=decode)
    ref = step(False)
    fusion = layers.DecodeFusion(SimpleNamespace(decoder=dec))
    assert fusion.refresh() is True
    assert fusion.refresh() is False  # already fused: nothing to redo
    attn, mlp = layer.self_attn, layer.mlp
    assert "_orthrus_qkv" not in attn.__dict__  # attached only inside `with fusion:`
    with fusion:
        W = attn.__dict__["_orthrus_qkv"][0]
        assert attn.q_proj.weight.data_ptr() == W.data_ptr() and mlp.__dict__["_orthrus_gate_up"] is not None
        if family == "qwen2":
            assert attn.__dict__["_orthrus_qkv"][1] is not None  # the biases are fused too
        fused_out = step(True)
    assert "_orthrus_qkv" not in attn.__dict__ and "_orthrus_gate_up" not in mlp.__dict__
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(fused_out, ref) and torch.equal(step(True), ref) and torch.equal(step(False), ref)
    # a write into a parameter (what load_state_dict does) is a write into the fused weight
    changed = {k: v + 1 if k.endswith("k_proj.weight") else v for k, v in before.items()}
    bb.load_state_dict(changed)
    ref2 = step(False)
    assert fusion.refresh() is False
    with fusion:
        assert not torch.equal(ref2, ref) and torch.equal(step(True), ref2)
    # a replaced parameter is not in the fused weight any more: the next refresh fuses again
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach().clone() * 2)
    assert fusion.refresh() is True
    with fusion:
        assert torch.equal(step(True), step(False))


def test_prepared_decode_mask_is_bit_identical():
    """The additive mask prepared once per pass gives SDPA's own result for the boolean mask, every impl."""
    from orthrus_train.model import masks

    g = torch.Generator().manual_seed(0)
    B, T, S, D, hq, hkv = 3, 5, 40, 8, 4, 2
    q = torch.randn(B, hq, T, D, generator=g)
    k, v = torch.randn(B, hkv, S, D, generator=g), torch.randn(B, hkv, S, D, generator=g)
    lengths = torch.tensor([0, 7, 30])
    for mask in (masks.cached_causal_mask(lengths, S, T), masks.draft_cached_mask(lengths, S, T)):
        for impl in ("sdpa", "fold", "math"):
            prev = layers.decode_attention()
            layers.set_decode_attention(impl)
            try:
                if impl == "sdpa":
                    ref = layers.sdpa(q, k, v, mask, 0.3)
                else:  # the folded layout, boolean mask: the pre-session formulation
                    qf = q.reshape(B, hkv, 2 * T, D)
                    mf = mask[:, :, None].expand(B, 1, 2, T, S).reshape(B, 1, 2 * T, S)
                    if impl == "fold":
                        ref = torch.nn.functional.scaled_dot_product_attention(qf, k, v, attn_mask=mf, scale=0.3)
                    else:
                        s = (qf @ k.transpose(-1, -2)).float() * 0.3
                        ref = s.masked_fill(~mf, float("-inf")).softmax(-1).to(v.dtype) @ v
                    ref = ref.reshape(B, hq, T, D)
                dm = layers.DecodeMask(mask, hq, hkv, q.dtype)
                assert dm.impl == impl
                assert torch.equal(layers.cached_attention(q, k, v, dm, 0.3), ref), impl
            finally:
                layers.set_decode_attention(prev)


def test_hoisted_uniforms_equal_the_reference_hash():
    """counter_uniforms in three parts (seed / counter / slot) and the 6-op _mul32 == the original formulation."""
    M = 0xFFFFFFFF

    def mul32_ref(x, c):
        return (((x & 0xFFFF) * c) + ((((x >> 16) * c) & 0xFFFF) << 16)) & M

    def fmix_ref(x):
        x = x ^ (x >> 16)
        x = mul32_ref(x, 0x85EBCA6B)
        x = x ^ (x >> 13)
        x = mul32_ref(x, 0xC2B2AE35)
        return x ^ (x >> 16)

    def uniforms_ref(seeds, counters, offset, n):
        lo, hi = seeds & M, (seeds >> 32) & M
        h = fmix_ref(fmix_ref(fmix_ref(lo ^ 0x6A09E667) ^ hi) ^ (counters & M))
        slots = torch.arange(offset, offset + n)
        h = fmix_ref(h[:, None] ^ fmix_ref(mul32_ref(slots, 0x9E3779B1) ^ 0x3C6EF372)[None, :])
        h = fmix_ref(h ^ 0xBB67AE85)
        return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))

    g = torch.Generator().manual_seed(0)
    seeds = torch.cat([torch.randint(0, 2 ** 62, (64,), generator=g), torch.tensor([0, 1, 2 ** 63 - 1])])
    counters = torch.randint(0, 2 ** 40, (67,), generator=g)
    x = torch.randint(0, 2 ** 32, (4096,), generator=g)
    for c in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B1):
        assert torch.equal(rng._mul32(x, c), mul32_ref(x, c))
    for offset, n in ((0, 15), (15, 16), (15, 1)):
        ref = uniforms_ref(seeds, counters, offset, n)
        assert torch.equal(rng.counter_uniforms(seeds, counters, offset, n), ref)
        assert torch.equal(rng.uniforms_from_hashes(rng.seed_hash(seeds), counters, rng.slot_hash(offset, n)), ref)


def test_two_fusions_of_one_model_share_the_fused_weights():
    """Two engines on one model (an eager and a graphed one, or an eval's engines) share one fusion: neither
    re-fuses the parameters away from the other, so neither drops its CUDA graphs or compiled steps on every
    call (session 17: the second engine's re-fusion dropped the first's graphs, and the recapture into the
    released pool failed on the GPU), and the projection weights are not held twice."""
    from types import SimpleNamespace

    bb = build_random(tiny_config("qwen3", vocab_size=64, layers=2), seed=0)
    dec = bb.model
    a, b = layers.DecodeFusion(SimpleNamespace(decoder=dec)), layers.DecodeFusion(SimpleNamespace(decoder=dec))
    assert a.refresh() is True and b.refresh() is True  # each one's first look
    assert a.refresh() is False and b.refresh() is False and a.refresh() is False
    assert [f[0] for _, _, f in a.entries] and all(fa is fb for (_, _, fa), (_, _, fb) in zip(a.entries, b.entries))
    # a replaced parameter: whichever refreshes first re-fuses, and both see the change once
    attn = dec.layers[0].self_attn
    attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight.detach().clone())
    assert b.refresh() is True and a.refresh() is True and a.refresh() is False and b.refresh() is False
    with a:
        assert attn.q_proj.weight.data_ptr() == attn.__dict__["_orthrus_qkv"][0].data_ptr()


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """(op name, output shape) of every op run under it."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.log.append((opcount.op_name(func), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_qk_norm_weight_is_built_once_per_fusion(dtype):
    """The joint q/k norm weight (q_norm's row Hq times, k_norm's Hkv times) is built by the fusion, not by a
    `torch.cat` in every layer of every decode pass (60 us of a Qwen3-8B AR step on an H200, session 18): with the
    fusion attached, a verify pass and a draft pass of a tiny Qwen3 run no cat of that shape (without it: one per
    layer and pass, as before), and the hidden states and cache contents are bit-identical. An in-place write into
    a norm weight (load_state_dict, an optimizer step) reaches it at the next refresh, at the same address (CUDA
    graphs that read it stay valid: refresh reports no change); a replaced norm weight builds a new one."""
    from orthrus_train.model import OrthrusModel

    bb = build_random(tiny_config("qwen3", vocab_size=128, hidden_size=128, layers=2, heads=4, kv_heads=2,
                                  initializer_range=0.2), seed=0)
    m = OrthrusModel(bb, block_size=4, vocab_len=120).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # the q/k norms away from 1 and from each other (and the twins from the AR norms)
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).to(dtype) * 0.3)
    attn = m.decoder.layers[0].self_attn
    Hq, Hkv, D = m.config.num_attention_heads, m.config.num_key_value_heads, attn.head_dim
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 120, (2, 5), generator=g)

    def passes():
        """Hidden states and cache contents of a prefill, a verify and a draft pass; the ops they ran."""
        cache = m.new_cache(2, 16)
        with torch.no_grad(), _OpLog() as log:
            out = [m.ar_cached(ids, cache)]
            cache.lengths += 5
            out += [m.ar_cached(ids[:, :4], cache), m.draft(ids[:, :4], cache)]
        return out + cache.k + cache.v, [shape for name, shape in log.log if name == "cat"]

    ref, cats = passes()
    layer_cats = cats.count((Hq + Hkv, D))
    assert layer_cats == 3 * len(m.decoder.layers)  # without the fusion: one per layer and pass, as before
    fusion = layers.DecodeFusion(m)
    assert fusion.refresh() is True
    with fusion:
        got, cats = passes()
    assert (Hq + Hkv, D) not in cats
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    joint = attn.__dict__.get("_orthrus_qk_norm")
    assert joint is None  # attached only inside `with fusion:`
    with fusion:
        joint, joint_diff = attn.__dict__["_orthrus_qk_norm"], attn.__dict__["_orthrus_qk_norm_diff"]
    assert torch.equal(joint, torch.cat([attn.q_norm.weight.expand(Hq, D), attn.k_norm.weight.expand(Hkv, D)]))
    assert not torch.equal(joint, joint_diff)
    # an in-place write (what load_state_dict and optimizers do): refilled at the same address, no change reported
    with torch.no_grad():
        attn.k_norm_diff.weight.mul_(1.5)
    ref, _ = passes()
    assert fusion.refresh() is False
    with fusion:
        got, _ = passes()
        assert attn.__dict__["_orthrus_qk_norm_diff"] is joint_diff
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # a replaced weight: a new joint weight, reported as a change (graphs over the old one are dropped)
    attn.q_norm.weight = torch.nn.Parameter(attn.q_norm.weight.detach() * 0.5, requires_grad=False)
    ref, _ = passes()
    assert fusion.refresh() is True
    with fusion:
        got, _ = passes()
        assert attn.__dict__["_orthrus_qk_norm"] is not joint
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_extrapolated_counts_equal_the_full_model():
    """`count_steps(extrapolate=True)` (the interpreter's fast mode: 1- and 2-layer models only) gives the counts of
    the model with all its layers: op by op, for both steps, greedy and sampled (a 4-layer SmolLM2 shape)."""
    e1, e2, e4 = (opcount.build_engine("smollm2-135m", 2, 4, layers=n, slots=32, prompt_len=5) for n in (1, 2, 4))
    for sampled in (False, True):
        c1, c2, c4 = (opcount.count_engine(*e, sampled) for e in (e1, e2, e4))
        x = opcount._extrapolated(c1, c2, 4)
        assert x["ar"] == c4["ar"] and x["spec"] == c4["spec"] and x["spec_syncs"] == c4["spec_syncs"]
        assert c4["ar"].total() > c2["ar"].total() > c1["ar"].total()


def test_joint_qk_norm_weight_of_inference_tensors():
    """A model built under torch.inference_mode (parameters without a version counter) still fuses, and its joint
    q/k norm weight follows a write into the norm weight (refilled at every refresh: nothing tells a write)."""
    from types import SimpleNamespace

    with torch.inference_mode():
        bb = build_random(tiny_config("qwen3", vocab_size=64, layers=1), seed=0)
    fusion = layers.DecodeFusion(SimpleNamespace(decoder=bb.model))
    assert fusion.refresh() is True
    attn = bb.model.layers[0].self_attn
    with torch.inference_mode():
        attn.q_norm.weight.mul_(3)
    assert fusion.refresh() is False
    with fusion:
        joint = attn.__dict__["_orthrus_qk_norm"]
    Hq = bb.config.num_attention_heads
    assert torch.equal(joint[:Hq], attn.q_norm.weight.expand(Hq, -1)) and not torch.equal(joint[0], joint[-1])
