"""Prompt sources: every format and file type, bad records, mixture, seed, split, dedup."""

import gzip
import json
import sys
from collections import Counter

import pytest

from orthrus_train.data import BadRecordError, DataConfig, load_sources
from orthrus_train.data.sources import DataMixError, get_path, iter_raw, mix_quotas, parse_path, prompt_key

from .conftest import need_shared, write_jsonl


def cfg(*sources, **kw):
    return DataConfig(sources=list(sources), **kw)


def one(path, **src):
    return {"path_or_id": str(path), **src}


def convs(result):
    """Conversations of the train split, sorted by their first turn's text."""
    return sorted((r.messages for r in result.train), key=lambda m: m[0]["content"])


# ------------------------------------------------------------------------------------------------ formats


def test_messages_format(tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "a2"}]},
        {"messages": [{"role": "user", "content": "q3"}]},
    ])
    r = load_sources(cfg(one(p, format="messages")), require_response=False)
    assert convs(r) == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
         {"role": "assistant", "content": "a2"}],
        [{"role": "user", "content": "q3"}],
    ]
    rec = next(x for x in r.train if x.has_response)
    assert rec.response == "a2" and rec.prompt_messages[-1] == {"role": "user", "content": "q2"}


def test_sharegpt_format(tmp_path):
    p = write_jsonl(tmp_path / "sg.jsonl", [
        {"id": 1, "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hey"},
                                    {"from": "gpt", "value": "hello"}]},
    ])
    r = load_sources(cfg(one(p)), require_response=True)  # auto-detected
    assert convs(r) == [[{"role": "system", "content": "S"}, {"role": "user", "content": "hey"},
                         {"role": "assistant", "content": "hello"}]]


def test_alpaca_format_json_list(tmp_path):
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "GPTeacher style.", "input": "", "response": "ok"},
    ]))
    r = load_sources(cfg(one(p)), require_response=True)
    assert convs(r) == [
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "GPTeacher style."}, {"role": "assistant", "content": "ok"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    ]


def test_prompt_field_paths_and_gzip(tmp_path):
    rows = [{"turns": [{"content": "first"}, {"content": "x"}], "ans": {"text": "A1"}},
            {"turns": [{"content": "second"}], "ans": {"text": "A2"}}]
    p = tmp_path / "p.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    r = load_sources(cfg(one(p, format="prompt", field="turns[0].content", response_field="ans.text")),
                     require_response=True)
    assert convs(r) == [
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "A1"}],
        [{"role": "user", "content": "second"}, {"role": "assistant", "content": "A2"}],
    ]
    assert parse_path("a.b[2].c[-1]") == ["a", "b", 2, "c", -1]
    assert get_path({"a": [{"b": 7}]}, "a[0].b") == 7
    with pytest.raises(ValueError, match="cannot parse"):
        parse_path("a..b]")


def test_parquet_and_arrow_files(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    table = pa.table({"question": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as s, ipc.new_file(s, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as s, ipc.new_stream(s, table.schema) as w:
        w.write_table(table)  # the layout `datasets` writes
    expected = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in (1, 2, 3)]
    for name in ("d.parquet", "file.arrow", "stream.arrow"):
        src = one(tmp_path / name, format="prompt", field="question", response_field="answer")
        r = load_sources(cfg(src, dedup=False), require_response=True)
        assert convs(r) == expected, name
        assert sorted(x.where for x in r.train) == [f"{tmp_path / name} row {i}" for i in range(3)]


def test_save_to_disk_folder_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"prompt": ["p1", "p2"]}).save_to_disk(str(tmp_path / "ds"))
    r = load_sources(cfg(one(tmp_path / "ds", format="prompt", field="prompt")), require_response=False)
    assert sorted(m[0]["content"] for m in convs(r)) == ["p1", "p2"]


def test_hub_id_without_datasets_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs the `datasets` package \(pip install datasets\)"):
        list(iter_raw(DataConfig(sources=[{"path_or_id": "openai/gsm8k", "subset": "main"}]).sources[0]))


def test_unknown_format_and_missing_file(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"foo": "bar"}])
    with pytest.raises(ValueError, match=r"cannot tell the format .*\['foo'\].*set the source's format"):
        load_sources(cfg(one(p)), require_response=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sources(cfg(one(tmp_path / "nope.jsonl")), require_response=False)
    with pytest.raises(ValueError, match="needs `field`"):
        cfg(one(p, format="prompt"))


# ------------------------------------------------------------------------------------------------ real files


@pytest.mark.parametrize("rel, src, n, first", [
    ("gsm8k/train.jsonl", {"format": "prompt", "field": "question", "response_field": "answer"}, 7473,
     "Natalia sold clips"),
    ("humaneval/HumanEval.jsonl.gz", {"format": "prompt", "field": "prompt"}, 164, "from typing import List"),
    ("arena_hard/question.jsonl", {"format": "prompt", "field": "turns[0].content"}, 500, None),
    ("alpaca_eval/model_outputs.json", {"format": "prompt", "field": "instruction"}, 805, None),
    ("codealpaca/code_alpaca_2k.json", {"format": "alpaca"}, 2017, None),
    ("gpteacher/codegen-instruct.json", {"format": "alpaca", "response_field": "response"}, 4535, None),
])
def test_real_files(rel, src, n, first):
    path = need_shared("data", rel)
    c = cfg(one(path, **src), dedup=False)
    r = load_sources(c, require_response=False)
    assert r.counts["read"] == n and r.counts["rejected"] == 0 and len(r.train) == n
    by_line = sorted(r.train, key=lambda x: int(x.uid.split(":")[1]))
    if first:
        assert by_line[0].messages[0]["content"].lstrip().startswith(first)
    if src.get("response_field") or src["format"] == "alpaca":
        # keeping the dataset's responses: records with an empty one are rejected, the rest keep theirs
        raw = [json.loads(x) for x in path.read_text().splitlines()] if rel.endswith(".jsonl") else \
            json.loads(path.read_text())
        rkey = src.get("response_field", "output")
        n_empty = sum(1 for x in raw if not x[rkey].strip())
        keep = load_sources(cfg(one(path, **src), dedup=False, on_bad_record="skip"), require_response=True)
        assert Counter(x.reason for x in keep.rejected) == ({"empty_response": n_empty} if n_empty else {})
        assert len(keep.train) == n - n_empty and all(x.response.strip() for x in keep.train)


# ------------------------------------------------------------------------------------------------ bad records


def bad_file(tmp_path):
    return write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "ok 1"},
        "{not json",
        {"other": "missing"},
        {"question": "   "},
        {"question": 42},
        {"question": "ok 2"},
    ])


@pytest.mark.parametrize("line, reason, pattern", [
    (2, "invalid_json", "not valid JSON"),
    (3, "missing_field", "missing field 'question'"),
    (4, "empty_prompt", "the prompt is empty"),
    (5, "wrong_type", "must be a string, got int"),
])
def test_bad_record_raises_with_file_and_line(tmp_path, line, reason, pattern):
    p = bad_file(tmp_path)
    # keep only the good first line and the bad one under test, at its original line number
    lines = p.read_text().splitlines()
    p.write_text("\n".join(x if i in (0, line - 1) else "" for i, x in enumerate(lines)) + "\n")
    with pytest.raises(BadRecordError) as e:
        load_sources(cfg(one(p, format="prompt", field="question")), require_response=False)
    msg = str(e.value)
    assert msg.startswith(f"{p} line {line}: bad record ({reason})")
    assert pattern in msg and "data.on_bad_record=skip" in msg


def test_bad_records_json_list_name_the_index(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "fine", "output": "x"}, {"instruction": ["not", "text"]}]))
    with pytest.raises(BadRecordError, match=rf"^{p} \[1\]: bad record \(wrong_type\): instruction must be a string"):
        load_sources(cfg(one(p)), require_response=True)
    p.write_text('[{"instruction": "x"},\n {"instruction": oops}]')
    with pytest.raises(ValueError, match=rf"{p} line 2 column .*not valid JSON"):
        load_sources(cfg(one(p)), require_response=False)


def test_skip_mode_collects_rejects_and_accounting_closes(tmp_path):
    p = bad_file(tmp_path)
    r = load_sources(cfg(one(p, format="prompt", field="question"), on_bad_record="skip"), require_response=False)
    assert sorted(m[0]["content"] for m in convs(r)) == ["ok 1", "ok 2"]
    assert [(x.where, x.reason) for x in r.rejected] == [
        (f"{p} line 2", "invalid_json"), (f"{p} line 3", "missing_field"),
        (f"{p} line 4", "empty_prompt"), (f"{p} line 5", "wrong_type")]
    assert r.rejected[1].record == {"other": "missing"}
    c = r.counts
    assert c["read"] == 6 == c["rejected"] + c["duplicates"] + c["not_selected"] + c["holdout"] + c["train"]


def test_roles_and_missing_response(tmp_path):
    p = write_jsonl(tmp_path / "roles.jsonl", [
        {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "t"}]},
        {"messages": [{"role": "user", "content": "only a prompt"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
    ])
    r = load_sources(cfg(one(p), on_bad_record="skip"), require_response=True)
    assert [x.reason for x in r.rejected] == ["bad_role", "bad_role", "no_response", "empty_response"]
    assert r.counts["train"] == 0
    # for regeneration a missing or empty response is fine: only the prompt is used
    r = load_sources(cfg(one(p), on_bad_record="skip"), require_response=False)
    assert [x.reason for x in r.rejected] == ["bad_role", "bad_role"]
    assert convs(r) == [[{"role": "user", "content": "only a prompt"}], [{"role": "user", "content": "q"}]]


# ------------------------------------------------------------------------------------------------ mixture


def numbered(tmp_path, name, n):
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"q": f"{name} {i}"} for i in range(n)])


def test_mixture_weights_split_counts_and_seed_determinism(tmp_path):
    a, b, c = numbered(tmp_path, "a", 100), numbered(tmp_path, "b", 100), numbered(tmp_path, "c", 100)
    srcs = [one(a, format="prompt", field="q", weight=3), one(b, format="prompt", field="q", weight=1),
            one(c, format="prompt", field="q", weight=1)]
    r = load_sources(cfg(*srcs, num_samples=50, seed=1), require_response=False)
    by_source = Counter(x.source for x in r.train)
    assert [by_source[str(p)] for p in (a, b, c)] == [30, 10, 10]
    assert [s["selected"] for s in r.per_source] == [30, 10, 10]
    assert r.counts["not_selected"] == 250
    again = load_sources(cfg(*srcs, num_samples=50, seed=1), require_response=False)
    assert [x.uid for x in again.train] == [x.uid for x in r.train]  # same seed: same prompts, same order
    other = load_sources(cfg(*srcs, num_samples=50, seed=2), require_response=False)
    assert {x.uid for x in other.train} != {x.uid for x in r.train}
    assert Counter(x.source for x in other.train) == by_source  # quotas do not depend on the seed


def test_mixture_weights_are_proportions_a_short_source_is_used_whole(tmp_path):
    a, b, c = numbered(tmp_path, "a", 100), numbered(tmp_path, "b", 100), numbered(tmp_path, "c", 100)
    src = [one(a, format="prompt", field="q", weight=3), one(b, format="prompt", field="q", max_samples=10),
           one(c, format="prompt", field="q", weight=1)]
    # 3:1:1 of 80 would be 48:16:16; b has 10: used whole, the other 70 split 3:1 between a and c
    r = load_sources(cfg(*src, num_samples=80), require_response=False)
    assert [s["selected"] for s in r.per_source] == [53, 10, 17]  # 52.5 : 17.5, the tie to the first
    assert [s["share"] for s in r.per_source] == [0.6625, 0.125, 0.2125]
    assert Counter(x.source for x in r.train) == {str(a): 53, str(b): 10, str(c): 17}
    c_ = r.counts
    assert c_["read"] == c_["rejected"] + c_["duplicates"] + c_["not_selected"] + c_["holdout"] + c_["train"]
    # two short sources: both whole, the third fills up; all three whole: every prompt
    src2 = [src[0], src[1], one(c, format="prompt", field="q", max_samples=5)]
    assert [s["selected"] for s in load_sources(cfg(*src2, num_samples=100), require_response=False).per_source] == \
        [85, 10, 5]
    assert len(load_sources(cfg(*src2, num_samples=115), require_response=False).train) == 115
    # more than all sources hold: one line naming what each has
    with pytest.raises(DataMixError, match=r"data.num_samples=116 is more than the 115 usable prompts of all sources "
                                           r"\(.*a.jsonl: 100, .*b.jsonl: 10, .*c.jsonl: 5\); .*num_samples=all"):
        load_sources(cfg(*src2, num_samples=116), require_response=False)
    # all / -1: every prompt, whatever the weights
    assert len(load_sources(cfg(*src2, num_samples="all"), require_response=False).train) == 115
    assert len(load_sources(cfg(*src2, num_samples=-1), require_response=False).train) == 115


@pytest.mark.parametrize("seed", range(20))
def test_mix_quotas_properties(seed):
    import random

    rng = random.Random(seed)
    n = rng.randint(1, 6)
    weights = [rng.choice([0.2, 0.5, 1.0, 3.0]) for _ in range(n)]
    available = [rng.randint(0, 50) for _ in range(n)]
    total = rng.randint(0, sum(available))
    q = mix_quotas(weights, available, total)
    assert sum(q) == total and all(0 <= x <= a for x, a in zip(q, available))
    # a source below its capacity gets at least its proportional share of what the full ones left
    full = [i for i in range(n) if q[i] == available[i]]
    rest = [i for i in range(n) if i not in full]
    if rest:
        left = total - sum(available[i] for i in full)
        w = sum(weights[i] for i in rest)
        assert all(abs(q[i] - weights[i] * left / w) <= 2 for i in rest)


def test_max_samples_without_weights(tmp_path):
    a, b = numbered(tmp_path, "a", 40), numbered(tmp_path, "b", 40)
    r = load_sources(cfg(one(a, format="prompt", field="q", max_samples=7), one(b, format="prompt", field="q")),
                     require_response=False)
    by_source = Counter(x.source for x in r.train)
    assert by_source[str(a)] == 7 and by_source[str(b)] == 40
    assert r.counts["not_selected"] == 33


def test_holdout_split_is_disjoint_and_deterministic(tmp_path):
    a = numbered(tmp_path, "a", 200)
    src = one(a, format="prompt", field="q")
    r = load_sources(cfg(src, holdout_fraction=0.1, seed=3), require_response=False)
    assert len(r.holdout) == 20 and len(r.train) == 180
    assert not {prompt_key(x.prompt_messages) for x in r.holdout} & {prompt_key(x.prompt_messages) for x in r.train}
    assert [x.uid for x in load_sources(cfg(src, holdout_fraction=0.1, seed=3), require_response=False).holdout] == \
        [x.uid for x in r.holdout]
    r2 = load_sources(cfg(src, holdout_count=5, holdout_fraction=0.5), require_response=False)
    assert len(r2.holdout) == 5 and len(r2.train) == 195


def test_dedup_normalizes_whitespace_and_case_across_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": "What is  2+2?"}, {"q": "what is 2+2? "}, {"q": "Other"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": "WHAT IS 2+2?"}, {"q": "new"}])
    srcs = [one(a, format="prompt", field="q"), one(b, format="prompt", field="q")]
    r = load_sources(cfg(*srcs), require_response=False)
    assert sorted(m[0]["content"] for m in convs(r)) == ["Other", "What is  2+2?", "new"]  # first one kept
    assert r.counts["duplicates"] == 2 and [s["duplicates"] for s in r.per_source] == [1, 1]
    c = r.counts
    assert c["read"] == c["rejected"] + c["duplicates"] + c["not_selected"] + c["holdout"] + c["train"]
    assert len(load_sources(cfg(*srcs, dedup=False), require_response=False).train) == 5
