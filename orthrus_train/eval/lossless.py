"""Losslessness checks: drafted decoding must give exactly the backbone's greedy output and exactly its
sampling distribution.

(a) `greedy_exactness`: drafted greedy output vs the AR baseline of the same engine, token for token. At
    each divergence the backbone's logits are recomputed (one causal pass over prompt + common prefix) and
    the gap between the top two is reported: a gap below the tolerance is a near-tie (numerical noise of a
    low-precision dtype flipping an argmax), anything else is a bug.
(b) `ks_pit_test`: for every sampled token x the target distribution p (same temperature / top-k / top-p, the
    acceptance rule's own `processed_logits`) is recomputed over the emitted prefix (one causal pass over
    prompt + output per sequence), and the randomized PIT u = F(x-1) + V p(x) (V ~ U(0,1), F the CDF in
    token-id order) is formed. Under correct sampling the u's are i.i.d. U(0,1) whatever the stopping rule;
    a Kolmogorov-Smirnov test against U(0,1) checks it.
(c) `chi_square_test`: many samples of the same fixed prefixes (B copies, distinct seeds): the empirical law
    of the 1st generated token (already produced by a draft + verify step: the engine caches the prompt minus
    its last token) and of the 2nd token given the most frequent 1st one, against p, with low-probability bins
    pooled.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from ..decode import verify
from ..decode.engine import DecodeEngine, SamplingParams
from ..decode.rng import row_seed


@torch.no_grad()
def _final_hidden(model, ids: Sequence[int]) -> torch.Tensor:
    """Final hidden states (L, H) of the frozen backbone over one sequence (a plain causal pass)."""
    dev = next(model.backbone.parameters()).device
    x = torch.as_tensor(list(ids), dtype=torch.long, device=dev)[None]
    return model.backbone.model(input_ids=x).last_hidden_state[0]


def target_probs(model, logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """p as the acceptance rule sees it, in float64: softmax of `verify.processed_logits`."""
    return torch.softmax(verify.processed_logits(logits, sampling.temperature, sampling.top_k,
                                                 sampling.top_p).double(), dim=-1)


# ------------------------------------------------------------------------------------------- (a) greedy
@torch.no_grad()
def greedy_exactness(model, prompts: Sequence[Sequence[int]], spec_tokens: Sequence[Sequence[int]],
                     ar_tokens: Sequence[Sequence[int]], tolerance: float = 1e-2,
                     uids: Sequence[str] | None = None) -> dict[str, Any]:
    """Compare drafted and AR greedy outputs; classify each divergence (near-tie or not)."""
    if not len(prompts) == len(spec_tokens) == len(ar_tokens):
        raise ValueError("prompts, spec_tokens and ar_tokens must have the same length")
    uids = list(uids) if uids is not None else [str(i) for i in range(len(prompts))]
    divergences = []
    n_same_tok = n_tok = exact = 0
    for uid, prompt, s, a in zip(uids, prompts, spec_tokens, ar_tokens):
        s, a = list(s), list(a)
        t = next((i for i, (x, y) in enumerate(zip(s, a)) if x != y), None)
        if t is None and len(s) == len(a):
            exact += 1
            n_same_tok += len(a)
            n_tok += len(a)
            continue
        if t is None:  # one is a prefix of the other: only a stopping difference (should not happen)
            t = min(len(s), len(a))
        n_same_tok += t
        n_tok += max(len(s), len(a))
        logits = model.logits(_final_hidden(model, list(prompt) + a[:t])[-1]).float()
        top = logits.topk(2)
        gap = float(top.values[0] - top.values[1])
        d = {"uid": uid, "index": t, "ar_token": a[t] if t < len(a) else None,
             "spec_token": s[t] if t < len(s) else None, "top2_gap": gap, "near_tie": gap < tolerance}
        if d["ar_token"] is not None and d["spec_token"] is not None:
            d["logit_ar_token"] = float(logits[d["ar_token"]])
            d["logit_spec_token"] = float(logits[d["spec_token"]])
        divergences.append(d)
    n = len(prompts)
    non_tie = sum(not d["near_tie"] for d in divergences)
    return {
        "prompts": n,
        "exact_matches": exact,
        "match_rate": exact / n if n else float("nan"),
        "token_match_rate": n_same_tok / n_tok if n_tok else float("nan"),
        "tolerance": tolerance,
        "divergences": divergences,
        "near_tie_divergences": len(divergences) - non_tie,
        "non_tie_divergences": non_tie,
        "passed": non_tie == 0,
    }


# ------------------------------------------------------------------------------------------- (b) KS / PIT
@torch.no_grad()
def pit_values(model, prompt: Sequence[int], output: Sequence[int], sampling: SamplingParams,
               rng: np.random.Generator, chunk: int = 256) -> np.ndarray:
    """Randomized PIT u_t = F(x_t - 1) + V_t p(x_t) of every emitted token x_t, p recomputed by one causal
    pass over prompt + output (the last output token's own hidden state is not needed)."""
    output = list(output)
    if not output:
        return np.zeros(0)
    P = len(prompt)
    h = _final_hidden(model, list(prompt) + output[:-1])[P - 1:]  # (n_out, H): predicts output[t]
    x = torch.as_tensor(output, device=h.device)
    us = []
    for i in range(0, len(output), chunk):
        p = target_probs(model, model.logits(h[i:i + chunk]), sampling)
        xi = x[i:i + chunk, None]
        px = p.gather(1, xi)[:, 0]
        below = p.cumsum(-1).gather(1, xi)[:, 0] - px  # F(x-1)
        us.append((below + px * torch.as_tensor(rng.random(len(px)), dtype=p.dtype, device=p.device)).cpu())
    return torch.cat(us).clamp_(0.0, 1.0).numpy()


def ks_pit_test(model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], sampling: SamplingParams,
                seed: int = 0, min_tokens: int = 100_000, alpha: float = 1e-3) -> dict[str, Any]:
    """KS test of the pooled PIT values of `sequences` = [(prompt ids, emitted tokens), ...] against U(0,1)."""
    from scipy import stats

    if sampling.greedy:
        raise ValueError("the PIT test needs sampled outputs (temperature > 0)")
    rng = np.random.default_rng(seed)
    u = np.concatenate([pit_values(model, p, o, sampling, rng) for p, o in sequences] or [np.zeros(0)])
    n = len(u)
    if n == 0:
        return {"tokens": 0, "statistic": float("nan"), "p_value": float("nan"), "passed": False,
                "min_tokens": min_tokens, "enough_tokens": False, "alpha": alpha, "note": "no sampled tokens"}
    res = stats.kstest(u, "uniform")
    out = {"tokens": n, "sequences": len(sequences), "statistic": float(res.statistic),
           "p_value": float(res.pvalue), "alpha": alpha, "passed": bool(res.pvalue >= alpha),
           "min_tokens": min_tokens, "enough_tokens": n >= min_tokens,
           "pit_deciles": np.histogram(u, bins=10, range=(0, 1))[0].tolist()}
    if n < min_tokens:
        out["note"] = f"only {n} tokens (< {min_tokens} required for a headline check): weak power"
    return out


# ------------------------------------------------------------------------------------------- (c) chi-square
def chi_square_gof(observed: dict[int, int], p: np.ndarray, min_expected: float = 5.0) -> dict[str, Any]:
    """Pearson chi-square of token counts against probabilities p (V,), bins with expected < min_expected
    pooled (and the pooled bin merged into the smallest remaining ones until it reaches min_expected). A token
    observed where p = 0 is an outright failure (statistic inf, p-value 0)."""
    from scipy import stats

    N = sum(observed.values())
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    impossible = {t: c for t, c in observed.items() if p[t] <= 0}
    if impossible:
        return {"samples": N, "statistic": float("inf"), "p_value": 0.0, "bins": None,
                "impossible_tokens": {int(k): int(v) for k, v in list(impossible.items())[:20]}}
    exp = N * p
    big = np.flatnonzero(exp >= min_expected)
    big = big[np.argsort(-exp[big], kind="stable")]
    obs_b = [observed.get(int(t), 0) for t in big]
    exp_b = list(exp[big])
    obs_o, exp_o = N - sum(obs_b), N - sum(exp_b)
    while exp_o < min_expected and exp_b:  # merge the pooled bin with the smallest regular bins
        obs_o += obs_b.pop()
        exp_o += exp_b.pop()
    obs_all = np.array(obs_b + ([obs_o] if exp_o > 1e-12 or obs_o else []), dtype=np.float64)
    exp_all = np.array(exp_b + ([exp_o] if exp_o > 1e-12 or obs_o else []), dtype=np.float64)
    if len(obs_all) < 2:
        return {"samples": N, "statistic": float("nan"), "p_value": float("nan"), "bins": int(len(obs_all)),
                "note": "fewer than 2 bins with enough expected count: not testable with this many samples"}
    exp_all *= obs_all.sum() / exp_all.sum()
    res = stats.chisquare(obs_all, exp_all)
    return {"samples": N, "statistic": float(res.statistic), "p_value": float(res.pvalue), "bins": int(len(obs_all))}


@torch.no_grad()
def chi_square_test(engine: DecodeEngine, prefixes: Sequence[Sequence[int]], sampling: SamplingParams,
                    n_samples: int = 2000, eos_token_ids: Sequence[int] = (), seed: int = 0,
                    min_expected: float = 5.0, min_conditional: int = 200, alpha: float = 1e-3,
                    mode: str = "spec") -> dict[str, Any]:
    """Sample each prefix `n_samples` times (2 tokens, distinct row seeds) with the engine and test the law
    of the 1st token, and of the 2nd given the most frequent 1st, against the backbone's p.
    Passes when every test's p-value is >= alpha / number of tests (Bonferroni)."""
    if sampling.greedy:
        raise ValueError("the chi-square test needs temperature > 0")
    model = engine.model
    eos = set(int(e) for e in eos_token_ids)
    tests = []
    for k, prefix in enumerate(prefixes):
        prefix = list(prefix)
        seeds = [row_seed(seed, "chi2", k, i) for i in range(n_samples)]
        rows = [r for res in engine.generate_all([prefix] * n_samples, 2, sampling, seeds, eos_token_ids, mode)
                for r in res.rows]
        first = Counter(r.tokens[0] for r in rows)
        p1 = target_probs(model, model.logits(_final_hidden(model, prefix)[-1]), sampling).cpu().numpy()
        t = chi_square_gof(first, p1, min_expected)
        tests.append({"prefix": k, "position": 1, **t})
        cands = [tok for tok, _ in first.most_common() if tok not in eos]
        if cands:
            t1 = cands[0]
            second = Counter(r.tokens[1] for r in rows if r.tokens[0] == t1 and len(r.tokens) > 1)
            n2 = sum(second.values())
            if n2 >= min_conditional:
                p2 = target_probs(model, model.logits(_final_hidden(model, prefix + [t1])[-1]), sampling)
                t = chi_square_gof(second, p2.cpu().numpy(), min_expected)
                tests.append({"prefix": k, "position": 2, "given_first": int(t1), **t})
    testable = [t for t in tests if not np.isnan(t["p_value"])]
    threshold = alpha / max(1, len(testable))
    min_p = min((t["p_value"] for t in testable), default=float("nan"))
    return {"tests": tests, "testable": len(testable), "min_p_value": min_p, "alpha": alpha,
            "bonferroni_threshold": threshold, "samples_per_prefix": n_samples,
            "passed": bool(testable) and all(t["p_value"] >= threshold for t in testable)}
