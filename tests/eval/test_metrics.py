"""Metric arithmetic on hand-made records (eval/metrics.py is the one home of the definitions)."""
import math

import pytest

from orthrus_train.decode.engine import RowRecord
from orthrus_train.eval import metrics


def rec(tokens, verify, draft, accepted, K=4, finish="length"):
    return RowRecord(tokens=list(range(tokens)), prompt_len=5, verify_passes=verify, draft_passes=draft,
                     accepted=accepted, finish_reason=finish, seed=0, block_size=K)


def test_pooled_metrics_by_hand():
    # row A: passes accept 2, 0, 3 drafts -> 3 + 1 + 4 = 8 tokens, but EOS cut the last pass after 3 -> 7 emitted
    a = rec(7, 3, 3, [2, 0, 3], finish="eos")
    b = rec(4, 2, 2, [1, 1])  # 2 + 2 tokens
    rs = [a, b]
    assert metrics.acceptance_length(rs) == pytest.approx(11 / 5)
    assert metrics.tpf(rs) == pytest.approx(11 / 10)
    assert metrics.accept_counts(rs) == [1, 2, 1, 1]
    assert metrics.accept_histogram(rs) == pytest.approx([0.2, 0.4, 0.2, 0.2])
    # passes accepting >= i drafts: 5, 4, 2, 1 -> slot i accepted | reached = 4/5, 2/4, 1/2
    assert metrics.per_position_acceptance(rs) == pytest.approx([0.8, 0.5, 0.5])
    assert metrics.per_prompt_tpf(rs) == pytest.approx([7 / 6, 1.0])
    assert metrics.tpf_std(rs) == pytest.approx(1 / 12)
    # standard errors of the pooled ratios: AL = 11/5; residuals t_i - AL v_i = 7 - 6.6 = 0.4 and 4 - 4.4 = -0.4
    assert metrics.acceptance_length_se(rs) == pytest.approx(math.sqrt(2 * (0.4 ** 2 + 0.4 ** 2)) / 5)
    # TPF = 11/10 over passes 6 and 4: residuals 7 - 6.6 and 4 - 4.4, the same, over 10 passes
    assert metrics.tpf_se(rs) == pytest.approx(math.sqrt(2 * 0.32) / 10)
    # dict records work the same (report.py merges turns into dicts)
    assert metrics.tpf([r.to_json() for r in rs]) == pytest.approx(11 / 10)
    s = metrics.summarize(rs, seconds=2.0, decode_seconds=1.0)
    assert s["emitted_tokens"] == 11 and s["tokens_per_s"] == 5.5 and s["decode_tokens_per_s"] == 11.0
    assert s["finish_reasons"] == {"eos": 1, "length": 1}
    assert s["warnings"] and "2 prompts" in s["warnings"][0]
    assert s["acceptance_length_se"] == metrics.acceptance_length_se(rs) and s["tpf_se"] == metrics.tpf_se(rs)


def test_standard_error_is_the_spread_of_the_pooled_ratio_over_prompt_samples():
    """acceptance_length_se is an error bar: prompts that all accept alike give 0, one prompt gives none (nan),
    and over many prompt samples drawn from one population it matches the spread of the pooled AL."""
    import random

    same = [rec(8, 4, 4, [1, 1, 1, 1]) for _ in range(5)]
    assert metrics.acceptance_length_se(same) == 0.0
    assert math.isnan(metrics.acceptance_length_se(same[:1])) and math.isnan(metrics.tpf_se([]))
    rng = random.Random(0)

    def prompt():  # a prompt's passes accept 0..3 drafts; prompts differ in how well they accept
        p, v = rng.random(), rng.randint(5, 40)
        acc = [min(3, sum(rng.random() < p for _ in range(3))) for _ in range(v)]
        return rec(sum(a + 1 for a in acc), v, v, acc)
    samples = [[prompt() for _ in range(64)] for _ in range(400)]
    als = [metrics.acceptance_length(s) for s in samples]
    mu = sum(als) / len(als)
    spread = math.sqrt(sum((a - mu) ** 2 for a in als) / (len(als) - 1))
    ses = sorted(metrics.acceptance_length_se(s) for s in samples)
    assert ses[len(ses) // 2] == pytest.approx(spread, rel=0.15)


def test_medusa_and_ar_records():
    medusa = [rec(6, 3, 0, [1, 0, 2], K=3)]  # free drafts: TPF = acceptance length
    assert metrics.tpf(medusa) == metrics.acceptance_length(medusa) == 2.0
    ar = [rec(5, 5, 0, [0] * 5, K=1)]
    assert metrics.acceptance_length(ar) == metrics.tpf(ar) == 1.0
    assert metrics.per_position_acceptance(ar) == [] and metrics.accept_histogram(ar) == [1.0]


def test_speedup_and_edge_cases():
    assert metrics.speedup(300.0, 100.0) == 3.0
    assert math.isnan(metrics.speedup(300.0, 0.0))
    assert math.isnan(metrics.acceptance_length([])) and math.isnan(metrics.tpf([]))
    # no pass ever reached slot 2
    ppa = metrics.per_position_acceptance([rec(2, 2, 2, [0, 0], K=3)])
    assert ppa[0] == 0.0 and math.isnan(ppa[1])
    with pytest.raises(ValueError, match="block sizes"):
        metrics.accept_counts([rec(2, 2, 2, [0, 0], K=3), rec(2, 2, 2, [0, 0], K=4)])
    with pytest.raises(ValueError, match="outside"):
        metrics.accept_counts([rec(2, 1, 1, [4], K=4)])


def test_headline_warning_threshold():
    with pytest.warns(UserWarning, match="only 99 prompts"):
        assert metrics.headline_warnings(99, "x")
    assert metrics.headline_warnings(100) == []
    assert set(metrics.DEFINITIONS) >= {"acceptance_length", "tpf", "per_position_acceptance", "accept_histogram",
                                        "tokens_per_s", "speedup", "tpf_std", "acceptance_length_se",
                                        "tpf_se", "efficiency"}
    assert metrics.efficiency(1.5, 2.5) == 0.6 and math.isnan(metrics.efficiency(1.5, 0.0))


def test_paired_difference_by_hand_and_against_unpaired_errors():
    """B - A over the same prompts with the paired error: by hand on two prompts; zero for identical runs; for
    runs that agree prompt by prompt far below sqrt(SE_a^2 + SE_b^2), and near it for unrelated runs."""
    import random

    a = [rec(7, 3, 3, [2, 0, 3], finish="eos"), rec(4, 2, 2, [1, 1])]  # AL 11/5
    b = [rec(9, 3, 3, [2, 2, 3]), rec(4, 2, 2, [1, 1])]  # AL 13/5
    d, se = metrics.paired_difference(a, b)
    # influences: a (7 - 2.2*3)/5 = 0.08, (4 - 2.2*2)/5 = -0.08; b (9 - 2.6*3)/5 = 0.24, (4 - 5.2)/5 = -0.24
    assert d == pytest.approx(0.4) and se == pytest.approx(math.sqrt(2 * (0.16 ** 2 + 0.16 ** 2)))
    d_tpf, _ = metrics.paired_difference(a, b, passes="all")
    assert d_tpf == pytest.approx(13 / 10 - 11 / 10)
    assert metrics.paired_difference(a, a) == (0.0, 0.0)
    assert math.isnan(metrics.paired_difference(a[:1], b[:1])[1])
    with pytest.raises(ValueError, match="same prompts"):
        metrics.paired_difference(a, b[:1])

    rng = random.Random(1)

    def run(ps, shift):  # prompt difficulty p (shared), a run's own noise, and a small improvement
        out = []
        for p in ps:
            acc = [min(3, sum(rng.random() < min(1.0, p + shift) for _ in range(3))) for _ in range(30)]
            out.append(rec(sum(x + 1 for x in acc), 30, 30, acc))
        return out
    ps = [rng.random() for _ in range(128)]
    a, b = run(ps, 0.0), run(ps, 0.03)
    d, se = metrics.paired_difference(a, b)
    unpaired = math.hypot(metrics.acceptance_length_se(a), metrics.acceptance_length_se(b))
    assert d > 0 and se < unpaired / 2  # the shared difficulty cancels
    c = run([rng.random() for _ in range(128)], 0.0)  # unrelated prompts: no pairing gain
    _, se_c = metrics.paired_difference(a, c)
    assert se_c == pytest.approx(math.hypot(metrics.acceptance_length_se(a), metrics.acceptance_length_se(c)), rel=0.35)
