"""Lossless checks: they pass for the real acceptance rule (in float32 and bf16) and catch a sampler that samples
from the draft, and the exact sampler test catches slightly broken rules."""
import copy

import numpy as np
import pytest
import torch

from eval_testlib import planted_rule, random_prompts, synthetic_steps
from orthrus_train.decode import verify
from orthrus_train.decode.engine import DecodeEngine, SamplingParams
from orthrus_train.decode.rng import row_seed
from orthrus_train.eval import lossless, metrics

FILTERED = SamplingParams(0.8, top_k=20, top_p=0.9)


def broken_rule(draft_tokens, draft_logits, target_logits, uniforms, *, temperature, top_k, top_p, **_):
    """Emits every proposed draft (i.e. samples from the drafter), then a bonus token from p at the last slot."""
    B, K = target_logits.shape[:2]
    p = torch.softmax(verify.processed_logits(target_logits[:, K - 1], temperature, top_k, top_p), -1)
    return torch.full((B,), K - 1, dtype=torch.long), verify.inverse_cdf(p, uniforms[:, K - 1])


def sample(model, prompts, sp, n_new, rule=None, batch=24):
    eng = DecodeEngine(model, batch_size=batch, max_len=max(map(len, prompts)) + n_new + 8, verify_backend="torch",
                       verify_fn=rule)
    seeds = [row_seed(1, "ks", i) for i in range(len(prompts))]
    return eng, [r for res in eng.generate_all(prompts, n_new, sp, seeds) for r in res.rows]


def test_ks_pit_passes_real_rule_and_catches_draft_sampling(qwen3_model):
    prompts = random_prompts(48, (3, 10), seed=21)
    _, real = sample(qwen3_model, prompts, FILTERED, 160)
    assert metrics.acceptance_length(real) > 1.3  # drafts were accepted and rejected: both branches exercised
    ks = lossless.ks_pit_test(qwen3_model, [(p, r.tokens) for p, r in zip(prompts, real)], FILTERED, min_tokens=5000)
    assert ks["tokens"] == 48 * 160 and ks["enough_tokens"]
    assert ks["passed"] and ks["p_value"] > 1e-3, ks
    _, bad = sample(qwen3_model, prompts, FILTERED, 160, broken_rule)
    ks_bad = lossless.ks_pit_test(qwen3_model, [(p, r.tokens) for p, r in zip(prompts, bad)], FILTERED,
                                  min_tokens=5000)
    assert not ks_bad["passed"] and ks_bad["p_value"] < 1e-3, ks_bad
    # fewer tokens than asked for: still computed, flagged
    few = lossless.ks_pit_test(qwen3_model, [(prompts[0], real[0].tokens)], FILTERED, min_tokens=10**5)
    assert not few["enough_tokens"] and "weak power" in few["note"]


@pytest.mark.parametrize("sp", [SamplingParams(1.0), FILTERED], ids=["T1", "T0.8-k20-p0.9"])
def test_chi_square_passes_real_rule_and_catches_draft_sampling(qwen3_model, sp):
    prefixes = random_prompts(2, (4, 8), seed=23)
    real_eng = DecodeEngine(qwen3_model, batch_size=200, max_len=16, verify_backend="torch")
    real = lossless.chi_square_test(real_eng, prefixes, sp, n_samples=2000, min_conditional=150)
    assert real["testable"] >= 3 and real["passed"], real  # 1st tokens of both prefixes + at least one 2nd token
    assert any(t["position"] == 2 for t in real["tests"])
    bad_eng = DecodeEngine(qwen3_model, batch_size=200, max_len=16, verify_backend="torch", verify_fn=broken_rule)
    bad = lossless.chi_square_test(bad_eng, prefixes, sp, n_samples=2000, min_conditional=150)
    assert not bad["passed"] and bad["min_p_value"] < 1e-6, bad


def test_chi_square_gof_pooling():
    rng = np.random.default_rng(0)
    p = np.r_[0.3, 0.2, 0.1, np.full(400, 0.4 / 400)]  # three big bins, a long tail of tiny ones
    counts = np.bincount(rng.choice(len(p), 3000, p=p), minlength=len(p))
    obs = {i: int(c) for i, c in enumerate(counts) if c}
    ok = lossless.chi_square_gof(obs, p)
    assert ok["bins"] == 4 and ok["p_value"] > 1e-3  # the tail is pooled into one bin
    q = np.r_[0.35, 0.15, 0.1, np.full(400, 0.4 / 400)]
    counts = np.bincount(rng.choice(len(q), 3000, p=q), minlength=len(q))
    bad = lossless.chi_square_gof({i: int(c) for i, c in enumerate(counts) if c}, p)
    assert bad["p_value"] < 1e-6
    p0 = p.copy()
    p0[5] = 0.0
    assert lossless.chi_square_gof({5: 1, 0: 10}, p0)["p_value"] == 0.0  # an impossible token fails outright
    assert np.isnan(lossless.chi_square_gof({0: 3}, np.full(100, 0.01))["p_value"])  # nothing testable


def test_pit_values_lie_in_the_token_cdf_step(qwen3_model):
    prompt, out = [3, 5, 7], [11, 2, 90, 4]
    rng = np.random.default_rng(0)
    sp = SamplingParams(1.0)
    u = lossless.pit_values(qwen3_model, prompt, out, sp, rng, chunk=3)
    with torch.no_grad():
        logits = qwen3_model.backbone(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]
    p = lossless.target_probs(qwen3_model, logits, sp)
    cdf = p.cumsum(-1)
    for t, x in enumerate(out):
        assert float(cdf[t, x] - p[t, x]) - 1e-9 <= u[t] <= float(cdf[t, x]) + 1e-9


def test_greedy_exactness_reports_and_classifies_divergences(qwen3_model):
    prompts = random_prompts(3, (3, 6), seed=29)
    eng = DecodeEngine(qwen3_model, batch_size=3, max_len=48, verify_backend="torch")
    spec = [r.tokens for r in eng.generate(prompts, 12).rows]
    ar = [r.tokens for r in eng.generate(prompts, 12, mode="ar").rows]
    same = lossless.greedy_exactness(qwen3_model, prompts, spec, ar)
    assert same["match_rate"] == 1.0 and same["passed"] and not same["divergences"]
    broken = [list(s) for s in spec]
    broken[1][4] = (broken[1][4] + 1) % 100
    rep = lossless.greedy_exactness(qwen3_model, prompts, broken, ar)
    assert rep["match_rate"] == pytest.approx(2 / 3) and not rep["passed"]
    (d,) = rep["divergences"]
    assert d["index"] == 4 and d["ar_token"] == ar[1][4] and d["top2_gap"] > 0 and not d["near_tie"]
    assert d["logit_ar_token"] >= d["logit_spec_token"]
    lenient = lossless.greedy_exactness(qwen3_model, prompts, broken, ar, tolerance=1e9)
    assert lenient["passed"] and lenient["near_tie_divergences"] == 1


# ------------------------------------------------------------------------------------------- exact sampler test
def _exact(model, rule, sp=FILTERED, min_tokens=3000, seed=3):
    prompts = random_prompts(24, (3, 10), seed=31)
    return lossless.exact_sampler_test(model, prompts, sp, 64, min_tokens=min_tokens, max_rounds=10, seed=seed,
                                       batch_size=24, verify_backend="torch", rule=rule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_sampler_test_passes_the_real_rule_in_any_dtype(qwen3_model, dtype):
    """Tested against the verify pass's own p and q, a correct sampler passes in bf16 too (where a recomputed
    p differs from the verify pass's by rounding)."""
    m = qwen3_model if dtype == torch.float32 else copy.deepcopy(qwen3_model).to(dtype)
    ex = _exact(m, None)
    assert ex["tokens"] >= 3000 and ex["steps"] > 1000 and ex["tests"]["draft"]["n"] == 3 * ex["steps"]
    assert ex["passed"] and ex["min_p_value"] > ex["bonferroni_threshold"], ex


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_sampler_test_catches_the_planted_bugs(qwen3_model, dtype):
    m = qwen3_model if dtype == torch.float32 else copy.deepcopy(qwen3_model).to(dtype)
    for rule in (broken_rule, planted_rule(residual_mix=1.0), planted_rule(accept_scale=0.5)):
        ex = _exact(m, rule, min_tokens=1000)
        assert not ex["passed"] and ex["min_p_value"] < 1e-8, ex


def _drops_the_greedy_flag(*args, draft_is_greedy=False, **kw):
    """The real rule, but told the argmax drafts were sampled from the (stale) draft logits: a plausible wiring bug."""
    return verify.verify(*args, **kw)


@pytest.mark.parametrize("draft_t", [0.0, 0.5], ids=["argmax-drafts", "draft-T0.5"])
def test_any_draft_temperature_keeps_the_output_exact(qwen3_model, draft_t):
    """Proposing at another temperature (or the argmax) changes acceptance only: the exact sampler test and the
    chi-square test on emitted tokens both pass, and the exact test catches the rule not told about argmax
    drafts."""
    sp = SamplingParams(0.8, top_k=20, top_p=0.9, draft_temperature=draft_t)
    ex = _exact(qwen3_model, None, sp=sp)
    assert ex["steps"] > 500 and ex["passed"] and ex["min_p_value"] > ex["bonferroni_threshold"], ex
    prefixes = random_prompts(2, (4, 8), seed=23)
    eng = DecodeEngine(qwen3_model, batch_size=200, max_len=16, verify_backend="torch")
    chi = lossless.chi_square_test(eng, prefixes, sp, n_samples=2000, min_conditional=150)
    assert chi["testable"] >= 3 and chi["passed"], chi
    if draft_t == 0.0:
        bad = _exact(qwen3_model, _drops_the_greedy_flag, sp=sp, min_tokens=1000)
        assert not bad["passed"] and bad["min_p_value"] < 1e-8, bad


def test_step_pits_are_the_rules_own_law():
    """On the rule's own inputs the three PIT families are U(0,1) for the real rule (and for the engine's
    default front door), tokens past the accepted count are not tested, and filtering is honoured."""
    n = 4096
    f = synthetic_steps(None, n, sp=SamplingParams(0.7, top_k=20, top_p=0.9, min_p=0.02))
    assert len(f["step"]) == n and len(f["draft"]) == 3 * n and n < len(f["token"]) < 4 * n
    for k, t in lossless.sampler_tests(f).items():
        assert t["p_value"] > 1e-3, (k, t)


# Slight bugs, and the sample size (verify steps) at which the exact test catches them (table in docs/design.md,
# "Lossless verdict"; synthetic steps: K=4, V=64, about 0.6 acceptance per slot).
@pytest.mark.parametrize("bug", [dict(residual_mix=0.02), dict(accept_scale=0.97), dict(accept_scale=0.99)],
                         ids=["residual+2%p", "accept*0.97", "accept*0.99"])
def test_exact_sampler_test_catches_slight_bugs_at_the_documented_size(bug):
    n = 2048
    bad = lossless.sampler_tests(synthetic_steps(planted_rule(**bug), n, seed=5))
    assert min(t["p_value"] for t in bad.values()) < 1e-3 / 4, bad
    good = lossless.sampler_tests(synthetic_steps(planted_rule(), n, seed=5))
    assert min(t["p_value"] for t in good.values()) > 1e-3 / 4, good
    assert good["rare"]["observed"] == 0 and bad["rare"]["observed"] > 3


# ------------------------------------------------------------------------------------------- noise floor
def test_noise_floor_measures_block_vs_ar_step(qwen3_model):
    prompts = random_prompts(4, (3, 8), seed=37)
    eng = DecodeEngine(qwen3_model, batch_size=4, max_len=64, verify_backend="torch")
    ar = [r.tokens for r in eng.generate(prompts, 20, mode="ar").rows]
    f32 = lossless.logit_noise_floor(qwen3_model, list(zip(prompts, ar)))
    assert f32["positions"] == sum(map(len, ar)) and f32["dtype"] == "float32"
    assert 0 <= f32["floor"] < 1e-4, f32
    bf = copy.deepcopy(qwen3_model).to(torch.bfloat16)
    b16 = lossless.logit_noise_floor(bf, list(zip(prompts, ar)), max_tokens=10)
    assert b16["positions"] == sum(min(10, len(a)) for a in ar) and b16["dtype"] == "bfloat16"
    assert b16["floor"] >= b16["p99"] >= b16["median"] >= 0  # CPU bf16 matmuls may agree exactly (floor 0)
    # it measures the block pass against the AR step: a block pass that is off by 0.25 logits shows up
    off = copy.deepcopy(qwen3_model)
    real_logits = off.logits
    off.logits = lambda h: real_logits(h) + (0.25 if h.dim() == 3 and h.shape[1] > 1 else 0.0)
    shifted = lossless.logit_noise_floor(off, list(zip(prompts, ar)))
    assert shifted["floor"] == pytest.approx(0.25, abs=1e-4) and shifted["median"] == pytest.approx(0.25, abs=1e-4)
