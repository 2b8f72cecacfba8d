"""The whole data stage: outputs, accounting, idempotence, ranks, and kill -9 + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orthrus_train.data import (BadRecordError, ChatRenderer, DataConfig, HFGenerator, PackedDataset,
                                check_accounting, run_data_stage)
from orthrus_train.data.stage import ACCOUNTING_BUCKETS, VAL_BUCKETS, as_data_config

from .conftest import REPO, tiny_backbone, write_jsonl

QA = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(24)]


def prompt_file(tmp_path, extra=()):
    return write_jsonl(tmp_path / "qa.jsonl", QA[:12] + list(extra) + QA[12:])


def base_cfg(path, **kw):
    d = dict(sources=[{"path_or_id": str(path), "format": "prompt", "field": "question", "response_field": "answer"}],
             seq_len=64, rows_per_file=4, shard_size=4, batch_size=3, max_new_tokens=6, progress=False)
    d.update(kw)
    return d


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def docs_of(data_dir, split="train"):
    """{doc_id: (input_ids, loss_mask)} over every packed row of data_dir/split."""
    out = {}
    for row in PackedDataset(data_dir / split):
        ids, mask, seg = row["input_ids"].tolist(), row["loss_mask"].long().tolist(), row["segment_ids"].tolist()
        for k, d in enumerate(row["doc_ids"].tolist(), 1):
            idx = [j for j, s in enumerate(seg) if s == k]
            out[d] = ([ids[j] for j in idx], [mask[j] for j in idx])
    return out


@pytest.fixture(scope="module")
def generator(byte_tok):
    return HFGenerator(tiny_backbone(byte_tok), [byte_tok.eos_token_id], byte_tok.pad_token_id)


def test_keep_mode_end_to_end(tmp_path, byte_tok, capsys):
    path = prompt_file(tmp_path, ["{broken", QA[3], {"question": "  WHAT is 5 plus 5? ", "answer": "dup"}])
    cfg = base_cfg(path, regenerate=False, holdout_count=3, on_bad_record="skip")
    report = run_data_stage(cfg, tmp_path / "run", tokenizer=byte_tok)
    data = tmp_path / "run" / "data"

    a = report["accounting"]
    assert a == {"records_read": 27, "rejected": 1, "duplicates": 2, "not_selected": 0, "holdout": 3,
                 "dropped_overlong": 0, "packed": 21}
    assert report["rejected_by_reason"] == {"invalid_json": 1}
    assert read_jsonl(data / "rejected.jsonl")[0]["where"] == f"{path} line 13"
    holdout, prompts = read_jsonl(data / "holdout.jsonl"), read_jsonl(data / "prompts.jsonl")
    assert len(holdout) == 3 and len(prompts) == 21
    assert not {h["messages"][0]["content"] for h in holdout} & {p["messages"][0]["content"] for p in prompts}

    # every packed document is its conversation rendered by the template; the mask is the answer + <|im_end|>
    renderer = ChatRenderer(byte_tok)
    docs = docs_of(data)
    assert sorted(docs) == list(range(21))
    for d, (ids, mask) in docs.items():
        enc = renderer.encode(prompts[d]["messages"])
        assert (ids, mask) == (enc.input_ids, enc.loss_mask)
        answer = prompts[d]["messages"][-1]["content"]
        assert byte_tok.decode([t for t, m in zip(ids, mask) if m]) == answer + "<|im_end|>"
    assert report["tokens"] == sum(len(i) for i, _ in docs.values())
    assert report["supervised_tokens"] == sum(sum(m) for _, m in docs.values())
    assert report["regeneration"] is None
    # the held-out conversations, rendered the same way, are val/'s rows (doc_ids index holdout.jsonl)
    val = docs_of(data, "val")
    assert sorted(val) == [0, 1, 2]
    for d, (ids, mask) in val.items():
        enc = renderer.encode(holdout[d]["messages"])
        assert (ids, mask) == (enc.input_ids, enc.loss_mask)
    assert report["val"]["packed"] == 3 and report["val"]["tokens"] == sum(len(i) for i, _ in val.values())
    out = capsys.readouterr().out
    assert "records 27 = rejected 1 + duplicates 2" in out and "invalid_json 1" in out

    # idempotent: the second run sees the finished report and touches nothing
    stamps = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()}
    assert run_data_stage(cfg, tmp_path / "run", tokenizer=byte_tok) == report
    assert "already done" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="another data config.*new run directory"):
        run_data_stage({**cfg, "seq_len": 128}, tmp_path / "run", tokenizer=byte_tok)


def test_regenerated_rows_are_prompt_plus_backbone_response(tmp_path, byte_tok, generator):
    path = prompt_file(tmp_path)
    report = run_data_stage(base_cfg(path, temperature=0.8, seed=5), tmp_path / "run", generator, tokenizer=byte_tok)
    data = tmp_path / "run" / "data"
    prompts = read_jsonl(data / "prompts.jsonl")
    renderer = ChatRenderer(byte_tok)
    shards = sorted((data / "regen").glob("shard-*.json"))
    responses = [r for s in shards for r in json.loads(s.read_text())["responses"]]
    assert len(responses) == 24 == report["regeneration"]["prompts"]
    for d, (ids, mask) in docs_of(data).items():
        prompt = renderer.encode_prompt(prompts[d]["messages"][:-1]).input_ids  # dataset answer dropped
        assert ids == prompt + responses[d]
        assert mask == [0] * len(prompt) + [1] * len(responses[d])
    g = report["regeneration"]
    assert g["new_tokens"] == sum(map(len, responses)) and g["tokens_per_s"] > 0 and g["shards"] == 6
    assert report["supervised_tokens"] == g["new_tokens"]
    # no held-out prompt: no val/ folder, and an empty val account
    assert not (data / "val").exists() and report["files"]["val"] is None
    assert report["val"] == {"prompts": 0, "skipped": 0, "dropped_overlong": 0, "packed": 0, "rows_written": 0,
                             "tokens": 0, "supervised_tokens": 0, "truncated": 0, "regeneration": None}


class NoGenerator:
    """Fails the test when asked for a response (a resumed stage must find every shard written)."""

    def generate(self, prompts, max_new_tokens, **kw):
        raise AssertionError(f"regenerated {len(prompts)} prompts that had finished shards")


def test_holdout_prompts_get_backbone_responses_in_val_never_in_train(tmp_path, byte_tok, generator, capsys):
    path = prompt_file(tmp_path)
    cfg = base_cfg(path, holdout_count=5, samples_per_prompt=2, sample_temperature=1.0)
    report = run_data_stage(cfg, tmp_path / "run", generator, tokenizer=byte_tok)
    data = tmp_path / "run" / "data"
    holdout, prompts = read_jsonl(data / "holdout.jsonl"), read_jsonl(data / "prompts.jsonl")
    assert len(holdout) == 5 and len(prompts) == 19
    renderer = ChatRenderer(byte_tok)
    shards = sorted((data / "regen_val").glob("shard-*.json"))
    responses = [r for s in shards for r in json.loads(s.read_text())["responses"]]
    assert len(responses) == 5  # one response per held-out prompt, whatever samples_per_prompt
    val = docs_of(data, "val")
    assert sorted(val) == list(range(5))
    for d, (ids, mask) in val.items():
        prompt = renderer.encode_prompt(holdout[d]["messages"][:-1]).input_ids
        assert ids == prompt + responses[d] and mask == [0] * len(prompt) + [1] * len(responses[d])
    # round 0 of a prompt is decoded the same way for train and val: the backbone's greedy answer
    first_train = json.loads((data / "regen" / "shard-00000.json").read_text())["responses"][0]
    assert first_train == generator.generate([renderer.encode_prompt(prompts[0]["messages"][:-1]).input_ids],
                                             6)[0]
    assert responses[0] == generator.generate([val[0][0][:len(val[0][0]) - len(responses[0])]], 6)[0]
    # no held-out question in any training row; each in its val row
    train_text = [byte_tok.decode(ids) for ids, _ in docs_of(data).values()]
    val_text = [byte_tok.decode(ids) for ids, _ in val.values()]
    for h in holdout:
        q = h["messages"][0]["content"]
        assert not [t for t in train_text if q + "<|im_end|>" in t], q
        assert [t for t in val_text if q + "<|im_end|>" in t], q
    # accounting: the training buckets close as before, and every held-out prompt is in val/
    a, v = report["accounting"], report["val"]
    assert a["holdout"] == v["prompts"] == 5 == sum(v[k] for k in VAL_BUCKETS) == v["packed"]
    assert v["rows_written"] == len(PackedDataset(data / "val")) > 0
    assert v["tokens"] == sum(len(i) for i, _ in val.values())
    assert v["supervised_tokens"] == sum(map(len, responses)) == v["regeneration"]["new_tokens"]
    assert report["files"]["val"] == "val"
    assert "val: 5 held-out prompts -> " in capsys.readouterr().out

    # resumable: with the report and the packed folders gone, a rerun decodes nothing and writes the same rows
    import shutil
    for name in ("report.json", "val", "train"):
        p = data / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    again = run_data_stage(cfg, tmp_path / "run", NoGenerator(), tokenizer=byte_tok)
    assert docs_of(data, "val") == val and again["val"]["regeneration"]["shards_skipped"] == 2
    assert again["accounting"] == a


CONFIGS = {
    "keep": dict(regenerate=False),
    "keep-skip-bad-holdout": dict(regenerate=False, on_bad_record="skip", holdout_fraction=0.25),
    # rendered documents are 45-46 tokens (one-digit numbers) or 48-49 (two digits)
    "keep-overlong-drop": dict(regenerate=False, seq_len=46, overlong="drop", on_bad_record="skip"),
    "keep-overlong-truncate": dict(regenerate=False, seq_len=44, overlong="truncate"),
    "regen-mixture": dict(num_samples=10, holdout_count=2, on_bad_record="skip"),
    # prompts are 36 tokens (one-digit numbers) or 38: the longer ones leave no room for a response
    "regen-prompt-too-long": dict(seq_len=37, max_new_tokens=8, dedup=False, on_bad_record="skip"),
    "regen-holdout-too-long": dict(seq_len=37, max_new_tokens=8, dedup=False, on_bad_record="skip",
                                   holdout_count=8),
    "keep-holdout-overlong-drop": dict(regenerate=False, seq_len=46, overlong="drop", on_bad_record="skip",
                                       holdout_count=8),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_accounting_closes(tmp_path, byte_tok, generator, name):
    bad = ["not json at all", {"question": ""}, {"question": ["x"]}, QA[0], {"question": "Short?", "answer": "Yes."}]
    path = prompt_file(tmp_path, bad if CONFIGS[name].get("on_bad_record") else [QA[0]])
    n_lines = len(path.read_text().splitlines())
    report = run_data_stage(base_cfg(path, **CONFIGS[name]), tmp_path / "run", generator, tokenizer=byte_tok)
    data = tmp_path / "run" / "data"
    a = report["accounting"]
    assert a["records_read"] == n_lines == sum(a[k] for k in ACCOUNTING_BUCKETS)
    assert a["packed"] == sum(len(r["doc_ids"]) for r in PackedDataset(data)) == report["documents_packed"]
    assert a["rejected"] == len(read_jsonl(data / "rejected.jsonl")) == sum(report["rejected_by_reason"].values())
    assert a["holdout"] == len(read_jsonl(data / "holdout.jsonl"))
    assert a["packed"] + a["dropped_overlong"] == len(read_jsonl(data / "prompts.jsonl")) - sum(
        1 for r in read_jsonl(data / "rejected.jsonl") if r["reason"] == "template_error")
    assert a["packed"] > 0
    if name == "keep-overlong-drop":
        assert a["dropped_overlong"] > 0 and report["truncated"] == 0
    if name == "keep-overlong-truncate":
        assert report["truncated"] > 0
    if name == "regen-prompt-too-long":
        assert report["dropped_overlong_prompt"] > 0 and report["truncated"] > 0
    v = report["val"]  # every held-out prompt is skipped, dropped overlong or packed into val/
    assert v["prompts"] == a["holdout"] == sum(v[k] for k in VAL_BUCKETS)
    assert v["packed"] == (sum(len(r["doc_ids"]) for r in PackedDataset(data / "val")) if v["packed"] else 0)
    if name == "regen-holdout-too-long":
        assert v["skipped"] > 0 and v["packed"] > 0
    if name == "keep-holdout-overlong-drop":
        assert v["dropped_overlong"] > 0 and v["packed"] > 0
    with pytest.raises(RuntimeError, match="does not close"):
        check_accounting({**a, "packed": a["packed"] + 1})


def test_ranks_split_regeneration_and_rank0_packs(tmp_path, byte_tok, generator):
    path = prompt_file(tmp_path)
    cfg = base_cfg(path)
    assert run_data_stage(cfg, tmp_path / "two", generator, tokenizer=byte_tok, rank=1, world_size=2) is None
    assert sorted(p.name for p in (tmp_path / "two/data/regen").glob("shard-*")) == \
        ["shard-00001.json", "shard-00003.json", "shard-00005.json"]
    two = run_data_stage(cfg, tmp_path / "two", generator, tokenizer=byte_tok, rank=0, world_size=2)
    one = run_data_stage(cfg, tmp_path / "one", generator, tokenizer=byte_tok, rank=0, world_size=1)
    assert docs_of(tmp_path / "two/data") == docs_of(tmp_path / "one/data")
    assert two["accounting"] == one["accounting"]


def test_template_refusing_a_record(tmp_path, byte_tok):
    """A template's raise_exception on one record is a bad record: named in raise mode, skipped in skip mode."""
    import copy

    tok = copy.deepcopy(byte_tok)
    tok.chat_template = ("{% for m in messages %}{% if '13' in m['content'] %}{{ raise_exception('no 13 here') }}"
                         "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = prompt_file(tmp_path)
    cfg = base_cfg(path, regenerate=False)
    with pytest.raises(BadRecordError, match=rf"{path} line 14: bad record \(template_error\).*no 13 here"):
        run_data_stage(cfg, tmp_path / "a", tokenizer=tok)
    report = run_data_stage({**cfg, "on_bad_record": "skip"}, tmp_path / "b", tokenizer=tok)
    assert report["rejected_by_reason"] == {"template_error": 1}
    assert report["accounting"]["packed"] == 23


def test_config_errors(tmp_path, byte_tok):
    path = prompt_file(tmp_path)
    with pytest.raises(ValueError, match="data.model is unset and no generator"):
        run_data_stage(base_cfg(path), tmp_path / "run", tokenizer=byte_tok)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['seqlen'\]; valid keys are"):
        DataConfig.from_dict({"seqlen": 5})
    with pytest.raises(ValueError, match="data.overlong: 'cut' is not one of"):
        DataConfig(overlong="cut")
    assert as_data_config({"data": base_cfg(path), "model": {}}).seq_len == 64


KILLED_RUN = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])  # this checkout; removed again so its kernels/ folder shadows nothing
from orthrus_train.data import regen, run_data_stage
sys.path.pop(0)

real, real_stream = regen.HFGenerator.generate, regen.EngineGenerator.generate_stream


def slow(self, *args, **kwargs):  # slow enough to be killed between shards (transformers backend)
    time.sleep(0.4)
    return real(self, *args, **kwargs)


def slow_stream(self, *args, **kwargs):  # the engine backend (the default): 0.45 s per shard of 3
    for item in real_stream(self, *args, **kwargs):
        time.sleep(0.15)
        yield item


regen.HFGenerator.generate, regen.EngineGenerator.generate_stream = slow, slow_stream
run_data_stage(json.load(open(sys.argv[1])), sys.argv[2])
"""


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    path = prompt_file(tmp_path)
    cfg = base_cfg(path, model=str(tiny_model_dir), temperature=0.7, seed=11, shard_size=3, batch_size=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "cfg.json"), str(killed), str(REPO)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    regen_dir = killed / "data" / "regen"
    deadline = time.monotonic() + 120
    try:
        while len(list(regen_dir.glob("shard-*.json"))) < 2:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "no shard finished within 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    finished = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in regen_dir.glob("shard-*.json")}
    assert 2 <= len(finished) < 8 and not (killed / "data" / "report.json").exists()

    resumed = run_data_stage(cfg, killed)
    assert resumed["regeneration"]["shards_skipped"] == len(finished)
    assert resumed["regeneration"]["shards_done_this_run"] == 8 - len(finished)
    for name, (content, mtime) in finished.items():  # finished shards were not redone
        p = regen_dir / name
        assert (p.read_bytes(), p.stat().st_mtime_ns) == (content, mtime)

    clean = tmp_path / "clean"
    uninterrupted = run_data_stage(cfg, clean)
    for k in range(8):
        a = json.loads((regen_dir / f"shard-{k:05d}.json").read_text())
        b = json.loads((clean / "data/regen" / f"shard-{k:05d}.json").read_text())
        assert a["responses"] == b["responses"], f"shard {k}"
    assert docs_of(killed / "data") == docs_of(clean / "data")
    for f in ("train/part-00000.arrow", "prompts.jsonl", "holdout.jsonl"):
        assert (killed / "data" / f).read_bytes() == (clean / "data" / f).read_bytes()
    assert resumed["accounting"] == uninterrupted["accounting"]
