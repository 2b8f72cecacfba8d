"""Speculative verification: the rule preserves the target law exactly; kernels obey the rule.

* exact: enumerate every draft sequence of a tiny vocabulary tree and every accept/reject branch
  in float64 (``outcome_distribution``), continue with the target after the emitted tokens, and
  compare the joint law of the first n+1 tokens with the target's own joint law (KL < 1e-12);
* the sampler (``verify_reference``) draws from that analytic law (Monte Carlo, fixed seed);
* the Triton kernel returns the same (num_accepted, next_token) as the torch reference for the
  same uniforms on many random rows, including ragged ``n_valid``, top-k/top-p and greedy drafts;
* the filtering semantics equal transformers' Temperature/TopK/TopP warpers.
"""

import functools
import itertools

import pytest
import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting
from orthrus_train.decode import verify as vf

TRITON_OK = HAS_TRITON and (interpreting() or torch.cuda.is_available())
DEV = torch.device("cuda" if (TRITON_OK and not interpreting()) else "cpu")


def verify_on(backend, *args, **kw):
    """vf.verify with tensors on the backend's device; results back on the CPU."""
    mv = lambda x: x.to(DEV) if (backend == "triton" and isinstance(x, torch.Tensor)) else x  # noqa: E731
    out = vf.verify(*[mv(a) for a in args], backend=backend, **{k: mv(v) for k, v in kw.items()})
    return tuple(o.cpu() for o in out)
SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (1.6, 3, 1.0),
    (1.0, 0, 0.7),
    (0.9, 4, 0.8),
    (1.3, 2, 0.5),
]


def _proc_probs(logits, temperature, top_k, top_p):
    return torch.softmax(vf.processed_logits(logits, temperature, top_k, top_p), dim=-1)


def _tree(V, seed, spread=1.5):
    """Target logits for every prefix of length 0..2 and draft logits for prefixes 0..1."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    P = [torch.randn((V,) * (i + 1), generator=g, dtype=f64) * spread for i in range(3)]
    Q = [P[i] + torch.randn(P[i].shape, generator=g, dtype=f64) * 0.8 for i in range(2)]
    return P, Q


def _induced_vs_target(V, n, settings, draft_is_greedy, seed):
    """Joint law of the first n+1 emitted tokens (emission + target continuation) vs target."""
    temperature, top_k, top_p = settings
    K = 3
    P, Q = _tree(V, seed)
    greedy = vf.is_greedy(temperature)

    @functools.lru_cache(maxsize=None)
    def tprob(prefix):  # target law after a prefix, as plain sampling would use
        logits = P[len(prefix)][tuple(prefix)]
        if greedy:
            return torch.nn.functional.one_hot(logits.argmax(), V).double()
        return _proc_probs(logits, temperature, top_k, top_p)

    @functools.lru_cache(maxsize=None)
    def qprob(prefix):
        logits = Q[len(prefix)][tuple(prefix)]
        if draft_is_greedy:
            return torch.nn.functional.one_hot(logits.argmax(), V).double()
        if greedy:  # greedy verification accepts any drafts: let them be random
            return torch.softmax(logits, -1)
        return _proc_probs(logits, temperature, top_k, top_p)

    drafts = list(itertools.product(range(V), repeat=K - 1))
    d = torch.tensor(drafts)
    p_logits = torch.stack([torch.stack([P[0], P[1][a], P[2][a, b]]) for a, b in drafts])
    q_logits = torch.stack([torch.stack([Q[0], Q[1][a]]) for a, b in drafts])
    out = vf.outcome_distribution(
        d, q_logits, p_logits, temperature=temperature, top_k=top_k, top_p=top_p,
        n_valid=torch.full((len(drafts),), n), draft_is_greedy=draft_is_greedy,
    )
    torch.testing.assert_close(out.sum(dim=(1, 2)), torch.ones(len(drafts), dtype=torch.float64))
    assert torch.all(out[:, n + 1:] == 0)  # never more than n accepted

    L = n + 1
    induced = torch.zeros((V,) * L, dtype=torch.float64)
    target = torch.zeros((V,) * L, dtype=torch.float64)
    for z in itertools.product(range(V), repeat=L):
        pr = 1.0
        for i in range(L):
            pr = pr * tprob(tuple(z[:i]))[z[i]]
        target[z] = pr
    for r, dr in enumerate(drafts):
        w_draft = qprob(())[dr[0]] * qprob(tuple(dr[:1]))[dr[1]]
        if w_draft == 0:
            continue
        for m in range(L):
            for v in range(V):
                pm = out[r, m, v]
                if pm == 0:
                    continue
                prefix = tuple(dr[:m]) + (v,)
                # continue with the target until L tokens
                for tail in itertools.product(range(V), repeat=L - m - 1):
                    z = prefix + tail
                    pr = w_draft * pm
                    for i in range(m + 1, L):
                        pr = pr * tprob(tuple(z[:i]))[z[i]]
                    induced[z] += pr
    return induced, target


def _kl(p, q):
    m = p > 0
    return float((p[m] * (p[m].log() - q[m].clamp_min(1e-300).log())).sum())


@pytest.mark.parametrize("settings", SETTINGS + [(0.0, 0, 1.0)])
@pytest.mark.parametrize("draft_is_greedy", [False, True])
def test_rule_preserves_target_distribution_exactly(settings, draft_is_greedy):
    V = 4
    for seed, n in [(0, 2), (1, 1), (2, 0), (3, 2)]:
        induced, target = _induced_vs_target(V, n, settings, draft_is_greedy, seed=seed * 7 + V)
        assert abs(float(induced.sum()) - 1.0) < 1e-12
        assert _kl(target, induced) < 1e-12, (settings, seed, n)
        assert (induced - target).abs().max() < 1e-12


def test_naive_rule_would_fail_the_exact_check():
    """Guard that the exact check has teeth: accepting with p/q but resampling from p (instead of
    the residual) changes the law, and the same KL measure sees it."""
    V = 4
    P, Q = _tree(V, seed=1)
    p = _proc_probs(P[0], 1.0, 0, 1.0)
    q = _proc_probs(Q[0], 1.0, 0, 1.0)
    a = torch.clamp(p / q, max=1.0)
    wrong = q * a + (1 - (q * a).sum()) * p
    right = q * a + (1 - (q * a).sum()) * vf.residual_weights(p, q) / vf.residual_weights(p, q).sum()
    assert _kl(p, right) < 1e-12
    assert _kl(p, wrong) > 1e-6


def _random_case(B, K, V, settings, draft_is_greedy, g, dtype=torch.float32):
    temperature, top_k, top_p = settings
    p = torch.randn(B, K, V, generator=g) * 2.0
    q = p[:, : K - 1] + torch.randn(B, K - 1, V, generator=g) * 0.7
    if vf.is_greedy(temperature) or draft_is_greedy:
        d = q.argmax(-1)
        # greedy target: make some drafts agree with the target argmax so prefixes get long
        agree = torch.rand(B, K - 1, generator=g) < 0.8
        d = torch.where(agree, p[:, : K - 1].argmax(-1), d)
    else:
        probs = _proc_probs(q, temperature, top_k, top_p).reshape(-1, V)
        d = torch.multinomial(probs, 1, generator=g).reshape(B, K - 1)
    n = torch.randint(0, K, (B,), generator=g)
    n[0] = K - 1
    u = torch.rand(B, K, generator=g)
    return d, q.to(dtype), p.to(dtype), n, u


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("draft_is_greedy", [False, True])
def test_reference_sampler_draws_from_outcome_distribution(settings, draft_is_greedy):
    temperature, top_k, top_p = settings
    g = torch.Generator().manual_seed(123)
    B, K, V, N = 3, 4, 7, 20000
    d, q, p, n, _ = _random_case(B, K, V, settings, draft_is_greedy, g)
    law = vf.outcome_distribution(d, q, p, temperature=temperature, top_k=top_k, top_p=top_p,
                                  n_valid=n, draft_is_greedy=draft_is_greedy)
    rep = lambda x: x.repeat_interleave(N, dim=0)  # noqa: E731
    u = torch.rand(B * N, K, generator=g)
    acc, nxt = vf.verify(rep(d), rep(q), rep(p), u, temperature=temperature, top_k=top_k,
                         top_p=top_p, n_valid=rep(n), draft_is_greedy=draft_is_greedy, backend="torch")
    counts = torch.zeros(B, K, V, dtype=torch.float64)
    rows = torch.arange(B).repeat_interleave(N)
    counts.index_put_((rows, acc, nxt), torch.ones(B * N, dtype=torch.float64), accumulate=True)
    freq = counts / N
    sigma = (law * (1 - law) / N).sqrt()
    assert torch.all((freq - law).abs() <= 5 * sigma + 1e-4)
    assert torch.all(freq[law == 0] == 0)  # impossible outcomes never happen


def test_greedy_rule_by_hand():
    V = 6
    p = torch.full((2, 4, V), -5.0)
    # row 0: target argmax 1, 2, 3, 4 ; drafts 1, 2, 0 -> accept 2, next = argmax at slot 2 = 3
    # row 1: drafts all match but n_valid = 1 -> accept 1, bonus = argmax at slot 1 = 2
    for b in range(2):
        for i, t in enumerate([1, 2, 3, 4]):
            p[b, i, t] = 3.0
    d = torch.tensor([[1, 2, 0], [1, 2, 3]])
    for be in ["torch"] + (["triton"] if TRITON_OK else []):
        acc, nxt = verify_on(be, d, None, p, n_valid=torch.tensor([3, 1]))
        assert acc.tolist() == [2, 1] and nxt.tolist() == [3, 2], be
        assert acc.dtype == torch.long and nxt.dtype == torch.long


def test_seeded_uniforms_are_reproducible():
    g = torch.Generator().manual_seed(0)
    d, q, p, n, _ = _random_case(4, 5, 50, (1.0, 0, 1.0), False, g)
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(42)
        outs.append(verify_on("torch", d, q, p, temperature=1.0, n_valid=n, generator=gen))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_filters_match_transformers_warpers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 50, generator=g) * 3
    for temperature, top_k, top_p in SETTINGS:
        procs = [lp.TemperatureLogitsWarper(temperature)]
        if top_k:
            procs.append(lp.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(lp.TopPLogitsWarper(top_p))
        ref = x.clone()
        for proc in procs:
            ref = proc(None, ref)
        ours = vf.processed_logits(x, temperature, top_k, top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (temperature, top_k, top_p)
        torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


TRITON_CASES = [  # (settings, draft_is_greedy, dtype)
    ((0.0, 0, 1.0), False, torch.float32),
    ((0.0, 0, 1.0), True, torch.bfloat16),
    ((1.0, 0, 1.0), False, torch.float32),
    ((0.7, 0, 1.0), False, torch.bfloat16),
    ((1.6, 20, 1.0), False, torch.float32),
    ((1.0, 0, 0.8), False, torch.float32),
    ((0.9, 30, 0.9), True, torch.float32),
    ((1.2, 0, 1.0), True, torch.float16),
]


@pytest.mark.skipif(not TRITON_OK, reason="no triton backend here")
@pytest.mark.parametrize("settings,draft_is_greedy,dtype", TRITON_CASES)
def test_triton_matches_reference_exactly(settings, draft_is_greedy, dtype):
    temperature, top_k, top_p = settings
    g = torch.Generator().manual_seed(hash((settings, draft_is_greedy)) % 2**31)
    B, K, V = 12, 4, 300  # V spans 3 interpreter tiles, last one partial
    d, q, p, n, u = _random_case(B, K, V, settings, draft_is_greedy, g, dtype)
    # Non-contiguous target logits: a strided view into a wider buffer.
    wide = torch.zeros(B, K, V + 7, dtype=dtype)
    wide[..., :V] = p
    p = wide[..., :V]
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, n_valid=n,
              draft_is_greedy=draft_is_greedy)
    ref = verify_on("torch", d, q, p, u, **kw)
    out = verify_on("triton", d, q, p, u, **kw)
    assert torch.equal(out[0], ref[0]), (out[0], ref[0])
    assert torch.equal(out[1], ref[1]), (out[1], ref[1])
    assert torch.all(out[0] <= n)
    if not vf.is_greedy(temperature):
        # uniforms matter: u = 0 accepts every valid draft that has p(d) > 0
        ones = verify_on("triton", d, q, p, torch.zeros_like(u), **kw)
        assert torch.equal(ones[0], verify_on("torch", d, q, p, torch.zeros_like(u), **kw)[0])


@pytest.mark.skipif(not TRITON_OK, reason="no triton backend here")
def test_triton_edge_shapes():
    g = torch.Generator().manual_seed(9)
    # K = 1: no drafts, the bonus is sampled from slot 0; B = 1.
    p = torch.randn(1, 1, 130, generator=g)
    d = torch.zeros(1, 0, dtype=torch.long)
    u = torch.rand(1, 1, generator=g)
    q0 = torch.randn(1, 0, 130)  # the decode engine's AR baseline passes empty draft logits
    for temperature, q, dg in [(0.0, None, True), (1.0, None, True), (1.0, q0, False)]:
        ref = verify_on("torch", d, q, p, u, temperature=temperature, draft_is_greedy=dg)
        out = verify_on("triton", d, q, p, u, temperature=temperature, draft_is_greedy=dg)
        assert out[0].item() == 0 and torch.equal(out[1], ref[1])
        if temperature > 0:  # the bonus is the inverse-CDF draw from p at slot 0
            probs = torch.softmax(p[0, 0].double(), -1)
            assert probs.cumsum(0)[out[1].item()] > u[0, 0] and (
                out[1].item() == 0 or probs.cumsum(0)[out[1].item() - 1] <= u[0, 0])
    # Padding tokens past n_valid (e.g. -1) are never read as vocab ids.
    d, q, p, n, u = _random_case(3, 4, 129, (1.0, 0, 1.0), False, g)
    n = torch.tensor([0, 1, 2])
    d[0, :] = -1
    d[1, 1:] = -1
    d[2, 2:] = 10**6
    for be in ["torch", "triton"]:
        acc, nxt = verify_on(be, d, q, p, u, temperature=1.0, n_valid=n)
        assert torch.all(acc <= n) and torch.all((nxt >= 0) & (nxt < 129))
    assert torch.equal(verify_on("torch", d, q, p, u, temperature=1.0, n_valid=n)[1],
                       verify_on("triton", d, q, p, u, temperature=1.0, n_valid=n)[1])
