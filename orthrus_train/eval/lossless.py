"""Losslessness checks: drafted decoding must give exactly the backbone's greedy output and exactly its
sampling distribution. Rounding must neither fail a correct run nor hide a bug, so each check is stated where
rounding cannot reach it (docs/design.md, "Lossless verdict"):

(0) `exact_sampler_test`: the sampler against the distributions the verify pass itself computed. A probe
    wraps the engine's acceptance rule; at every verify step it takes the step's own verify logits (p), draft
    logits (q), drafts and the rule's result, and forms randomized PITs of (i) every emitted token against p
    of its slot, (ii) the step's outcome (accepted count, next token) against the rule's exact law
    (`verify.outcome_distribution`), (iii) every draft against q. Under a correct sampler each family is
    i.i.d. U(0,1) whatever the dtype (p and q are the pass's own numbers); KS tests check it. This catches
    acceptance, residual, draft-sampling and emission bugs in bf16 as in float32.
(a) `greedy_exactness`: drafted greedy output vs the AR baseline of the same engine, token for token. At
    each divergence the backbone's logits are recomputed (one causal pass over prompt + common prefix) and
    the gap between the top two is reported; a gap <= the tolerance is *explained* by rounding. The
    tolerance is a multiple of the measured noise floor (`logit_noise_floor`): the largest logit difference
    between the verify-shaped block pass and the AR step over the same prefixes.
(b) `ks_pit_test`: end to end, drafted sampling against AR sampling: for every sampled token x the target
    distribution p (same temperature / filters) is recomputed over the emitted prefix (one causal pass over
    prompt + output per sequence), and the randomized PIT u = F(x-1) + V p(x) (V ~ U(0,1), F the CDF in
    token-id order) is formed. Under correct sampling the u's are i.i.d. U(0,1) whatever the stopping rule;
    a Kolmogorov-Smirnov test against U(0,1) checks it. Run on float32 weights, where the block pass and the
    causal pass agree far below what the sample size can see.
(c) `chi_square_test`: many samples of the same fixed prefixes (B copies, distinct seeds): the empirical law
    of the 1st generated token (already produced by a draft + verify step: the engine caches the prompt minus
    its last token) and of the 2nd token given the most frequent 1st one, against p, with low-probability bins
    pooled. Float32, as (b).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

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
    return _probs(logits, sampling)


def _probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """softmax of `verify.processed_logits` (filtered in the rule's own precision), in float64."""
    return torch.softmax(verify.processed_logits(logits, sp.temperature, sp.top_k, sp.top_p, sp.min_p).double(),
                         dim=-1)


def _pit(probs: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Randomized PIT F(x-1) + v p(x) of tokens x (N,) under probs (N, V) (token-id order), v (N,) ~ U(0,1)."""
    px = probs.gather(1, x[:, None])[:, 0]
    below = probs.cumsum(-1).gather(1, x[:, None])[:, 0] - px
    return (below + v.to(probs) * px).clamp_(0.0, 1.0)


def _ks(u: np.ndarray) -> dict[str, Any]:
    from scipy import stats

    if len(u) == 0:
        return {"n": 0, "statistic": float("nan"), "p_value": float("nan")}
    res = stats.kstest(u, "uniform")
    return {"n": int(len(u)), "statistic": float(res.statistic), "p_value": float(res.pvalue),
            "pit_deciles": np.histogram(u, bins=10, range=(0, 1))[0].tolist()}


# ------------------------------------------------------------------------------------------- (0) exact sampler
@torch.no_grad()
def step_pits(draft_tokens: torch.Tensor, draft_logits: torch.Tensor, target_logits: torch.Tensor,
              accepted: torch.Tensor, next_token: torch.Tensor, sp: SamplingParams, gen: torch.Generator,
              rows_per_chunk: int = 8, draft_is_greedy: bool = False) -> dict[str, torch.Tensor]:
    """PITs of one verify step (B rows, K slots) against the step's own distributions (see (0) above).

    Returns CPU float64 tensors: "token" (B, K), slot j <= accepted: the emitted token at slot j (the draft for
    j < m, the rule's next token at j = m) under p_j, NaN past m; "step" (B,): (m, next) under the rule's exact
    law given the drafts; "draft" (B, K-1): draft d_i under q_i; "rare_mass" (B,): the law's total mass on
    outcomes of probability < RARE, "rare_hit" (B,): whether the observed outcome is one of them. p and q
    are filtered exactly as the rule filters them (`verify.processed_logits`, in the rule's precision), then
    taken to float64. `draft_is_greedy`: the drafts were argmax proposals (q a point mass on each draft, as the
    rule was told; `draft_logits` unused): their "draft" PITs are then U(0,1) by construction."""
    B, K, V = target_logits.shape
    dev = target_logits.device
    d = draft_tokens.long()
    m, nxt = accepted.long(), next_token.long()
    tok_out = torch.full((B, K), float("nan"), dtype=torch.float64)
    step_out = torch.empty(B, dtype=torch.float64)
    draft_out = torch.empty((B, K - 1), dtype=torch.float64)
    rare_mass = torch.empty(B, dtype=torch.float64)
    rare_hit = torch.empty(B, dtype=torch.float64)
    unif = torch.rand((B, 2 * K), generator=gen, dtype=torch.float64)
    for lo in range(0, B, rows_per_chunk):
        hi = min(B, lo + rows_per_chunk)
        n = hi - lo
        lp = verify.processed_logits(target_logits[lo:hi], sp.temperature, sp.top_k, sp.top_p, sp.min_p)
        p = torch.softmax(lp.double(), -1)  # (n, K, V)
        cand = torch.cat([d[lo:hi], nxt[lo:hi, None]], 1)  # slot j's token if j <= m
        cand = torch.where(torch.arange(K, device=dev)[None] == m[lo:hi, None], nxt[lo:hi, None], cand)
        u_tok = _pit(p.reshape(n * K, V), cand.reshape(-1), unif[lo:hi, :K].reshape(-1).to(dev)).reshape(n, K)
        emitted = torch.arange(K, device=dev)[None] <= m[lo:hi, None]
        tok_out[lo:hi] = torch.where(emitted, u_tok, torch.full_like(u_tok, float("nan"))).cpu()
        if K > 1:
            if draft_is_greedy:  # q = a point mass on the draft: log q = 0 there, -inf elsewhere
                lq = torch.full((n, K - 1, V), float("-inf"), dtype=torch.float64, device=dev)
                lq.scatter_(2, d[lo:hi, :, None], 0.0)
            else:
                lq = verify.processed_logits(draft_logits[lo:hi], sp.temperature, sp.top_k, sp.top_p, sp.min_p)
            q = torch.softmax(lq.double(), -1)
            draft_out[lo:hi] = _pit(q.reshape(n * (K - 1), V), d[lo:hi].reshape(-1),
                                    unif[lo:hi, K:2 * K - 1].reshape(-1).to(dev)).reshape(n, K - 1).cpu()
            # the rule's exact law of (m, next) given these drafts; p and q are already processed (T = 1, no filter)
            law = verify.outcome_distribution(d[lo:hi], lq.double(), lp.double(), temperature=1.0)  # (n, K, V)
        else:
            law = p
        flat = law.reshape(n, K * V)
        obs = m[lo:hi] * V + nxt[lo:hi]
        step_out[lo:hi] = _pit(flat, obs, unif[lo:hi, 2 * K - 1].to(dev)).cpu()
        rare = flat < RARE
        rare_mass[lo:hi] = torch.where(rare, flat, torch.zeros_like(flat)).sum(-1).cpu()
        rare_hit[lo:hi] = rare.gather(1, obs[:, None])[:, 0].double().cpu()
    return {"token": tok_out, "step": step_out, "draft": draft_out, "rare_mass": rare_mass, "rare_hit": rare_hit}


# An outcome (accepted count, next token) the rule's exact law gives less than this is "rare". A correct sampler
# shows about as many rare outcomes as their summed probability predicts (a Poisson count); a rule that puts
# mass where the law has (almost) none, e.g. a residual mixed with p (which emits tokens whose residual
# max(0, p - q) is 0), shows many more. 1e-6 is far above float32-vs-float64 differences of the law.
RARE = 1e-6


def rare_outcome_test(hits: np.ndarray, mass: np.ndarray) -> dict[str, Any]:
    """Observed rare outcomes vs the Poisson count their probabilities predict (upper tail: too many)."""
    from scipy import stats

    k, mu = int(np.sum(hits)), float(np.sum(mass))
    p = float(stats.poisson.sf(k - 1, mu)) if k > 0 else 1.0
    return {"n": int(len(hits)), "observed": k, "expected": mu, "p_value": p}


FAMILIES = ("token", "step", "draft", "rare_mass", "rare_hit")


def sampler_tests(f: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The exact test's four tests from pooled `step_pits` families: KS of the token, step and draft PITs, and
    the rare-outcome count."""
    tests = {k: _ks(f[k]) for k in ("token", "step", "draft")}
    tests["rare"] = rare_outcome_test(f["rare_hit"], f["rare_mass"])
    return tests


class SamplerProbe:
    """An acceptance rule (called like `decode.verify.verify`; default: that one) that also records, per call,
    `step_pits` of the call's own inputs and outputs. Pass it as the engine's `verify_fn` (an eager engine:
    the probe runs host code). `take(rows)` returns the PITs of the given `RowRecord`s (each row's verify
    passes are the first `verify_passes` calls since the last `take`) and resets the probe."""

    def __init__(self, rule: Callable | None = None, seed: int = 0):
        self.rule = rule or verify.verify
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, draft_tokens, draft_logits, target_logits, uniforms, *, temperature, top_k=0, top_p=1.0,
                 min_p=0.0, **kw):
        m, nxt = self.rule(draft_tokens, draft_logits, target_logits, uniforms, temperature=temperature,
                           top_k=top_k, top_p=top_p, min_p=min_p, **kw)
        sp = SamplingParams(float(temperature), int(top_k), float(top_p), float(min_p))
        self.calls.append(step_pits(draft_tokens, draft_logits, target_logits, m, nxt, sp, self.gen,
                                    draft_is_greedy=bool(kw.get("draft_is_greedy", False))))
        return m, nxt

    def take(self, rows: Sequence) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in FAMILIES}
        for b, r in enumerate(rows):
            for c in range(r.verify_passes):
                call = self.calls[c]
                t = call["token"][b]
                out["token"].append(t[~torch.isnan(t)])
                out["draft"].append(call["draft"][b])
                for k in ("step", "rare_mass", "rare_hit"):
                    out[k].append(call[k][b:b + 1])
        self.calls = []
        return {k: (torch.cat(v).numpy() if v else np.zeros(0)) for k, v in out.items()}


def exact_sampler_test(model, prompts: Sequence[Sequence[int]], sampling: SamplingParams, max_new_tokens: int,
                       min_tokens: int = 100_000, max_rounds: int = 50, eos_token_ids: Sequence[int] = (),
                       seed: int = 0, alpha: float = 1e-3, batch_size: int = 8, verify_backend: str = "auto",
                       rule: Callable | None = None) -> dict[str, Any]:
    """Sample the prompts with drafted decoding (eager engine, the acceptance rule wrapped in a `SamplerProbe`)
    in rounds until `min_tokens` emitted tokens (or `max_rounds`), then KS-test each PIT family against
    U(0,1), and the count of rare step outcomes against its Poisson law; passes when every p-value is
    >= alpha / 4 (Bonferroni). `rule`: the acceptance rule under test
    (default `decode.verify.verify`; tests plant broken ones here)."""
    if sampling.greedy:
        raise ValueError("the exact sampler test needs temperature > 0")
    if not prompts:
        raise ValueError("the exact sampler test needs at least one prompt")
    probe = SamplerProbe(rule, seed)
    S = max(len(p) for p in prompts) + max_new_tokens + model.block_size + 1
    eng = DecodeEngine(model, min(batch_size, len(prompts)), S, use_cuda_graphs=False, verify_backend=verify_backend,
                       verify_fn=probe)
    pits: dict[str, list] = {k: [] for k in FAMILIES}
    n_tok = rounds = 0
    while n_tok < min_tokens and rounds < max_rounds:
        seeds = [row_seed(seed, "exact", rounds, i) for i in range(len(prompts))]
        for i in range(0, len(prompts), eng.B):
            res = eng.generate(prompts[i:i + eng.B], max_new_tokens, sampling, seeds[i:i + eng.B], eos_token_ids)
            for k, v in probe.take(res.rows).items():
                pits[k].append(v)
        rounds += 1
        n_tok = sum(len(x) for x in pits["token"])
    tests = sampler_tests({k: np.concatenate(v) if v else np.zeros(0) for k, v in pits.items()})
    threshold = alpha / len(tests)
    ps = [t["p_value"] for t in tests.values() if t["n"]]
    out = {"tokens": n_tok, "steps": tests["step"]["n"], "rounds": rounds, "tests": tests, "alpha": alpha,
           "bonferroni_threshold": threshold, "min_p_value": min(ps) if ps else float("nan"),
           "min_tokens": min_tokens, "enough_tokens": n_tok >= min_tokens,
           "passed": bool(ps) and all(p >= threshold for p in ps)}
    if n_tok < min_tokens:
        out["note"] = f"only {n_tok} tokens (< {min_tokens} asked for) after {rounds} rounds: weaker power"
    return out


# ------------------------------------------------------------------------------------------- noise floor
@torch.no_grad()
def logit_noise_floor(model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], max_tokens: int = 256
                      ) -> dict[str, Any]:
    """How far the verify-shaped pass and the AR step disagree on the same prefixes, in logits: every sequence
    (prompt, continuation) is fed through two caches prefilled alike, in blocks of K tokens (as the verify
    pass) and one token at a time (as the AR step); the floor is the largest |logit difference| at any
    continuation position (first `max_tokens`) and vocabulary entry. Exact agreement gives 0."""
    seqs = [(list(p), list(t)[:max_tokens]) for p, t in sequences if len(t) and len(p)]
    if not seqs:
        return {"floor": float("nan"), "positions": 0, "note": "no sequences"}
    K = model.block_size
    dev = next(model.backbone.parameters()).device
    B = len(seqs)
    n_max = max(len(t) for _, t in seqs)
    n_blocks = -(-n_max // K)
    L = max(len(p) for p, _ in seqs) - 1
    S = L + 1 + n_blocks * K + 1
    ids = torch.zeros(B, max(L, 0), dtype=torch.long)
    feed = torch.zeros(B, n_blocks * K, dtype=torch.long)  # fed at positions len(p)-1, ...: x_a, then the tokens
    valid = torch.zeros(B, n_blocks * K, dtype=torch.bool)
    for b, (p, t) in enumerate(seqs):
        ids[b, :len(p) - 1] = torch.tensor(p[:-1], dtype=torch.long)
        row = [p[-1]] + t[:-1]
        feed[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        valid[b, :len(t)] = True
    lens = torch.tensor([len(p) - 1 for p, _ in seqs], dtype=torch.long, device=dev)
    caches = []
    for _ in range(2):
        c = model.new_cache(B, S)
        if L > 0:
            model.ar_cached(ids.to(dev), c)
        c.lengths.copy_(lens)
        caches.append(c)
    blk, ar = caches
    feed, valid = feed.to(dev), valid.to(dev)
    worst = torch.zeros(B, n_blocks * K, device=dev)
    top = torch.zeros(B, n_blocks * K, device=dev)
    for j in range(n_blocks):
        sl = slice(j * K, (j + 1) * K)
        lb = model.logits(model.ar_cached(feed[:, sl], blk)).float()  # (B, K, V)
        blk.lengths.add_(K)
        for i in range(K):
            la = model.logits(model.ar_cached(feed[:, sl][:, i:i + 1], ar))[:, 0].float()  # (B, V)
            ar.lengths.add_(1)
            worst[:, j * K + i] = (lb[:, i] - la).abs().max(-1).values
            top[:, j * K + i] = la.abs().max(-1).values
    w = worst[valid].cpu().numpy()
    return {"floor": float(w.max()), "p99": float(np.quantile(w, 0.99)), "median": float(np.median(w)),
            "positions": int(w.size), "sequences": B, "block_size": K,
            "max_abs_logit": float(top[valid].max()), "dtype": str(next(model.backbone.parameters()).dtype
                                                                   ).replace("torch.", "")}



# ------------------------------------------------------------------------------------------- (a) greedy
@torch.no_grad()
def greedy_exactness(model, prompts: Sequence[Sequence[int]], spec_tokens: Sequence[Sequence[int]],
                     ar_tokens: Sequence[Sequence[int]], tolerance: float = 0.0,
                     uids: Sequence[str] | None = None) -> dict[str, Any]:
    """Compare drafted and AR greedy outputs; classify each divergence: explained by rounding ("near_tie")
    when its top-two gap is <= tolerance (the caller's multiple of the measured noise floor), else a bug."""
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
             "spec_token": s[t] if t < len(s) else None, "top2_gap": gap, "near_tie": gap <= tolerance}
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
