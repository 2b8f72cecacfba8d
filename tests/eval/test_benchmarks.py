"""Benchmarks: fields, local files, clear errors without a file or the Hub, training-overlap exclusion."""
import json
from pathlib import Path

import pytest

from orthrus_train.eval.benchmarks import BenchmarkUnavailable, PromptRenderer, first_turn_key, load_benchmark, \
    load_train_prompt_hashes
from orthrus_train.eval.config import EvalConfig

SHARED = Path(__file__).resolve().parents[3] / "shared"
DATA = SHARED / "data"
needs_shared = pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").exists(),
                                  reason="shared/data not beside the repo")


@needs_shared
@pytest.mark.parametrize("name, available, field, starts", [
    ("gsm8k", 1319, "question", "Janet"),
    ("humaneval", 164, "prompt", "from typing import List"),
    ("arena_hard", 500, "turns[0].content", "Use ABC notation"),
    ("alpaca", 805, "instruction", "What are the names of some famous actors"),
])
def test_shared_benchmarks(name, available, field, starts):
    b = load_benchmark(name, 5, data_root=str(DATA))  # found under data_root in the shared/data layout
    assert b.available == available and b.field == field and len(b.prompts) == 5
    assert b.prompts[0].turns[0].startswith(starts) and len(b.prompts[0].turns) == 1
    same = load_benchmark(name, 2, benchmark_paths={name: b.source})  # the same file by explicit path
    assert [p.turns for p in same.prompts] == [p.turns for p in b.prompts[:2]]


@pytest.mark.parametrize("name, what", [("math500", "eval.benchmark_paths.math500"),
                                        ("mt_bench", "eval.benchmark_paths.mt_bench"),
                                        ("spec_bench", "eval.benchmark_paths.spec_bench")])
def test_missing_benchmarks_name_what_to_set(name, what, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchmarkUnavailable, match=what.replace(".", r"\.")):
        load_benchmark(name, 3)
    with pytest.raises(BenchmarkUnavailable, match="does not exist"):
        load_benchmark(name, 3, benchmark_paths={name: "/nonexistent/q.jsonl"})


def test_custom_and_multi_turn_files(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"turns": ["first question", "follow-up"], "category": "writing"},
        {"turns": [{"content": "only one"}]},
        {"prompt": ["hf layout", "second"]},
    ]) + "\n")
    b = load_benchmark("mt_bench", None, benchmark_paths={"mt_bench": str(f)})
    assert [p.turns for p in b.prompts] == [["first question", "follow-up"], ["only one"], ["hf layout", "second"]]
    with pytest.raises(BenchmarkUnavailable, match="benchmark_fields.mine"):
        load_benchmark("mine", 2, benchmark_paths={"mine": str(f)})
    c = load_benchmark("mine", 2, benchmark_paths={"mine": str(f)}, benchmark_fields={"mine": "turns[0]"})
    assert c.prompts[0].turns == ["first question"]
    with pytest.raises(BenchmarkUnavailable, match="unknown benchmark 'nope'"):
        load_benchmark("nope", 2)
    with pytest.raises(ValueError, match="set eval.benchmark_fields.mine"):
        load_benchmark("mine", 5, benchmark_paths={"mine": str(f)}, benchmark_fields={"mine": "question"})


def test_training_overlap_reported_and_excluded(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"question": q}) + "\n" for q in ["alpha one", "beta two", "gamma three",
                                                                       "delta four"]))
    train = tmp_path / "prompts.jsonl"  # the data stage's record layout; case and spacing do not matter
    train.write_text("".join(json.dumps({"uid": f"0:{i}", "messages": [{"role": "user", "content": q},
                                                                       {"role": "assistant", "content": "x"}]}) + "\n"
                             for i, q in enumerate(["Beta  two", "zeta"])))
    hashes = load_train_prompt_hashes(str(train))
    assert first_turn_key("beta two") in hashes
    paths = {"mine": str(f)}
    fields = {"mine": "question"}
    b = load_benchmark("mine", 3, paths, fields, train_hashes=hashes)
    assert [p.turns[0] for p in b.prompts] == ["alpha one", "gamma three", "delta four"]
    assert b.train_overlap == ["mine:1"] and b.excluded == 1
    kept = load_benchmark("mine", 3, paths, fields, train_hashes=hashes, exclude_train_overlap=False)
    assert [p.turns[0] for p in kept.prompts] == ["alpha one", "beta two", "gamma three"] and kept.excluded == 0
    txt = tmp_path / "hashes.txt"
    txt.write_text(first_turn_key("alpha one") + "\n")
    assert load_train_prompt_hashes(str(txt)) == {first_turn_key("alpha one")}


@pytest.mark.skipif(not (SHARED / "models" / "qwen3-tokenizer" / "tokenizer.json").exists(),
                    reason="shared Qwen3 tokenizer not beside the repo")
def test_chat_rendering_with_qwen3_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED / "models" / "qwen3-tokenizer"))
    r = PromptRenderer(tok, enable_thinking=False)
    text = tok.decode(r.encode(["What is 2+2?", "And 3+3?"], ["4"]))
    assert text.startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>")
    assert "<|im_start|>assistant\n4<|im_end|>" in text  # the model's own first answer, then the 2nd turn
    assert text.endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    raw = PromptRenderer(tok, apply_chat_template=False)
    assert tok.decode(raw.encode(["hello"])) == "hello"


def test_eval_config_validation():
    cfg = EvalConfig.from_dict({"benchmarks": ["gsm8k"], "temperatures": [0, 0.7], "lossless": {"alpha": 0.01}})
    assert cfg.temperatures == [0.0, 0.7] and cfg.lossless.alpha == 0.01
    assert EvalConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys.*valid keys"):
        EvalConfig.from_dict({"benchmark": ["gsm8k"]})
    with pytest.raises(ValueError, match="eval.top_p"):
        EvalConfig(top_p=0.0)
    with pytest.raises(ValueError, match="lossless.temperature"):
        EvalConfig(lossless={"temperature": 0.0})
