"""Decoding engine: drafted greedy == AR baseline == transformers generate, stopping, bookkeeping, seeding."""
import copy
import math

import numpy as np
import pytest
import torch

from eval_testlib import VOCAB_LEN, random_prompts, trained_model
from orthrus_train.decode.engine import DecodeEngine, RefillCost, SamplingParams, hf_generate, should_refill
from orthrus_train.decode.rng import counter_uniforms, row_seed
from orthrus_train.eval import metrics
from orthrus_train.eval.benchmarks import stop_token_ids
from orthrus_train.model import MedusaModel, OrthrusModel, build_random, tiny_config

LENGTHS = (1, 12)  # prompt lengths in a batch differ (1 token: nothing to prefill)


def rows_of(results):
    return [r for res in results for r in res.rows]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_equals_ar_baseline_and_hf_generate(family, request):
    model = request.getfixturevalue(f"{family}_model")
    prompts = random_prompts(7, LENGTHS, seed=3)
    prompts[0] = prompts[0][:1]
    eos = stop_token_ids(None, model)  # the generation config's (llama: 2; qwen3: none), which HF applies anyway
    eng = DecodeEngine(model, batch_size=3, max_len=96, verify_backend="torch")  # 7 prompts: 3 + 3 + 1 (padded)
    spec = rows_of(eng.generate_all(prompts, 40, eos_token_ids=eos, mode="spec"))
    ar = rows_of(eng.generate_all(prompts, 40, eos_token_ids=eos, mode="ar"))
    hf = hf_generate(model.backbone, prompts, 40, eos_token_ids=eos, batch_size=1, static_cache=True)
    assert hf.static_cache
    for p, s, a, h in zip(prompts, spec, ar, hf.tokens):
        assert s.tokens == a.tokens == h, f"prompt {p}: drafted / AR / HF greedy outputs differ"
        assert s.draft_passes == s.verify_passes == len(s.accepted)
        assert a.draft_passes == 0 and a.verify_passes == len(a.tokens) and a.accepted == [0] * len(a.tokens)
    assert sum(r.finish_reason == "length" and len(r.tokens) == 40 for r in spec) >= 4
    # the drafts are really accepted: multi-token steps happen, so the bookkeeping of m > 0 is exercised
    assert metrics.acceptance_length(spec) > 1.3
    assert max(metrics.accept_counts(spec)[2:]) > 0
    assert metrics.acceptance_length(ar) == 1.0 and metrics.tpf(ar) == 1.0


def test_hf_generate_batched_left_padding_matches(qwen3_model):
    prompts = random_prompts(4, (3, 10), seed=5)
    eng = DecodeEngine(qwen3_model, batch_size=4, max_len=64, verify_backend="torch")
    spec = eng.generate(prompts, 20).rows
    hf = hf_generate(qwen3_model.backbone, prompts, 20, batch_size=4, static_cache=False)
    assert [r.tokens for r in spec] == hf.tokens and not hf.static_cache


def test_eos_and_length_stopping_freeze_rows(qwen3_model):
    prompts = random_prompts(3, (4, 9), seed=11)
    eng = DecodeEngine(qwen3_model, batch_size=3, max_len=96, verify_backend="torch")
    free = eng.generate(prompts, 30, mode="ar").rows
    # an EOS id that row 0 emits at index >= 3 for the first time
    toks = free[0].tokens
    j = next(i for i in range(3, 30) if toks[i] not in toks[:i])
    eos = toks[j]
    for mode in ("spec", "ar"):
        rows = eng.generate(prompts, 30, eos_token_ids=[eos], mode=mode).rows
        for f, r in zip(free, rows):
            if eos in f.tokens:
                k = f.tokens.index(eos)
                assert r.tokens == f.tokens[:k + 1] and r.finish_reason == "eos"
            else:
                assert r.tokens == f.tokens and r.finish_reason == "length"
        assert rows[0].finish_reason == "eos" and len(rows[0].tokens) == j + 1
        # the frozen row stopped counting passes: at most one pass per emitted token, and it stopped early
        assert rows[0].verify_passes <= j + 1 < 30
    # (the loop ended with mode="ar") the finished row froze: one pass per token up to its EOS, and its
    # committed length stopped at the step that emitted the EOS, while the batch kept stepping for the others
    assert [r.verify_passes for r in rows] == [len(r.tokens) for r in rows] and rows[0].verify_passes == j + 1
    assert max(r.verify_passes for r in rows) == 30  # another row ran to the length limit meanwhile
    assert int(eng._st.cache.lengths[0]) == len(prompts[0]) - 1 + j
    # length limit: exactly max_new_tokens, cut inside a multi-token step
    for n in (1, 2, 5):
        for r in eng.generate(prompts, n).rows:
            assert len(r.tokens) == n and r.finish_reason == "length"
        rows = eng.generate(prompts, n, mode="ar").rows
        assert all(r.verify_passes == n for r in rows)


def test_oracle_drafter_accepts_full_blocks(qwen3_model):
    """A drafter that proposes the backbone's own greedy continuation must get every draft accepted:
    K tokens per verify pass, ceil(N / K) passes, and the same output."""
    K = qwen3_model.block_size
    prompts = random_prompts(3, (2, 9), seed=7)
    eng = DecodeEngine(qwen3_model, batch_size=3, max_len=96, verify_backend="torch")
    N = 30
    ar = eng.generate(prompts, N + K, mode="ar").rows
    future = torch.tensor([r.tokens for r in ar])  # (B, N+K)
    plen = torch.tensor([len(p) for p in prompts])
    V = qwen3_model.lm_weight().shape[0]

    def oracle(state):
        done = state.cache.lengths - (plen - 1)  # tokens emitted so far = position of x_a in the output
        idx = (done[:, None] + torch.arange(K - 1)[None]).clamp(max=future.shape[1] - 1)
        out = torch.full((len(prompts), K - 1, V), -30.0)
        return out.scatter(2, future.gather(1, idx)[..., None], 30.0)

    qwen3_model.propose = oracle
    try:
        spec = eng.generate(prompts, N).rows
    finally:
        del qwen3_model.propose
    for s, a in zip(spec, ar):
        assert s.tokens == a.tokens[:N]
        assert s.verify_passes == math.ceil(N / K)
        assert s.accepted[:-1] == [K - 1] * (s.verify_passes - 1)
    assert metrics.per_position_acceptance(spec) == [1.0] * (K - 1)


def test_medusa_heads_are_lossless_and_cost_no_draft_pass():
    bb = build_random(tiny_config("qwen3", vocab_size=128, initializer_range=0.2), seed=2)
    m = MedusaModel(bb, block_size=3, vocab_len=VOCAB_LEN).eval()
    prompts = random_prompts(3, (2, 8), seed=2)
    eng = DecodeEngine(m, batch_size=3, max_len=64, verify_backend="torch")
    spec, ar = eng.generate(prompts, 24).rows, eng.generate(prompts, 24, mode="ar").rows
    assert [r.tokens for r in spec] == [r.tokens for r in ar]
    assert all(r.draft_passes == 0 and r.verify_passes > 0 for r in spec)
    # the zero-initialized heads predict the next token from the hidden state at a-1 (x_a's own): they
    # draft something, and TPF = acceptance length since drafting is free
    assert metrics.tpf(spec) == metrics.acceptance_length(spec)


def test_sampling_is_seeded_per_row_and_batch_invariant(qwen3_model):
    prompts = random_prompts(4, (3, 9), seed=13)
    sp = SamplingParams(1.0, top_k=50, top_p=0.95)
    seeds = [row_seed(0, "t", i) for i in range(4)]
    eng = DecodeEngine(qwen3_model, batch_size=4, max_len=96, verify_backend="torch")
    a = [r.tokens for r in eng.generate(prompts, 30, sp, seeds).rows]
    b = [r.tokens for r in eng.generate(prompts, 30, sp, seeds).rows]
    assert a == b
    alone = eng.generate(prompts[2:3], 30, sp, seeds[2:3]).rows[0].tokens  # same seed, other batch companions
    assert alone == a[2]
    other = [r.tokens for r in eng.generate(prompts, 30, sp, [s + 1 for s in seeds]).rows]
    assert other != a
    # AR sampling is seeded the same way
    ar1 = eng.generate(prompts, 20, sp, seeds, mode="ar").rows
    ar2 = eng.generate(prompts, 20, sp, seeds, mode="ar").rows
    assert [r.tokens for r in ar1] == [r.tokens for r in ar2]


def test_default_verify_front_door(qwen3_model):
    """The engine's default path (verify_backend="auto": Triton when it can run, else torch) gives what the
    torch reference gives."""
    prompts = random_prompts(2, (3, 6), seed=17)
    sp = SamplingParams(1.0)
    auto = DecodeEngine(qwen3_model, batch_size=2, max_len=48)
    ref = DecodeEngine(qwen3_model, batch_size=2, max_len=48, verify_backend="torch")
    for s in (SamplingParams(0.0), sp):
        for mode in ("spec", "ar"):
            a = auto.generate(prompts, 8, s, mode=mode).rows
            b = ref.generate(prompts, 8, s, mode=mode).rows
            assert [r.tokens for r in a] == [r.tokens for r in b]


def test_counter_uniforms_are_uniform_and_independent():
    from scipy import stats

    B = 4096
    seeds = torch.arange(B, dtype=torch.long) * 7919 + 3
    u = counter_uniforms(seeds, torch.zeros(B, dtype=torch.long), 0, 8)
    assert u.shape == (B, 8) and float(u.min()) > 0 and float(u.max()) < 1
    assert stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    v = counter_uniforms(seeds, torch.ones(B, dtype=torch.long), 0, 8)  # next step
    w = counter_uniforms(seeds + 1, torch.zeros(B, dtype=torch.long), 0, 1)  # neighbouring seeds
    for x in (u[:, 1], v[:, 0], w[:, 0]):  # other slot, next step, next seed: uncorrelated
        assert abs(np.corrcoef(u[:, 0].numpy(), x.numpy())[0, 1]) < 0.06
    assert torch.equal(u, counter_uniforms(seeds, torch.zeros(B, dtype=torch.long), 0, 8))
    assert torch.equal(u[:, 3:5], counter_uniforms(seeds, torch.zeros(B, dtype=torch.long), 3, 2))
    assert row_seed(0, "a", 1) == row_seed(0, "a", 1) != row_seed(0, "a", 2)


def test_engine_refuses_what_does_not_fit(qwen3_model):
    eng = DecodeEngine(qwen3_model, batch_size=2, max_len=32, verify_backend="torch")
    with pytest.raises(ValueError, match="cache slots"):
        eng.generate([[1] * 20], 20)
    with pytest.raises(ValueError, match="1..2"):
        eng.generate([[1], [2], [3]], 4)
    with pytest.raises(ValueError, match="mode"):
        eng.generate([[1]], 4, mode="orthrus")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_match_eager_on_gpu(dtype):
    """Replayed CUDA graphs give exactly the eager engine's outputs and records (spec and AR, greedy and
    sampled with top-k/top-p, ragged batches with idle rows), and greedy spec == AR in float32."""
    m = copy.deepcopy(trained_model("qwen3")).to("cuda", dtype)
    prompts = random_prompts(5, LENGTHS, seed=19)
    seeds = list(range(5))
    eager = DecodeEngine(m, batch_size=3, max_len=96)
    graph = DecodeEngine(m, batch_size=3, max_len=96, use_cuda_graphs=True, sync_every=4)
    outs = {}
    for sp in (SamplingParams(0.0), SamplingParams(1.0), SamplingParams(1.0, top_k=20, top_p=0.9)):
        for mode in ("spec", "ar"):
            a = rows_of(eager.generate_all(prompts, 30, sp, seeds, eos_token_ids=[5], mode=mode))
            b = rows_of(graph.generate_all(prompts, 30, sp, seeds, eos_token_ids=[5], mode=mode))
            assert graph.cuda_graphs and graph.graph_error is None
            assert [r.tokens for r in a] == [r.tokens for r in b]
            assert [r.accepted for r in a] == [r.accepted for r in b]
            outs[sp.temperature, mode] = [r.tokens for r in b]
    if dtype == torch.float32:
        assert outs[0.0, "spec"] == outs[0.0, "ar"]
        # continuous batching with prompts staged ahead (one pass, then copies of cache rows), under the graphs
        for mode in ("spec", "ar"):
            many = graph.generate_many(prompts, 30, SamplingParams(0.0), seeds, eos_token_ids=[5], mode=mode,
                                       refill_min=1)
            assert [r.tokens for r in many.rows] == outs[0.0, mode] and many.prefill_passes == 1


def test_compiled_steps_match_eager(qwen3_model):
    """compile_steps=True (torch.compile of the step functions) decodes exactly what the eager engine does."""
    prompts = random_prompts(4, LENGTHS, seed=23)
    sp = SamplingParams(1.0, top_k=20, top_p=0.9)
    for mode in ("spec", "ar"):
        a = rows_of(DecodeEngine(qwen3_model, batch_size=2, max_len=96).generate_all(
            prompts, 12, sp, list(range(4)), eos_token_ids=[5], mode=mode))
        b = rows_of(DecodeEngine(qwen3_model, batch_size=2, max_len=96, compile_steps=True).generate_all(
            prompts, 12, sp, list(range(4)), eos_token_ids=[5], mode=mode))
        assert [r.tokens for r in a] == [r.tokens for r in b]
        assert [r.accepted for r in a] == [r.accepted for r in b]


def test_min_p_filter_matches_transformers_and_keeps_the_rule_exact():
    """min-p (as in Qwen-style generation configs) filters like transformers' MinPLogitsWarper after
    temperature / top-k / top-p, on both verify backends (the Triton kernel takes the same per-row threshold),
    and the rule with it still leaves the filtered target law unchanged."""
    from transformers.generation import logits_process as lp

    from orthrus_train.decode import verify as vf

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 50, generator=g) * 3
    for temperature, top_k, top_p, min_p in [(1.0, 0, 1.0, 0.05), (0.7, 20, 0.9, 0.1), (1.3, 0, 0.95, 0.3)]:
        procs = [lp.TemperatureLogitsWarper(temperature)] + ([lp.TopKLogitsWarper(top_k)] if top_k else []) + \
            ([lp.TopPLogitsWarper(top_p)] if top_p < 1 else []) + [lp.MinPLogitsWarper(min_p)]
        ref = x.clone()
        for proc in procs:
            ref = proc(None, ref)
        ours = vf.processed_logits(x, temperature, top_k, top_p, min_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)) and torch.isinf(ours).any()
        torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])
    # the first emitted token's law (summed over accept/reject branches) is the filtered p of slot 0
    B, K, V = 5, 3, 40
    p_logits, q_logits = torch.randn(B, K, V, generator=g) * 2, torch.randn(B, K - 1, V, generator=g) * 2
    q = torch.softmax(vf.processed_logits(q_logits, 0.8, 0, 1.0, 0.1), -1)
    d = vf.inverse_cdf(q, torch.rand(B, K - 1, generator=g))
    law = vf.outcome_distribution(d, q_logits, p_logits, temperature=0.8, min_p=0.1)
    assert float(law.sum((1, 2)).sub(1).abs().max()) < 1e-12
    p0 = torch.softmax(vf.processed_logits(p_logits[:, 0].double(), 0.8, 0, 1.0, 0.1), -1)
    assert float(law[:, 0][p0 == 0].sum()) == 0.0  # never a token min-p removed
    # both backends agree on the same uniforms
    u = torch.rand(B, K, generator=g)
    a = vf.verify(d, q_logits, p_logits, u, temperature=0.8, min_p=0.1, backend="torch")
    b = vf.verify(d, q_logits, p_logits, u, temperature=0.8, min_p=0.1, backend="auto")
    assert all(torch.equal(x_, y_) for x_, y_ in zip(a, b))
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(1.0, min_p=1.0)


@pytest.mark.parametrize("policy", ["refill_min=1", "adaptive"])
@pytest.mark.parametrize("mode", ["spec", "ar"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_equals_fixed_batches(qwen3_model, mode, temperature, policy):
    """generate_many refills ended rows with the next prompts: every row's tokens and records equal the
    fixed-batch decode's, in the prompts' order, whichever refill rule groups the refills (adaptive: a refill
    priced at 3 steps, so rows wait for company and refills take several rows; the clock does not decide)."""
    prompts = random_prompts(9, (1, 14), seed=21)
    free = DecodeEngine(qwen3_model, batch_size=3, max_len=96, verify_backend="torch").generate(
        prompts[:3], 30, mode="ar").rows
    # end-of-sequence ids that end some rows early and leave others to run to the length limit
    eos = sorted({free[0].tokens[4], free[1].tokens[17]})
    sp = SamplingParams(temperature)
    seeds = [100 + 7 * i for i in range(len(prompts))]
    eng = DecodeEngine(qwen3_model, batch_size=3, max_len=96, verify_backend="torch")
    eng.refill_cost = RefillCost(prior_steps=3, learn=False)
    fixed = eng.generate_all(prompts, 30, sp, seeds, eos, mode)
    got_groups = []
    refill_min = 1 if policy == "refill_min=1" else None
    many = eng.generate_many(prompts, 30, sp, seeds, eos, mode, refill_min=refill_min, on_rows=got_groups.append)
    assert all(r.refills == 0 for r in fixed) and many.refills >= 2  # 9 prompts, 3 rows: at least 2 refills
    want = rows_of(fixed)
    assert len(many.rows) == len(prompts) == sum(len(g) for g in got_groups)
    for i, (w, g) in enumerate(zip(want, many.rows)):
        assert g == w, f"prompt {i}: continuous batching changed the row ({g.tokens} vs {w.tokens})"
    lengths = [len(r.tokens) for r in want]
    assert min(lengths) < 30 and max(lengths) == 30, "the test needs rows that end early and rows that run long"
    # the engine's state is whole again: a fixed-batch call after it gives the same rows
    assert rows_of(eng.generate_all(prompts, 30, sp, seeds, eos, mode)) == want


def test_refill_rule_is_ski_rental():
    """should_refill: wait while the throughput lost to idle rows (idle row-steps / B x step seconds) is below the
    price of one refill; an expensive refill waits for more free rows, a cheap one goes at once; an idle batch
    and a last refill that takes every remaining prompt never wait; nothing to refill never refills."""
    B, step = 16, 0.0068  # SmolLM2-135M drafted step at batch 16 on an H200
    dear, cheap = 0.055, 0.001  # one refill: ~8 steps (measured), or far less than a step
    # two rows free for one window of 4 steps: 8 idle row-steps = 0.5 step lost
    assert should_refill(2, B, 8, step, cheap, remaining=40)
    assert not should_refill(2, B, 8, step, dear, remaining=40)
    # the dear refill waits until the idle rows have cost it: 8 steps x 16 rows = 128 idle row-steps
    idle, windows, free = 0, 0, 2
    while not should_refill(free, B, idle, step, dear, remaining=40):
        idle += free * 4
        free += 1 if windows % 2 else 0  # a row ends every other window
        windows += 1
    assert idle * step / B >= dear and free > 2 and windows > 4
    # batch idle: refill whatever the price; all remaining prompts fit in the free rows: refill now
    assert should_refill(B, B, 0, step, 1e9, remaining=40)
    assert should_refill(3, B, 0, step, 1e9, remaining=3) and not should_refill(3, B, 0, step, 1e9, remaining=4)
    # nothing to refill: no free row or no prompt left
    assert not should_refill(0, B, 10 ** 6, step, cheap, remaining=40)
    assert not should_refill(5, B, 10 ** 6, step, cheap, remaining=0)


def test_refill_cost_estimate():
    """RefillCost: the prior (in decode steps) until a refill was measured, then a decayed mean of the measured
    seconds; learn=False keeps the prior."""
    c = RefillCost(prior_steps=8)
    assert c.seconds(0.01) == pytest.approx(0.08)
    c.observe(0.05)
    assert c.seconds(0.01) == pytest.approx(0.05) and c.seconds(1.0) == pytest.approx(0.05)
    for _ in range(30):
        c.observe(0.02)
    assert 0.02 < c.seconds(0.01) < 0.0201  # the old measurement has faded
    frozen = RefillCost(prior_steps=3, learn=False)
    frozen.observe(100.0)
    assert frozen.seconds(0.01) == pytest.approx(0.03)


def _long_and_short_rows(eng, pool, n_long: int, n_short: int, within: int):
    """Rows of `pool` (greedy AR, 30 tokens) to build batches of long and short rows: the n_long prompts with the
    fewest distinct tokens (they run to the limit), and n_short others, each with a token among its first
    `within` that no long row emits (used as an end-of-sequence id, it ends that row early and no long one)."""
    free = rows_of(eng.generate_all(pool, 30, mode="ar"))
    order = sorted(range(len(pool)), key=lambda i: len(set(free[i].tokens)))
    long_ids = order[:n_long]
    seen = {t for i in long_ids for t in free[i].tokens}
    short = [(i, next((t for t in free[i].tokens[1:within] if t not in seen), None)) for i in order[n_long:]]
    short = [(i, t) for i, t in short if t is not None][:n_short]
    assert len(short) == n_short, "the prompt pool has too few rows that can end early"
    return long_ids, short


def _three_short_then_long(eng):
    """16 prompts for batch 4, each group of four three short rows (ended early by an end-of-sequence id) and then a
    long one, and those ids: (prompts, eos)."""
    pool = random_prompts(24, (2, 10), seed=8)
    long_ids, short = _long_and_short_rows(eng, pool, 4, 12, 8)
    prompts = []
    for k in range(4):
        prompts += [pool[i] for i, _ in short[3 * k:3 * k + 3]] + [pool[long_ids[k]]]
    return prompts, sorted({t for _, t in short})


@pytest.mark.parametrize("mode", ["spec", "ar"])
def test_adaptive_refills_fewer_times_than_refill_min_one(qwen3_model, mode):
    """Short and long rows at batch 4: refilling every free row at once (refill_min=1) runs many one-row refills;
    the adaptive rule with a refill priced like the GPU's (8 decode steps; the CPU clock does not decide) lets
    free rows gather and refills fewer times, with the same rows; the real clock gives the same rows too."""
    eng = DecodeEngine(qwen3_model, batch_size=4, max_len=96, verify_backend="torch")
    prompts, eos = _three_short_then_long(eng)
    want = rows_of(eng.generate_all(prompts, 30, eos_token_ids=eos, mode=mode))
    lengths = [len(r.tokens) for r in want]
    assert sum(n <= 8 for n in lengths) == 12 and sum(n == 30 for n in lengths) == 4, lengths
    pool = prompts
    one = eng.generate_many(pool, 30, eos_token_ids=eos, mode=mode, refill_min=1)
    eng.refill_cost = RefillCost(prior_steps=8, learn=False)
    ada = eng.generate_many(pool, 30, eos_token_ids=eos, mode=mode)
    assert one.rows == want and ada.rows == want
    assert 1 <= ada.refills < one.refills, (ada.refills, one.refills)
    eng.refill_cost = RefillCost()  # measured on this CPU: only the rows are checked
    assert eng.generate_many(pool, 30, eos_token_ids=eos, mode=mode).rows == want


def test_continuous_batching_refuses_bad_input(qwen3_model):
    eng = DecodeEngine(qwen3_model, batch_size=2, max_len=40, verify_backend="torch")
    with pytest.raises(ValueError, match="no prompts"):
        eng.generate_many([], 8)
    with pytest.raises(ValueError, match="cache slots"):
        eng.generate_many([[1] * 30], 8)
    with pytest.raises(ValueError, match="seeds"):
        eng.generate_many([[1, 2], [3]], 8, seeds=[1])


@pytest.mark.parametrize("mode", ["spec", "ar"])
def test_continuous_batching_does_not_wait_for_the_longest_row(qwen3_model, mode):
    """One long row per fixed batch of 3: fixed batches run 3 x 30 steps; with refills the long rows run side by
    side and the short ones pass through the third row."""
    pool = random_prompts(12, (2, 10), seed=8)
    eng = DecodeEngine(qwen3_model, batch_size=3, max_len=96, verify_backend="torch")
    long_ids, short = _long_and_short_rows(eng, pool, 3, 6, 6)
    prompts = []
    for k in range(3):  # each fixed batch: two short rows, then one long row
        prompts += [pool[short[2 * k][0]], pool[short[2 * k + 1][0]], pool[long_ids[k]]]
    eos = sorted({t for _, t in short})
    fixed = eng.generate_all(prompts, 30, eos_token_ids=eos, mode=mode)
    many = eng.generate_many(prompts, 30, eos_token_ids=eos, mode=mode, refill_min=1)
    assert [r.tokens for r in many.rows] == [r.tokens for r in rows_of(fixed)]
    assert all(len(many.rows[i].tokens) == 30 for i in (2, 5, 8))
    assert all(len(r.tokens) <= 6 for i, r in enumerate(many.rows) if i not in (2, 5, 8))
    fixed_steps = sum(r.steps for r in fixed)
    assert many.steps <= 0.7 * fixed_steps, (many.steps, fixed_steps)


def test_engine_fuses_again_when_a_parameter_is_replaced(qwen3_model):
    """The engine's fused decode projections follow the model: a parameter replaced after the engine was built
    is noticed at the next call (fused again, graphs dropped), and the rows equal an unfused engine's."""
    m = copy.deepcopy(qwen3_model)
    prompts = random_prompts(2, (3, 6), seed=1)
    eng = DecodeEngine(m, batch_size=2, max_len=64, verify_backend="torch")
    plain = DecodeEngine(m, batch_size=2, max_len=64, verify_backend="torch", fuse_projections=False)
    a = eng.generate(prompts, 12).rows
    assert a == plain.generate(prompts, 12).rows
    attn = m.decoder.layers[0].self_attn
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach() * 3)  # (q and k are normed)
    b = eng.generate(prompts, 12).rows
    assert b == plain.generate(prompts, 12).rows and b != a
    # outside the engine's calls the modules carry no fused weight (a copy or .to() of the model meets none)
    assert not any(k.startswith("_orthrus_") for mod in m.modules() for k in mod.__dict__)
    many = eng.generate_many(prompts, 12)
    assert many.rows == b and not any(k.startswith("_orthrus_") for mod in m.modules() for k in mod.__dict__)


def test_prefill_shape_buckets():
    from orthrus_train.decode.engine import prefill_shape

    assert [prefill_shape(n, 1)[0] for n in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    assert [prefill_shape(1, L)[1] for L in (1, 63, 64, 65, 200)] == [64, 64, 64, 128, 256]
    assert prefill_shape(3, 70, align=0) == (3, 70) and prefill_shape(3, 70, align=16) == (4, 80)


@pytest.mark.parametrize("chunk", [None, 130])
def test_padded_prefill_equals_the_unpadded_pass(qwen3_model, chunk):
    """prefill_rows at bucketed shapes (rows to a power of two, length to a multiple of 64; what the engines run)
    leaves the rows' cache slots, the other rows' slots and the returned hidden states as the pass at the
    chunk's own shape does (float32, CPU: to rounding, as GEMMs of other shapes block their sums differently),
    with the scratch cache reused or not and in chunks."""
    from orthrus_train.decode.engine import ScratchCache, prefill_rows

    m = qwen3_model
    prompts = random_prompts(5, (2, 40), seed=21) + [[7]]
    rows = [5, 0, 3, 1, 6, 2]
    out = []
    for align, scratch in ((0, None), (64, None), (64, ScratchCache(m, torch.device("cpu"), torch.float32))):
        cache = m.new_cache(8, 96, dtype=torch.float32)
        for k in cache.k + cache.v:
            k.fill_(0.25)  # rows not prefilled must keep this
        last = prefill_rows(m, cache, rows, prompts, chunk_tokens=chunk, scratch=scratch, align=align)
        out.append((last, cache))
    (last0, c0) = out[0]
    for last, c in out[1:]:
        torch.testing.assert_close(last, last0, rtol=1e-5, atol=1e-5)
        for k, k0 in zip(c.k + c.v, c0.k + c0.v):
            for r, p in zip(rows, prompts):
                torch.testing.assert_close(k[r, :, : len(p) - 1], k0[r, :, : len(p) - 1], rtol=1e-5, atol=1e-5)
            assert bool((k[[4, 7]] == 0.25).all())
    assert bool((last0[-1] == 0).all())  # a one-token prompt has nothing to prefill


def test_warm_prefill_runs_every_shape_a_call_needs_and_changes_no_result(qwen3_model, monkeypatch):
    """DecodeEngine.warm_prefill: one pass per (row bucket, length bucket) the prompts can need: rows up to the batch
    and up to what a staging pass runs at that length (prefill_ahead_tokens 512: 8 rows at length bucket 64, 4 at
    128; batch 6 -> 1, 2, 4, 8 rows at both), untimed; every pass shape a generate_many call then runs was warmed,
    and the call gives what it gives without the warm-up."""
    from orthrus_train.decode import engine as E

    prompts = random_prompts(9, (3, 70), seed=4)
    eng = DecodeEngine(qwen3_model, batch_size=6, max_len=160, verify_backend="torch", prefill_ahead_tokens=512)
    want = eng.generate_many(prompts, 12, mode="spec").rows
    fresh = DecodeEngine(qwen3_model, batch_size=6, max_len=160, verify_backend="torch", prefill_ahead_tokens=512)
    shapes = []
    real = E.prefill_pass
    monkeypatch.setattr(E, "prefill_pass", lambda m, ps, *a, **k: (
        shapes.append(E.prefill_shape(len(ps), max(len(p) for p in ps) - 1)), real(m, ps, *a, **k))[1])
    lengths = [len(p) for p in prompts]
    assert fresh.warm_prefill(lengths + [1, 500]) == 4 * 2  # a 1-token prompt needs no pass; 500 > max_len: skipped
    warmed = set(shapes)
    assert warmed == {(r, L) for r in (1, 2, 4, 8) for L in (64, 128)}
    assert fresh.warm_prefill(lengths) == 0 and len(shapes) == 8  # warmed shapes are not run again
    assert not bool(fresh._st.active.any())
    shapes.clear()
    got = fresh.generate_many(prompts, 12, mode="spec")
    assert got.rows == want and shapes and set(shapes) <= warmed
    wide = DecodeEngine(qwen3_model, batch_size=6, max_len=160, verify_backend="torch", prefill_ahead_tokens=2048)
    assert wide.warm_prefill([10, 100]) == 6 + 5  # up to 32 rows at 64 slots, 16 at 128


# ------------------------------------------------------------------------------- prefill graphs
class _ReplayedClosure:
    """A CPU stand-in for a captured CUDA graph: a replay runs the captured function again and writes its result
    into the output captured. Like a graph, it writes the K/V into the scratch cache view it was captured with (so a
    graph kept over a scratch that moved writes where nothing reads) and reads its static input at replay time."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


def _record_on_cpu(self, fn):
    out = fn()
    return _ReplayedClosure(fn, out), out


@pytest.fixture
def cpu_prefill_graphs(monkeypatch):
    """PrefillGraphs on the CPU: captures are `_ReplayedClosure`s, and both engines use their prefill graphs without
    CUDA graphs (only their `prefill_graphs` switch decides)."""
    from orthrus_train.decode import engine as E

    monkeypatch.setattr(E.PrefillGraphs, "_record", _record_on_cpu)
    for cls in (E.DecodeEngine, E.GenerationEngine):
        orig = cls._prefill_graphs

        def forced(self, orig=orig):
            pg = orig(self)
            pg.enabled = self.prefill_graphs
            return pg

        monkeypatch.setattr(cls, "_prefill_graphs", forced)
    return E


@pytest.mark.parametrize("mode", ["spec", "ar"])
def test_warm_prefill_leaves_the_first_call_nothing_to_capture_with_long_prompts(cpu_prefill_graphs, mode):
    """Prompts all longer than one length bucket: warm_prefill's own shapes need fewer rows and slots than a
    `generate_many` call reserves first (here 4 rows of 192 against 1,024 slots and 16 rows). The warm-up reserves
    the call's scratch too, so the call neither grows the scratch (which drops every graph) nor captures anything:
    before, the eval's first timed run recaptured every prefill graph inside its clock (session 20, humaneval)."""
    bb = build_random(tiny_config("qwen3", vocab_size=128, initializer_range=0.2), seed=2)
    m = OrthrusModel(bb, block_size=3, vocab_len=VOCAB_LEN).eval()
    prompts = random_prompts(7, (130, 180), seed=8)
    eng = DecodeEngine(m, batch_size=3, max_len=256, verify_backend="torch", prefill_ahead_tokens=1024)
    assert eng.warm_prefill([len(p) for p in prompts]) == len(eng._pg) > 0
    version, captures = eng._pg.scratch.version, eng._pg.captures
    assert all(have >= need for have, need in zip(eng._pg.scratch.capacity, eng._call_scratch()))
    out = eng.generate_many(prompts, 8, seeds=list(range(7)), mode=mode)
    assert eng._pg.scratch.version == version and eng._pg.captures == captures
    assert out.prefill_graph_replays == out.prefill_passes > 0


def test_scratch_reserve_keeps_its_storage_until_a_shape_needs_more(qwen3_model):
    """ScratchCache.reserve sizes the storage once; every shape within it is carved from the same storage (the
    addresses a prefill graph captured stay valid), and only a shape beyond it (row-slots or rows) moves the
    storage, which `version` tells."""
    from orthrus_train.decode.engine import ScratchCache

    sc = ScratchCache(qwen3_model, torch.device("cpu"), torch.float32)
    assert sc.capacity == (0, 0)
    sc.reserve(512, 8)
    v = sc.version
    ptrs = {(sc.get(m, L).k[0].data_ptr(), sc.get(m, L).lengths.data_ptr()) for m, L in
            [(8, 64), (2, 128), (1, 256), (4, 128), (1, 64)]}
    assert len(ptrs) == 1 and sc.version == v and sc.capacity == (512, 8)
    c = sc.get(2, 128)
    assert c.k[0].shape == qwen3_model.new_cache(2, 128).k[0].shape and not bool(c.lengths.any())
    sc.reserve(100, 2)  # never shrinks
    assert sc.version == v and sc.capacity == (512, 8)
    sc.get(4, 192)  # 768 row-slots
    assert sc.version == v + 1 and sc.capacity == (768, 8)
    sc.get(16, 64)  # 1024 row-slots and 16 rows: both move
    assert sc.version == v + 3 and sc.capacity == (1024, 16)


@pytest.mark.parametrize("chunk", [None, 130])
def test_prefill_graphs_replay_the_eager_pass_and_drop_when_the_scratch_moves(qwen3_model, cpu_prefill_graphs, chunk):
    """prefill_rows through PrefillGraphs (captures stood in for on the CPU) leaves the rows' cache slots and returns
    the hidden states bit for bit as the eager pass does: one capture per padded shape, replayed with new prompts of
    that shape; longer prompts grow the scratch, which drops every graph (they wrote the old storage) and captures
    again; disabled, nothing is captured or replayed and the pass runs eagerly."""
    E = cpu_prefill_graphs
    m, cpu = qwen3_model, torch.device("cpu")
    pg = E.PrefillGraphs(m, E.ScratchCache(m, cpu, torch.float32))

    def both(prompts, rows):
        out = []
        for graphs in (None, pg):
            cache = m.new_cache(8, 384, dtype=torch.float32)
            for k in cache.k + cache.v:
                k.fill_(0.25)
            scratch = graphs.scratch if graphs is not None else E.ScratchCache(m, cpu, torch.float32)
            last = E.prefill_rows(m, cache, rows, prompts, chunk_tokens=chunk, scratch=scratch, graphs=graphs)
            out.append((last, cache))
        (a, ca), (b, cb) = out
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(ca.k + ca.v, cb.k + cb.v))
        return b

    # whole power-of-two chunks: 6 rows as 4 + 2 (two shapes); 130 tokens: 2 rows of 64 slots per pass (one shape)
    passes, shapes = (3, 1) if chunk else (2, 2)
    short = random_prompts(5, (2, 40), seed=21) + [[7]]
    last = both(short, [5, 0, 3, 1, 6, 2])
    assert bool((last[-1] == 0).all()) and not bool((last[0] == 0).all())
    assert (pg.captures, pg.replays, pg.eager, len(pg)) == (shapes, passes, 0, shapes)
    both(random_prompts(6, (2, 40), seed=22), [1, 2, 3, 4, 5, 6])  # the same shapes, other tokens: replays
    assert (pg.captures, pg.replays, len(pg)) == (shapes, 2 * passes, shapes)
    v = pg.scratch.version
    both(random_prompts(1, (300, 300), seed=23), [4])  # one row of 320 slots: the scratch grows
    assert pg.scratch.version > v and pg.captures == shapes + 1 and len(pg) == 1
    both(short, [5, 0, 3, 1, 6, 2])  # the short shapes were dropped with the old storage: captured again
    assert pg.captures == 2 * shapes + 1 and len(pg) == shapes + 1
    pg.enabled = False
    replays = pg.replays
    both(short, [5, 0, 3, 1, 6, 2])
    assert (pg.captures, pg.replays, pg.eager) == (2 * shapes + 1, replays, passes)


def test_prefill_graph_capture_failure_falls_back_to_the_eager_pass(qwen3_model, cpu_prefill_graphs, monkeypatch):
    """A failed capture: a warning, the error kept, this pass and every later one eager (never captured again), and
    the same values as the eager pass."""
    E = cpu_prefill_graphs
    m, cpu = qwen3_model, torch.device("cpu")

    def broken(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(E.PrefillGraphs, "_record", broken)
    pg = E.PrefillGraphs(m, E.ScratchCache(m, cpu, torch.float32))
    prompts = random_prompts(3, (2, 30), seed=3)
    want = E.prefill_pass(m, prompts, cpu, torch.float32)
    with pytest.warns(UserWarning, match="prefilling eagerly"):
        got = E.prefill_pass(m, prompts, cpu, torch.float32, pg.scratch, graphs=pg)
    assert torch.equal(got[1], want[1]) and "stream is capturing" in pg.error
    E.prefill_pass(m, random_prompts(5, (2, 100), seed=4), cpu, torch.float32, pg.scratch, graphs=pg)
    assert (pg.captures, pg.replays, pg.eager, len(pg)) == (0, 0, 2, 0)


@pytest.mark.parametrize("mode", ["spec", "ar"])
def test_engines_with_prefill_graphs_give_the_eager_rows(cpu_prefill_graphs, mode):
    """DecodeEngine with prefill graphs (captures stood in for on the CPU) gives the eager engine's records (greedy
    and sampled), with fixed batches and with continuous batching, prompts staged ahead or not (a Medusa model: its
    drafts read each row's prefilled hidden state). Every pass replays; warm_prefill captures every shape a call
    needs first, so the call captures nothing; the switch off runs every pass eagerly."""
    E = cpu_prefill_graphs
    bb = build_random(tiny_config("qwen3", vocab_size=128, initializer_range=0.2), seed=2)
    m = MedusaModel(bb, block_size=3, vocab_len=VOCAB_LEN).eval()
    prompts = random_prompts(11, (1, 60), seed=6)
    seeds = list(range(11))
    kw = dict(batch_size=3, max_len=128, verify_backend="torch", prefill_ahead_tokens=256)
    eager = DecodeEngine(m, prefill_graphs=False, **kw)
    graphed = DecodeEngine(m, **kw)
    for sp in (SamplingParams(), SamplingParams(1.0, top_k=20)):
        want = rows_of(eager.generate_all(prompts, 16, sp, seeds, mode=mode))
        fixed = graphed.generate_all(prompts, 16, sp, seeds, mode=mode)
        assert rows_of(fixed) == want
        assert sum(r.prefill_graph_replays for r in fixed) >= len(fixed) and graphed.prefill_eager_passes == 0
        assert eager.generate(prompts[:3], 2).prefill_graph_replays == 0
        for ahead in (256, 0):
            graphed.prefill_ahead_tokens = eager.prefill_ahead_tokens = ahead
            a = eager.generate_many(prompts, 16, sp, seeds, mode=mode, refill_min=1)
            b = graphed.generate_many(prompts, 16, sp, seeds, mode=mode, refill_min=1)
            assert a.rows == b.rows == want
            assert b.prefill_graph_replays == b.prefill_passes > 2 and a.prefill_graph_replays == 0
    assert graphed.prefill_eager_passes == 0 and graphed.prefill_graph_error is None
    assert eager.prefill_graph_replays == 0 and eager.prefill_eager_passes > 0 and len(eager._pg) == 0
    fresh = DecodeEngine(m, **kw)
    assert fresh.warm_prefill([len(p) for p in prompts]) == len(fresh._pg) > 0
    captures = fresh._pg.captures
    assert fresh.generate_many(prompts, 16, seeds=seeds, mode=mode).rows == rows_of(
        eager.generate_all(prompts, 16, seeds=seeds, mode=mode))
    assert fresh._pg.captures == captures and fresh.prefill_graph_replays > captures


def test_staged_hidden_states_outlive_the_next_replay(qwen3_model, cpu_prefill_graphs):
    """A refill that takes the last staged prompt and then runs the next staging pass of the same shape keeps the
    staged prompt's hidden state (the graph's static output is rewritten by that replay: runs return a copy)."""
    E = cpu_prefill_graphs
    prompts = random_prompts(6, (5, 40), seed=9)
    got = []
    for on in (False, True):
        eng = DecodeEngine(qwen3_model, batch_size=4, max_len=96, verify_backend="torch", prefill_ahead_tokens=128,
                           prefill_graphs=on)
        staged = E._Staged()
        with torch.no_grad(), eng._fused():
            assert eng._refill_staged([0], prompts, 0, [0], 8, staged) == 1  # stages 2 prompts: (2, 64)
            assert eng._refill_staged([1, 2], prompts, 1, [1, 2], 8, staged) == 1  # 1 staged + a (2, 64) pass
        assert eng.prefill_graph_replays == (2 if on else 0)
        got.append(eng._st.last_hidden[:3].clone())
    assert not bool((got[0] == 0).any()) and torch.equal(got[0], got[1])


def test_prefill_graphs_are_dropped_when_the_parameters_move(qwen3_model, cpu_prefill_graphs):
    """A parameter replaced between calls (the fused projections made again, the step graphs dropped) drops the
    prefill graphs too: they read the old weights."""
    m = copy.deepcopy(qwen3_model)
    prompts = random_prompts(2, (3, 6), seed=1)
    eng = DecodeEngine(m, batch_size=2, max_len=64, verify_backend="torch")
    eng.generate(prompts, 4)
    assert len(eng._pg) == eng._pg.captures == 1
    eng.generate(prompts, 4)
    assert eng._pg.captures == 1
    attn = m.decoder.layers[0].self_attn
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach() * 3)
    with eng._fused():
        assert len(eng._pg) == 0
    eng.generate(prompts, 4)
    assert eng._pg.captures == 2


def test_generation_engine_with_prefill_graphs_gives_the_eager_tokens(qwen3_model, cpu_prefill_graphs):
    """GenerationEngine's refills through its scratch cache and prefill graphs (captures stood in for on the CPU):
    the eager engine's tokens (greedy and sampled, prompts longer than the first ones on later refills); every
    refill's passes replay; the switch off: none."""
    bb = qwen3_model.backbone
    prompts = random_prompts(9, (2, 20), seed=2) + random_prompts(5, (70, 100), seed=3)
    E = cpu_prefill_graphs
    for sp in (SamplingParams(), SamplingParams(1.0, top_k=20)):
        outs = []
        for on in (False, True):
            eng = E.GenerationEngine(bb, batch_size=3, max_len=128, sync_every=2, width_step=32, refill_min=1,
                                     prefill_tokens=256, prefill_graphs=on)
            outs.append(eng.generate(prompts, 10, sp, seeds=list(range(14))))
            if on:
                assert eng.prefill_graph_replays > eng.refills > 4 and eng.prefill_eager_passes == 0
                assert eng._pg.captures >= 2 and eng.prefill_graph_error is None
            else:
                assert eng.prefill_graph_replays == 0 and eng.prefill_eager_passes >= eng.refills > 4
        assert outs[0] == outs[1] and len({len(o) for o in outs[0]}) >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefill_graphs_match_eager_on_gpu():
    """Prefill passes replayed as CUDA graphs (`PrefillGraphs`, float32) give exactly the eager passes' rows: the
    DecodeEngine's continuous batching (prompts staged ahead) and fixed batches, spec and AR, greedy and sampled,
    against the same engine with prefill_graphs=False; GenerationEngine against an eager one. Every pass replays, no
    capture fails, and longer prompts after shorter ones grow the scratch (every prefill graph dropped with its pool
    and captured again), then shorter ones again: still equal."""
    from orthrus_train.decode.engine import GenerationEngine

    m = copy.deepcopy(trained_model("qwen3")).to("cuda", torch.float32)
    short = random_prompts(9, (2, 40), seed=19)
    long = random_prompts(5, (140, 180), seed=20)  # 192 slots each
    kw = dict(batch_size=3, max_len=256, use_cuda_graphs=True, sync_every=4, prefill_ahead_tokens=256)
    eager = DecodeEngine(m, prefill_graphs=False, **kw)
    graph = DecodeEngine(m, **kw)
    for sp in (SamplingParams(0.0), SamplingParams(1.0, top_k=20)):
        for mode in ("spec", "ar"):
            for prompts in (short, long, short):
                seeds = list(range(len(prompts)))
                version = graph._pg.scratch.version if graph._pg is not None else 0
                a = rows_of(eager.generate_all(prompts, 24, sp, seeds, eos_token_ids=[5], mode=mode))
                b = graph.generate_all(prompts, 24, sp, seeds, eos_token_ids=[5], mode=mode)
                assert rows_of(b) == a and sum(r.prefill_graph_replays for r in b) >= len(b)
                if prompts is long and sp.greedy and mode == "spec":  # (3, 192) > what (3, 64) needed
                    assert graph._pg.scratch.version > version
                x = eager.generate_many(prompts, 24, sp, seeds, eos_token_ids=[5], mode=mode, refill_min=1)
                y = graph.generate_many(prompts, 24, sp, seeds, eos_token_ids=[5], mode=mode, refill_min=1)
                assert y.rows == x.rows == a
                assert y.prefill_graph_replays == y.prefill_passes > 0 and x.prefill_graph_replays == 0
    assert graph.cuda_graphs and graph.graph_error is None and graph.prefill_graph_error is None
    assert graph.prefill_eager_passes == 0 and graph.prefill_graph_replays > graph._pg.captures > 2
    assert eager.cuda_graphs and eager.prefill_graph_replays == 0
    # warm_prefill captures every shape a call needs: the timed call then captures nothing
    fresh = DecodeEngine(m, **kw)
    assert fresh.warm_prefill([len(p) for p in short + long]) == len(fresh._pg) > 0
    captures = fresh._pg.captures
    assert fresh.generate_many(short + long, 24, eos_token_ids=[5]).rows == eager.generate_many(
        short + long, 24, eos_token_ids=[5]).rows
    assert fresh._pg.captures == captures and fresh.prefill_graph_error is None
    # GenerationEngine (prefill_tokens 128: a 192-slot prompt grows the scratch reserved for 128)
    gen_kw = dict(batch_size=3, max_len=256, sync_every=2, width_step=32, refill_min=1, prefill_tokens=128)
    plain = GenerationEngine(m.backbone, use_cuda_graphs=False, **gen_kw)
    graphed = GenerationEngine(m.backbone, use_cuda_graphs=True, **gen_kw)
    for prompts in (short, long, short):
        seeds = list(range(len(prompts)))
        version = graphed._pg.scratch.version
        want = plain.generate(prompts, 24, SamplingParams(), seeds, eos_token_ids=[5])
        assert graphed.generate(prompts, 24, SamplingParams(), seeds, eos_token_ids=[5]) == want
        if prompts is long:
            assert graphed._pg.scratch.version > version
    assert graphed.cuda_graphs and graphed.graph_error is None and graphed.prefill_graph_error is None
    assert graphed.prefill_graph_replays > 0 and graphed.prefill_eager_passes == 0
    assert plain.prefill_graph_replays == 0 and plain.prefill_eager_passes > 0


def test_ahead_count(qwen3_model):
    """How many prompts a staging pass prefills: at least the rows to fill, grown by powers of two while the padded
    pass (rows to a power of two x length to a multiple of 64) fits prefill_ahead_tokens, at most the prompts left."""
    prompts = [[1] * 10] * 20 + [[1] * 100] + [[1] * 10] * 20
    eng = DecodeEngine(qwen3_model, batch_size=4, max_len=160, verify_backend="torch", prefill_ahead_tokens=512)
    assert eng._ahead_count(prompts, 0, 3) == 8  # 8 x 64 slots = 512
    assert eng._ahead_count(prompts, 0, 5) == 8
    assert eng._ahead_count(prompts, 16, 2) == 4  # 8 rows would reach the 100-token prompt: 8 x 128 > 512
    assert eng._ahead_count(prompts, 20, 3) == 4  # the long prompt leads: 4 x 128
    assert eng._ahead_count(prompts, 0, 12) == 12  # the rows to fill always fit, whatever the budget
    assert eng._ahead_count(prompts, 38, 1) == 3  # the prompts left
    eng.prefill_ahead_tokens = 0
    assert eng._ahead_count(prompts, 0, 3) == 3


@pytest.mark.parametrize("ahead", [0, 256, 16384])
@pytest.mark.parametrize("mode", ["spec", "ar"])
def test_prefill_ahead_changes_no_row_and_saves_passes(qwen3_model, mode, ahead):
    """Prompts staged ahead of their refill (prefill_ahead_tokens) give every row of the fixed-batch decode, greedy
    and sampled, with refills of one row at a time; staging many prompts per pass runs fewer passes than refills
    (0: one pass per fill, as before)."""
    prompts = random_prompts(11, (1, 20), seed=5)
    eos_src = DecodeEngine(qwen3_model, batch_size=3, max_len=96, verify_backend="torch").generate(
        prompts[:3], 20, mode="ar").rows
    eos = sorted({eos_src[0].tokens[3], eos_src[2].tokens[9]})
    for sp in (SamplingParams(), SamplingParams(1.0, top_k=20)):
        seeds = [3 + i for i in range(len(prompts))]
        eng = DecodeEngine(qwen3_model, batch_size=3, max_len=96, verify_backend="torch", prefill_ahead_tokens=ahead)
        want = rows_of(eng.generate_all(prompts, 20, sp, seeds, eos, mode))
        many = eng.generate_many(prompts, 20, sp, seeds, eos, mode, refill_min=1)
        assert many.rows == want
        assert many.refills >= 3 and 1 <= many.prefill_passes <= many.refills + 1
        if ahead == 0:
            assert many.prefill_passes == many.refills + 1
        elif ahead == 16384:
            assert many.prefill_passes == 1  # 11 short prompts: one staging pass holds them all
        else:  # 256 tokens: 4 rows of 64 slots per pass
            assert 2 <= many.prefill_passes < many.refills + 1


def test_refill_rule_prices_a_staged_refill_as_a_copy(qwen3_model):
    """The adaptive rule prices a refill whose prompts are staged at the copy estimate, one that needs a pass at
    the pass estimate: with copies free and passes dear (priors, not the clock), free rows are refilled at the
    first look when prompts are staged, and wait for company when they are not (prefill_ahead_tokens=0)."""
    eng = DecodeEngine(qwen3_model, batch_size=4, max_len=96, verify_backend="torch")
    prompts, eos = _three_short_then_long(eng)
    want = rows_of(eng.generate_all(prompts, 30, eos_token_ids=eos))
    got = {}
    for ahead in (0, 16384):
        e = DecodeEngine(qwen3_model, batch_size=4, max_len=96, verify_backend="torch", prefill_ahead_tokens=ahead)
        e.refill_cost = RefillCost(prior_steps=8, copy_prior_steps=0, learn=False)
        got[ahead] = e.generate_many(prompts, 30, eos_token_ids=eos)
        assert got[ahead].rows == want
    one = eng.generate_many(prompts, 30, eos_token_ids=eos, refill_min=1)
    assert got[16384].refills == one.refills > got[0].refills and got[16384].steps <= got[0].steps


def test_staged_refill_launches_a_fraction_of_a_pass():
    """A refill of staged prompts copies cache rows instead of running a prefill pass: on the SmolLM2 shape (30
    layers, reduced width), a 2-row refill of 200-token prompts issues under a fifth of the ops (the CPU proxy
    for kernel launches, `decode/opcount.py`) of one that runs its pass."""
    from orthrus_train.decode.engine import _Staged
    from orthrus_train.decode.opcount import build_engine, counting

    eng, prompts = build_engine("smollm2-135m", 4, 16, True, prompt_len=200, slots=256)
    prompts = prompts * 4
    counts = {}
    with torch.no_grad(), eng._fused():
        staged = _Staged()
        eng._refill_staged([0, 1, 2, 3], prompts, 0, [0] * 4, 8, staged)  # first fill: stages all 16 prompts
        assert staged.left == 12
        with counting() as c:
            eng._refill_staged([1, 2], prompts, 4, [0, 0], 8, staged)
        counts["copy"] = c.total
        eng._refill_staged([1, 2], prompts, 0, [0] * 2, 8, _Staged())  # untimed: the pass's lazy set-up
        with counting() as c:
            assert eng._refill_staged([1, 2], prompts, 0, [0] * 2, 8, _Staged()) == 1
        counts["pass"] = c.total
    assert counts["copy"] * 5 < counts["pass"], counts


def test_two_engines_on_one_model_keep_each_others_steps(qwen3_model):
    """An eager and a graphed engine (or an eval's two engines) on one model: a call of one leaves the other's
    captured graphs, compiled steps and graph pool alone (session 17: each call re-fused the shared projection
    weights away from the other engine, which then dropped its graphs every call, and its recapture into the
    released pool failed on the GPU, leaving it eager), and both still decode what a lone engine does."""
    prompts = random_prompts(4, LENGTHS, seed=29)
    sp = SamplingParams(0.0)
    ref = rows_of(DecodeEngine(qwen3_model, batch_size=2, max_len=96).generate_all(
        prompts, 10, sp, list(range(4)), eos_token_ids=[5]))
    a = DecodeEngine(qwen3_model, batch_size=2, max_len=96)
    b = DecodeEngine(qwen3_model, batch_size=2, max_len=96)
    a.generate_all(prompts, 10, sp, list(range(4)), eos_token_ids=[5])
    pool = object()
    a._graphs["kept"], a._compiled["kept"], a._pool = "graph", "step", pool
    for eng in (b, a, b):
        out = rows_of(eng.generate_all(prompts, 10, sp, list(range(4)), eos_token_ids=[5]))
        assert [r.tokens for r in out] == [r.tokens for r in ref]
    assert a._graphs.get("kept") == "graph" and a._compiled.get("kept") == "step" and a._pool is pool
