"""Lossless checks: they pass for the real acceptance rule and catch a sampler that samples from the draft."""
import numpy as np
import pytest
import torch

from eval_testlib import random_prompts
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
    rep = lossless.greedy_exactness(qwen3_model, prompts, broken, ar, tolerance=0.0)
    assert rep["match_rate"] == pytest.approx(2 / 3) and not rep["passed"]
    (d,) = rep["divergences"]
    assert d["index"] == 4 and d["ar_token"] == ar[1][4] and d["top2_gap"] > 0 and not d["near_tie"]
    assert d["logit_ar_token"] >= d["logit_spec_token"]
    lenient = lossless.greedy_exactness(qwen3_model, prompts, broken, ar, tolerance=1e9)
    assert lenient["passed"] and lenient["near_tie_divergences"] == 1
