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
    # dict records work the same (report.py merges turns into dicts)
    assert metrics.tpf([r.to_json() for r in rs]) == pytest.approx(11 / 10)
    s = metrics.summarize(rs, seconds=2.0, decode_seconds=1.0)
    assert s["emitted_tokens"] == 11 and s["tokens_per_s"] == 5.5 and s["decode_tokens_per_s"] == 11.0
    assert s["finish_reasons"] == {"eos": 1, "length": 1}
    assert s["warnings"] and "2 prompts" in s["warnings"][0]


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
                                        "tokens_per_s", "speedup", "tpf_std"}
