"""eval.compare_untrained: the heads are reset to their step-0 state for the comparison and restored after it,
and the report carries untrained vs trained numbers for the same prompts."""
import copy
import json

import torch

from eval_testlib import word_tokenizer
from orthrus_train.eval import baseline
from orthrus_train.eval.report import run_eval
from orthrus_train.model import MedusaModel, OrthrusModel, build_random, tiny_config


def _twins_equal_ar(m) -> bool:
    p = dict(m.backbone.named_parameters())
    return all(torch.equal(p[n], p[n.replace("_diff.", ".")]) for n in p if "_diff." in n)


def test_untrained_heads_are_the_step0_state_and_come_back():
    bb = build_random(tiny_config("qwen3", vocab_size=128, hidden_size=64), seed=0)
    m = OrthrusModel(bb, block_size=4, vocab_len=120)
    assert _twins_equal_ar(m)  # what the constructor builds
    with torch.no_grad():
        for n, p in m.head_state_dict().items():
            if "_diff." in n:
                p.add_(0.1)  # "training"
    trained = {n: v.clone() for n, v in m.head_state_dict().items()}
    assert not _twins_equal_ar(m)
    with baseline.untrained_heads(m):
        assert _twins_equal_ar(m)
    assert all(torch.equal(trained[n], v) for n, v in m.head_state_dict().items())
    try:  # restored even when the comparison fails half-way
        with baseline.untrained_heads(m):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(torch.equal(trained[n], v) for n, v in m.head_state_dict().items())


def test_medusa_untrained_heads_are_identity():
    bb = build_random(tiny_config("qwen3", vocab_size=128, hidden_size=64), seed=0)
    m = MedusaModel(bb, block_size=4, vocab_len=120)
    with torch.no_grad():
        for p in m.head_state_dict().values():
            p.add_(0.1)
    with baseline.untrained_heads(m):
        assert all(not v.any() for v in m.head_state_dict().values())
    assert all(v.eq(0.1).all() for v in m.head_state_dict().values())


def test_report_compares_untrained_and_trained_on_the_same_prompts(qwen3_model, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "holdout.jsonl").write_text("".join(
        json.dumps({"uid": f"0:{i}", "messages": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}]}) + "\n"
        for i in range(4)))
    before = {n: v.clone() for n, v in qwen3_model.head_state_dict().items()}
    cfg = dict(benchmarks=["holdout"], num_prompts=4, max_new_tokens=16, temperatures=[0.0, 1.0], batch_size=2,
               verify_backend="torch", plots=False, compare_untrained=True, lossless=dict(enabled=False))
    rep = run_eval(qwen3_model, word_tokenizer(), cfg, run)
    assert all(torch.equal(before[n], v) for n, v in qwen3_model.head_state_dict().items())
    on_disk = json.loads((run / "eval" / "report.json").read_text())
    cmp_ = on_disk[baseline.KEY]["benchmarks"]["holdout"]
    assert set(cmp_) == {"T=0", "T=1"}
    for tk, c in cmp_.items():
        spec = on_disk["benchmarks"]["holdout"]["results"][tk]["spec"]
        assert c["trained"]["acceptance_length"] == spec["acceptance_length"]  # the report's own number
        assert c["untrained"]["verify_passes"] > 0
        assert c["acceptance_gain"] == c["trained"]["acceptance_length"] - c["untrained"]["acceptance_length"]
    # the briefly trained twins of the test model draft better than their step-0 copies
    assert cmp_["T=0"]["acceptance_gain"] > 0.15, cmp_["T=0"]
    # the untrained numbers are a real decode with step-0 heads: the same as evaluating a copy of the model
    # whose twins were set to the AR projections by hand
    fresh = copy.deepcopy(qwen3_model)
    with torch.no_grad():
        p = dict(fresh.backbone.named_parameters())
        for n in p:
            if "_diff." in n:
                p[n].copy_(p[n.replace("_diff.", ".")])
    ref = run_eval(fresh, word_tokenizer(), {**cfg, "compare_untrained": False,
                   "benchmark_paths": {"holdout": str(run / "data" / "holdout.jsonl")}}, tmp_path / "fresh")
    for tk, c in cmp_.items():
        r = ref["benchmarks"]["holdout"]["results"][tk]["spec"]
        assert c["untrained"]["acceptance_length"] == r["acceptance_length"] and c["untrained"]["tpf"] == r["tpf"]
    md = (run / "eval" / "report.md").read_text()
    assert "## Untrained vs trained heads" in md
    assert "untrained vs trained heads" in capsys.readouterr().out
    assert rep[baseline.KEY] == on_disk[baseline.KEY]
    # off: no key, no section
    assert baseline.KEY not in ref and "Untrained" not in (tmp_path / "fresh" / "eval" / "report.md").read_text()
