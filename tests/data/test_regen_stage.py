"""The data stage with the regeneration backends: backend choice, N responses per prompt (deduplicated and
accounted), every prompt of the sources, and a data mix that cannot be met failing before any model loads."""

import json
import os
import subprocess
import sys
import types
import warnings

import pytest

from orthrus_train.data import DataConfig, HFGenerator, PackedDataset, run_data_stage
from orthrus_train.data.regen import EngineGenerator
from orthrus_train.data.sources import DataMixError
from orthrus_train.data.stage import ACCOUNTING_BUCKETS, LazyGenerator, build_generator, regen_backend

from .conftest import REPO, tiny_backbone, write_jsonl

QA = [{"question": f"What is {i} plus {i}?"} for i in range(12)]


def cfg_for(tmp_path, **kw):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    d = dict(sources=[{"path_or_id": str(path), "format": "prompt", "field": "question"}], seq_len=64,
             shard_size=5, batch_size=4, max_new_tokens=8, progress=False)
    d.update(kw)
    return DataConfig.from_dict(d)


@pytest.fixture(scope="module")
def model(byte_tok):
    return tiny_backbone(byte_tok)


def test_backend_choice(byte_tok, model, tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path)
    assert cfg.regen_backend == "auto" and regen_backend(cfg, model.config) == "engine"
    assert isinstance(build_generator(cfg, model, byte_tok), EngineGenerator)
    # data.prefill_graphs reaches the engine the generator builds (default on; false: eager prefill passes)
    for on in (True, False):
        gen = build_generator(cfg_for(tmp_path, prefill_graphs=on), model, byte_tok)
        gen.generate([[1, 2, 3]], 2)
        assert gen.engine.prefill_graphs is on
    # data.fused_argmax reaches the engine too (default off); where the kernel cannot run (no CUDA device, and the
    # interpreter's variable unset) the engine decodes from the logits and the stats say why
    gen = build_generator(cfg, model, byte_tok)
    gen.generate([[1, 2, 3]], 2)
    assert gen.engine.fused_argmax is False and "fused_argmax" not in gen.engine_stats
    gen = build_generator(cfg_for(tmp_path, fused_argmax=True), model, byte_tok)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate([[1, 2, 3]], 2)
    stats = gen.engine_stats
    assert gen.engine.fused_argmax is True and stats["fused_argmax"] is gen.engine.fused_argmax_active
    if not gen.engine.fused_argmax_active:  # a CPU box: one warning, the reason recorded, the same response
        assert stats["fused_argmax_error"] and any("fused_argmax" in str(w.message) for w in caught)
        assert out == build_generator(cfg, model, byte_tok).generate([[1, 2, 3]], 2)
    assert isinstance(build_generator(cfg_for(tmp_path, regen_backend="hf"), model, byte_tok), HFGenerator)
    unsupported = types.SimpleNamespace(model_type="gpt2")
    assert regen_backend(cfg, unsupported) == "hf"
    with pytest.raises(ValueError, match="data.regen_backend: 'vllm' is not one of"):
        cfg_for(tmp_path, regen_backend="vllm")

    # server: the generator comes from orthrus_train.data.server, imported only then, and no model loads
    made = {}

    class ServerGenerator:
        @classmethod
        def from_config(cls, server, tokenizer, eos_token_ids, model_path=None):
            made.update(eos=eos_token_ids, model_path=model_path)
            return cls()

        def generate(self, prompts, max_new_tokens, *, temperature=0.0, seed=0):
            return [[byte_tok.eos_token_id] for _ in prompts]

    monkeypatch.setitem(sys.modules, "orthrus_train.data.server", types.SimpleNamespace(ServerGenerator=ServerGenerator))
    lazy = LazyGenerator(cfg_for(tmp_path, regen_backend="server", model="m",
                                 server={"url": "http://127.0.0.1:9"}), byte_tok, {9},
                         load_backbone=lambda: pytest.fail("the server backend loads no model"))
    assert lazy.generate([[1, 2]], 4) == [[byte_tok.eos_token_id]] and made == {"eos": [9], "model_path": "m"}


def test_no_model_loads_when_the_mix_cannot_be_met(tmp_path, byte_tok):
    cfg = cfg_for(tmp_path, num_samples=13, model="somewhere")
    lazy = LazyGenerator(cfg, byte_tok, {byte_tok.eos_token_id},
                         load_backbone=lambda: pytest.fail("the model was loaded before the mix was checked"))
    with pytest.raises(DataMixError, match=r"data.num_samples=13 is more than the 12 usable prompts of all sources"):
        run_data_stage(cfg, tmp_path / "run", lazy, tokenizer=byte_tok)
    assert not (tmp_path / "run" / "data" / "regen").exists()


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_samples_per_prompt_dedup_and_accounting(tmp_path, byte_tok, model, backend):
    saved = model.generation_config
    try:
        model.generation_config = type(saved)(temperature=1.0, top_p=1.0, top_k=0)
        gen = build_generator(cfg_for(tmp_path, regen_backend=backend), model, byte_tok)
        one = run_data_stage(cfg_for(tmp_path, regen_backend=backend), tmp_path / "one", gen, tokenizer=byte_tok)
        rep = run_data_stage(cfg_for(tmp_path, samples_per_prompt=3, regen_backend=backend), tmp_path / "three", gen,
                             tokenizer=byte_tok)
        # the target's generation config with top_k=1: every sampled response is the greedy one, all dropped
        model.generation_config = type(saved)(temperature=1.0, top_k=1)
        gen = build_generator(cfg_for(tmp_path, regen_backend=backend), model, byte_tok)
        same = run_data_stage(cfg_for(tmp_path, samples_per_prompt=3, regen_backend=backend), tmp_path / "same", gen,
                              tokenizer=byte_tok)
    finally:
        model.generation_config = saved
    g = rep["regeneration"]
    assert g["samples_per_prompt"] == 3 and g["responses"] == 36 and g["shards"] == 9
    if backend == "engine":  # data.compile_steps' decision is part of the report (auto: no compile on the CPU)
        assert g["compile"]["setting"] == "auto" and g["compile"]["used"] is False, g.get("compile")
        # where the engine's time went: decode steps, refills and their host seconds (this process, so far)
        e = g["engine"]
        assert e["decode_steps"] > 0 and e["refills"] >= 1 and e["refill_host_seconds"] > 0, e
        assert e["prefill_graph_replays"] == 0  # (the CPU: no CUDA graphs, every prefill pass eager)
        assert one["regeneration"]["engine"]["decode_steps"] < e["decode_steps"]  # counts grow with the work
    else:
        assert "compile" not in g and "engine" not in g
    assert g["responses"] == g["duplicate_responses"] + g["documents_dropped_overlong"] + g["documents_packed"]
    assert rep["documents_packed"] > one["documents_packed"] == 12
    assert rep["supervised_tokens"] > 2 * one["supervised_tokens"]
    for r in (one, rep, same):  # prompts are accounted once, however many responses they have
        a = r["accounting"]
        assert a["records_read"] == 12 == sum(a[k] for k in ACCOUNTING_BUCKETS) and a["packed"] == 12
    # every prompt's documents: prompt + distinct responses, the greedy one among them
    docs = {}
    for row in PackedDataset(tmp_path / "three" / "data" / "train"):
        ids, seg = row["input_ids"].tolist(), row["segment_ids"].tolist()
        for k, d in enumerate(row["doc_ids"].tolist(), 1):
            docs.setdefault(d, []).append(tuple(t for t, s in zip(ids, seg) if s == k))
    greedy = {}
    for row in PackedDataset(tmp_path / "one" / "data" / "train"):
        ids, seg = row["input_ids"].tolist(), row["segment_ids"].tolist()
        for k, d in enumerate(row["doc_ids"].tolist(), 1):
            greedy[d] = tuple(t for t, s in zip(ids, seg) if s == k)
    assert sorted(docs) == list(range(12))
    assert all(len(set(v)) == len(v) and greedy[d] in v for d, v in docs.items())
    assert sum(map(len, docs.values())) == g["documents_packed"]
    s = same["regeneration"]
    assert s["duplicate_responses"] == 24 and same["documents_packed"] == 12
    assert same["supervised_tokens"] == one["supervised_tokens"]


def test_sample_temperature_reaches_the_extra_samples(tmp_path, byte_tok, model):
    """data.sample_temperature replaces the generation_config's temperature for the extra samples (its top-k /
    top-p kept): near 0 every extra sample repeats the greedy response and is dropped, at the generation_config's
    T=1 they are distinct; the report and the regeneration folder's meta say which; 0 is a one-line error."""
    saved = model.generation_config
    try:
        model.generation_config = type(saved)(temperature=1.0, top_p=0.9, top_k=0)
        gen = build_generator(cfg_for(tmp_path, regen_backend="engine"), model, byte_tok)
        cold = run_data_stage(cfg_for(tmp_path, samples_per_prompt=3, sample_temperature=1e-4, regen_backend="engine"),
                              tmp_path / "cold", gen, tokenizer=byte_tok)
        hot = run_data_stage(cfg_for(tmp_path, samples_per_prompt=3, regen_backend="engine"), tmp_path / "hot", gen,
                             tokenizer=byte_tok)
    finally:
        model.generation_config = saved
    c, h = cold["regeneration"], hot["regeneration"]
    assert c["extra_samples"] == [1e-4, 0, 0.9] and h["extra_samples"] == [1.0, 0, 0.9]
    assert c["duplicate_responses"] == 24 and cold["documents_packed"] == 12
    assert h["duplicate_responses"] < 12 and hot["documents_packed"] > 24
    meta = json.loads((tmp_path / "cold" / "data" / "regen" / "meta.json").read_text())
    assert meta["sampling"] == [1e-4, 0, 0.9]
    assert DataConfig(sample_temperature=0.7).fingerprint() != DataConfig().fingerprint()
    with pytest.raises(ValueError, match=r"data.sample_temperature: must be > 0"):
        DataConfig(sample_temperature=0.0)


def test_num_samples_all(tmp_path):
    for v in ("all", "ALL", -1, None):
        assert DataConfig(num_samples=v).num_samples is None and DataConfig(num_samples=v).take_all
    assert DataConfig(num_samples="all").fingerprint() == DataConfig().fingerprint()
    for bad in ("most", -2, 2.5):
        with pytest.raises(ValueError, match="data.num_samples"):
            DataConfig(num_samples=bad)


def cli(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "orthrus_train", "recipe=tiny", "stage=data",
                           f"run_dir={tmp_path / 'run'}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_num_samples_all_samples_per_prompt_and_too_many(tmp_path):
    r = cli(tmp_path, "data.num_samples=99999")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()
    assert any(line.startswith("error: data.num_samples=99999 is more than the") for line in last), r.stderr
    assert not (tmp_path / "run" / "data" / "regen").exists()

    r = cli(tmp_path, "data.num_samples=all", "data.samples_per_prompt=2", "data.max_new_tokens=16",
            "data.holdout_count=4")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "run" / "data" / "report.json").read_text())
    a, g = rep["accounting"], rep["regeneration"]
    assert a["not_selected"] == 0 and a["records_read"] == a["packed"] + a["holdout"] + a["rejected"] + \
        a["duplicates"] + a["dropped_overlong"]
    assert g["samples_per_prompt"] == 2 and g["responses"] == 2 * g["prompts"]
    assert "x 2 samples" in r.stdout
