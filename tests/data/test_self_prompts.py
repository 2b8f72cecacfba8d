"""Prompts the backbone writes itself (data.self_prompts): the pre-query template of real chat templates, the
filters and their accounting through the data stage, seeded openings, resumption, the config's checks and
fingerprint, and the CLI on the tiny recipe with the real engine."""

import json
import os
import subprocess
import sys

import pytest

from orthrus_train.data import DataConfig, PackedDataset, run_data_stage
from orthrus_train.data.regen import HFGenerator
from orthrus_train.data.self_prompts import SOURCE_NAME, pre_query_text, seed_texts
from orthrus_train.data.sources import Record
from orthrus_train.data.stage import ACCOUNTING_BUCKETS, build_generator
from orthrus_train.data.templates import ChatRenderer
from orthrus_train.decode.rng import row_seed

from .conftest import REPO, tiny_backbone, write_jsonl

QA = [{"question": f"What is {i} plus {i}?"} for i in range(6)]


class ScriptedWriter:
    """A generator whose output is known: prompts that end with the bare template (or an opening) get, by
    (batch seed, row), one of: a question from a small set (duplicates among them), a 1-word text (too short),
    a text without end-of-turn that fills max_new_tokens (unfinished), or a unique question. Responses to
    questions (prompts that end in the generation prompt) are a fixed sentence."""

    def __init__(self, tok):
        self.tok, self.eos = tok, tok.eos_token_id
        self.eos_token_ids = [self.eos]
        self.calls = 0

    def enc(self, text):
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts, max_new_tokens, *, temperature=0.0, seed=0):
        self.calls += 1
        out = []
        for j, p in enumerate(prompts):
            if self.tok.decode(p).endswith("assistant\n"):  # answering: a fixed response
                out.append(self.enc("It is even.")[:max_new_tokens - 1] + [self.eos])
                continue
            r = row_seed(seed, j) % 10
            if r < 4:
                text = f" how many legs do {r} cats have"
            elif r == 4:
                text = " hi"
            elif r == 5:
                out.append(self.enc("x" * (max_new_tokens + 5))[:max_new_tokens])
                continue
            else:
                text = f" unique question {seed % 100000} row {j} about the moon"
            out.append(self.enc(text)[:max_new_tokens - 1] + [self.eos])
        return out


def cfg_for(tmp_path, **kw):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    d = dict(sources=[{"path_or_id": str(path), "format": "prompt", "field": "question"}], seq_len=256,
             shard_size=8, batch_size=4, max_new_tokens=16, progress=False,
             self_prompts={"count": 30, "max_tokens": 40})
    d.update(kw)
    return DataConfig.from_dict(d)


def test_pre_query_text_of_real_templates(byte_tok, qwen3_tok):
    assert pre_query_text(ChatRenderer(byte_tok)) == "<|im_start|>user\n"
    assert pre_query_text(ChatRenderer(qwen3_tok)) == "<|im_start|>user\n"
    assert pre_query_text(ChatRenderer(qwen3_tok, enable_thinking=False)) == "<|im_start|>user\n"
    sys_ = pre_query_text(ChatRenderer(qwen3_tok, system_prompt="Be brief."))
    assert sys_ == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_pre_query_text_smollm2_keeps_its_default_system_turn(smollm_tok):
    text = pre_query_text(ChatRenderer(smollm_tok))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>user\n"), text


def test_seed_texts_are_openings_of_the_pool():
    pool = [Record(f"0:{i}", "s", "w", [{"role": "user", "content": f"Tom has  {i} apples and\nsome pears"}])
            for i in range(5)]
    a, b = seed_texts(pool, 20, 3, seed=1), seed_texts(pool, 20, 3, seed=1)
    assert a == b and len(a) == 20 and all(t.startswith("Tom has ") and len(t.split()) == 3 for t in a)
    assert len(set(a)) > 1  # different records chosen
    assert seed_texts(pool, 20, 3, seed=2) != a
    assert seed_texts(pool, 4, 0, seed=1) == [""] * 4 and seed_texts([], 2, 3, seed=1) == ["", ""]


def test_stage_adds_written_prompts_with_closed_accounting(tmp_path, byte_tok):
    gen = ScriptedWriter(byte_tok)
    rep = run_data_stage(cfg_for(tmp_path, holdout_count=2), tmp_path / "run", gen, tokenizer=byte_tok)
    w = rep["regeneration"]["self_prompts"]
    assert w["count"] == 30 == w["unfinished"] + w["too_short"] + w["duplicates"] + w["added"]
    assert w["unfinished"] > 0 and w["too_short"] > 0 and w["duplicates"] > 0 and w["added"] > 4
    a = rep["accounting"]
    assert a["records_read"] == 6 + 30 == sum(a[k] for k in ACCOUNTING_BUCKETS)
    assert a["packed"] == 4 + w["added"] and a["holdout"] == 2
    assert rep["rejected_by_reason"] == {"self_prompt_too_short": w["too_short"],
                                         "self_prompt_unfinished": w["unfinished"]}
    mine = [s for s in rep["per_source"] if s["source"] == SOURCE_NAME]
    assert mine and mine[0]["selected"] == w["added"] and abs(sum(s["share"] for s in rep["per_source"]) - 1) < 1e-3
    # the written prompts are training prompts (prompts.jsonl), never held out, and packed with their responses
    data = tmp_path / "run" / "data"
    prompts = [json.loads(x) for x in (data / "prompts.jsonl").read_text().splitlines()]
    written = [p for p in prompts if p["source"] == SOURCE_NAME]
    assert len(written) == w["added"] and all(p["uid"].startswith("self:") for p in written)
    texts = [p["messages"][0]["content"] for p in written]
    assert len(set(t.casefold() for t in texts)) == len(texts)
    assert sum("cats have" in t for t in texts) <= 4 and all(t == t.strip() and "x" * 10 not in t for t in texts)
    assert all(json.loads(x)["source"] != SOURCE_NAME for x in (data / "holdout.jsonl").read_text().splitlines())
    packed_docs = {d for row in PackedDataset(data / "train") for d in row["doc_ids"].tolist()}
    assert {i for i, p in enumerate(prompts) if p["source"] == SOURCE_NAME} <= packed_docs
    rejected = [json.loads(x) for x in (data / "rejected.jsonl").read_text().splitlines()]
    assert all(r["source"] == SOURCE_NAME and r["record"]["text"] for r in rejected)
    # the same command again: nothing redone; without the report: the written shards are reused
    calls = gen.calls
    assert run_data_stage(cfg_for(tmp_path, holdout_count=2), tmp_path / "run", gen, tokenizer=byte_tok) == rep
    assert gen.calls == calls
    (data / "report.json").unlink()
    again = run_data_stage(cfg_for(tmp_path, holdout_count=2), tmp_path / "run", gen, tokenizer=byte_tok)
    assert gen.calls == calls and again["regeneration"]["self_prompts"]["shards_skipped"] == 4
    assert again["regeneration"]["self_prompts"]["added"] == w["added"]


def test_openings_and_duplicates_of_source_prompts(tmp_path, byte_tok):
    """seed_words: each written prompt starts with a source prompt's opening; a written prompt equal to a
    source prompt (case and spaces aside) is a duplicate, not a second copy."""

    class Echo(ScriptedWriter):  # writes nothing more than the opening's continuation " plus 1?" for row 0
        def generate(self, prompts, max_new_tokens, *, temperature=0.0, seed=0):
            out = super().generate(prompts, max_new_tokens, temperature=temperature, seed=seed)
            return [self.enc(" 0 PLUS  0?") + [self.eos] if "assistant" not in self.tok.decode(p) and j == 0 else o
                    for j, (p, o) in enumerate(zip(prompts, out))]

    cfg = cfg_for(tmp_path, self_prompts={"count": 16, "max_tokens": 40, "seed_words": 2, "min_words": 0})
    rep = run_data_stage(cfg, tmp_path / "run", Echo(byte_tok), tokenizer=byte_tok)
    w = rep["regeneration"]["self_prompts"]
    prompts = [json.loads(x) for x in (tmp_path / "run" / "data" / "prompts.jsonl").read_text().splitlines()]
    written = [p["messages"][0]["content"] for p in prompts if p["source"] == SOURCE_NAME]
    assert written and all(t.startswith("What is") for t in written)
    assert w["too_short"] == 0 and w["duplicates"] >= 1  # "What is 0 PLUS 0?" repeats the source's first prompt


def test_config_checks_and_fingerprint():
    # configs without written prompts keep the fingerprints they had before data.self_prompts existed
    assert DataConfig().fingerprint() == "fbb8f688a34b5cae"
    assert DataConfig(self_prompts={"count": 0, "temperature": 0.5}).fingerprint() == "fbb8f688a34b5cae"
    assert DataConfig(self_prompts={"count": 3}).fingerprint() != DataConfig(self_prompts={"count": 4}).fingerprint()
    for bad, msg in [({"count": -1}, r"data.self_prompts.count: must be >= 0"),
                     ({"temperature": 0}, r"data.self_prompts.temperature: must be > 0"),
                     ({"max_tokens": 0}, r"data.self_prompts.max_tokens: must be >= 1"),
                     ({"colour": 1}, r"data.self_prompts: unknown key\(s\) \['colour'\]")]:
        with pytest.raises(ValueError, match=msg):
            DataConfig(self_prompts=bad)
    with pytest.raises(ValueError, match=r"data.self_prompts.count: .*needs data.regenerate=true"):
        DataConfig(regenerate=False, self_prompts={"count": 2})


def test_real_backbone_writes_through_hf_and_engine(tmp_path, byte_tok):
    """The tiny random backbone through both local backends: whatever it writes is accounted, and the two
    backends see the same prompts (the same pre-query tokens)."""
    model = tiny_backbone(byte_tok)
    for backend in ("engine", "hf"):
        cfg = cfg_for(tmp_path, regen_backend=backend, self_prompts={"count": 6, "max_tokens": 12, "min_words": 0})
        gen = build_generator(cfg, model, byte_tok)
        assert isinstance(gen, HFGenerator) == (backend == "hf")
        rep = run_data_stage(cfg, tmp_path / backend, gen, tokenizer=byte_tok)
        w = rep["regeneration"]["self_prompts"]
        assert w["count"] == 6 == w["unfinished"] + w["too_short"] + w["duplicates"] + w["added"]
        assert 0 < w["new_tokens"] <= 6 * 12
        a = rep["accounting"]
        assert a["records_read"] == 12 == sum(a[k] for k in ACCOUNTING_BUCKETS)
    meta = [json.loads((tmp_path / b / "data" / "self_prompts" / "meta.json").read_text()) for b in ("engine", "hf")]
    assert meta[0]["fingerprint"] == meta[1]["fingerprint"]


def test_cli_self_prompts_on_the_tiny_recipe(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "orthrus_train", "recipe=tiny", "stage=data", f"run_dir={tmp_path / 'run'}",
            "data.num_samples=12", "data.max_new_tokens=12", "data.self_prompts.count=10",
            "data.self_prompts.max_tokens=24", "data.self_prompts.seed_words=3", "data.self_prompts.min_words=0"]
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "self-written prompts: 10 written" in r.stdout
    rep = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    assert rep["config"]["self_prompts"]["count"] == 10 and rep["regeneration"]["self_prompts"]["count"] == 10
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "skipped" in again.stdout
    bad = subprocess.run(args[:-4] + ["data.self_prompts.temperature=0"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "data.self_prompts.temperature: must be > 0" in bad.stderr.strip().splitlines()[-1]
