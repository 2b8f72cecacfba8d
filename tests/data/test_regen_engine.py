"""Regeneration on the project's decode engine: greedy equal to transformers, refill, sampling, shards, resume."""

import json

import pytest
import torch

from orthrus_train.data import ChatRenderer, HFGenerator, load_responses, regenerate
from orthrus_train.data.regen import EngineGenerator, generation_sampling
from orthrus_train.decode import verify
from orthrus_train.decode.engine import GenerationEngine, GenRequest, SamplingParams

from .conftest import tiny_backbone

QUESTIONS = ["hi", "what is two plus two?", "x", "tell me a story about a cat", "ok", "why is the sky blue",
             "name three colors", "a", "count to ten please", "b?"]


@pytest.fixture(scope="module")
def prompts(byte_tok):
    r = ChatRenderer(byte_tok)
    return [r.encode_prompt([{"role": "user", "content": q}]).input_ids for q in QUESTIONS]


@pytest.fixture(scope="module")
def llama(byte_tok):
    return tiny_backbone(byte_tok, family="llama")


@pytest.fixture(scope="module")
def shipped():
    """The tiny Qwen3-architecture backbone the package ships (the CPU demo's)."""
    from orthrus_train.config.loader import asset_path
    from orthrus_train.model.backbones import load_backbone

    return load_backbone(str(asset_path("tiny-qwen3")), dtype=torch.float32)


def hf_greedy(model, prompts, n, eos):
    """transformers' greedy, one prompt at a time (no padding), float32."""
    g = HFGenerator(model, eos, 0, static_cache=False)
    return [g.generate([p], n)[0] for p in prompts]


@pytest.mark.parametrize("which", ["llama", "shipped"])
def test_greedy_equals_transformers_token_for_token_with_refill(request, byte_tok, prompts, which):
    model = request.getfixturevalue(which)
    free = hf_greedy(model, prompts, 14, [byte_tok.eos_token_id])
    assert len({t for r in free for t in r}) > 3  # varied text, not one token repeated
    # an end-of-sequence id the model actually writes: rows end at different steps and are refilled
    def cut_lengths(t):
        return {r.index(t) + 1 if t in r else len(r) for r in free}
    stop = max(sorted({t for r in free for t in r}), key=lambda t: len(cut_lengths(t)))
    ref = hf_greedy(model, prompts, 14, [byte_tok.eos_token_id, stop])
    assert len({len(r) for r in ref}) > 2
    gen = EngineGenerator(model, [byte_tok.eos_token_id, stop], batch_size=3,
                          sync_every=2, width_step=16)  # 10 prompts through 3 rows: refills, several widths
    assert gen.generate(prompts, 14) == ref
    eng = gen.engine
    assert eng.B == 3  # 10 prompts through 3 rows: only refilled rows can have written them all
    assert len(eng._views) > 1  # the step attended over widths that follow the rows


def test_one_token_prompts_and_one_new_token(byte_tok, llama):
    gen = EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=2)
    ps = [[5], [7, 8], [9]]
    assert gen.generate(ps, 1) == [r[:1] for r in hf_greedy(llama, ps, 1, [byte_tok.eos_token_id])]
    assert gen.generate(ps, 6) == hf_greedy(llama, ps, 6, [byte_tok.eos_token_id])


def test_sampling_is_seeded_and_independent_of_batching(byte_tok, llama, prompts):
    sp = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4).generate(prompts, 10, seed=7, **sp)
    b = EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=3, sync_every=3).generate(prompts, 10, seed=7, **sp)
    assert a == b  # other batch, other refill pattern, same tokens
    assert a != EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4).generate(prompts, 10, seed=8, **sp)
    assert a != EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4).generate(prompts, 10)
    # top_k=1 sampling is greedy: the filter is applied
    greedy = EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4).generate(prompts, 10)
    assert EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4).generate(
        prompts, 10, seed=3, temperature=1.0, top_k=1) == greedy


def test_sampled_first_token_follows_the_filtered_distribution(byte_tok, llama, prompts):
    """Many one-token samples of one prompt against softmax(processed_logits(T, top_k, top_p))."""
    sp = SamplingParams(temperature=3.0, top_k=8, top_p=0.9)  # both filters cut here (8 -> 7 tokens)
    with torch.no_grad():
        logits = llama(torch.tensor([prompts[3]])).logits[0, -1]
    p = torch.softmax(verify.processed_logits(logits[None], sp.temperature, sp.top_k, sp.top_p), -1)[0]
    eng = GenerationEngine(llama, batch_size=64, max_len=64, sync_every=1)
    n = 3000
    reqs = [GenRequest(i, prompts[3], seed=i) for i in range(n)]
    counts = torch.zeros_like(p)
    for _, toks in eng.generate_stream(reqs, 1, [sp]):
        counts[toks[0]] += 1
    assert counts[p == 0].sum() == 0  # nothing outside top-k / top-p
    assert (p > 0).sum() == 7
    tv = 0.5 * (counts / n - p).abs().sum()
    assert tv < 0.04, (tv, p[p > 0], counts[p > 0] / n)


def test_generation_config_sampling(llama):
    saved = llama.generation_config
    try:
        llama.generation_config = type(saved)(temperature=0.6, top_k=20, top_p=0.95)
        assert generation_sampling(llama) == (0.6, 20, 0.95)
        llama.generation_config = type(saved)()
        t, k, p = generation_sampling(llama)
        assert t == 1.0 and p == 1.0
    finally:
        llama.generation_config = saved


def run(prompts, gen, out_dir, **kw):
    args = dict(max_new_tokens=8, temperature=1.0, seed=3, batch_size=3, shard_size=3, progress=False)
    args.update(kw)
    return regenerate(prompts, gen, out_dir, **args)


def test_streamed_shards_ranks_resume_and_hf_agreement(byte_tok, llama, prompts, tmp_path):
    eos = [byte_tok.eos_token_id]
    gen = EngineGenerator(llama, eos, batch_size=4)
    stats = run(prompts, gen, tmp_path / "one")
    assert stats.shards == 4 and stats.shards_done == 4 and stats.prompts == len(prompts)
    whole, totals = load_responses(tmp_path / "one", len(prompts), 3)
    assert totals["new_tokens"] == sum(map(len, whole)) == stats.new_tokens and totals["seconds"] > 0

    # two ranks write what one process writes; a lost shard is redone identically (seeds per prompt)
    run(prompts, EngineGenerator(llama, eos, batch_size=2), tmp_path / "two", rank=1, world_size=2)
    run(prompts, EngineGenerator(llama, eos, batch_size=5), tmp_path / "two", rank=0, world_size=2)
    assert load_responses(tmp_path / "two", len(prompts), 3)[0] == whole
    (tmp_path / "one" / "shard-00002.json").unlink()
    again = run(prompts, gen, tmp_path / "one")
    assert (again.shards_done, again.shards_skipped) == (1, 3)
    assert load_responses(tmp_path / "one", len(prompts), 3)[0] == whole

    # greedy: the engine's shards hold what transformers' generate writes
    run(prompts, gen, tmp_path / "greedy", temperature=0.0)
    run(prompts, HFGenerator(llama, eos, byte_tok.pad_token_id, static_cache=False), tmp_path / "hf", temperature=0.0)
    assert load_responses(tmp_path / "greedy", len(prompts), 3)[0] == load_responses(tmp_path / "hf", len(prompts), 3)[0]


def test_samples_per_prompt_rounds(byte_tok, llama, prompts, tmp_path):
    eos = [byte_tok.eos_token_id]
    gen = EngineGenerator(llama, eos, batch_size=4)
    stats = run(prompts, gen, tmp_path / "s", temperature=0.0, samples_per_prompt=3, sampling=(1.0, 0, 1.0))
    assert stats.shards == 12
    resp, _ = load_responses(tmp_path / "s", len(prompts), 3, samples_per_prompt=3)
    n = len(prompts)
    assert len(resp) == 3 * n
    assert resp[:n] == gen.generate(prompts, 8)  # round 0 is greedy
    assert resp[n:2 * n] != resp[:n] and resp[n:2 * n] != resp[2 * n:]  # rounds 1, 2 sampled, with other seeds
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["samples_per_prompt"] == 3 and meta["sampling"] == [1.0, 0, 1.0]
    # the transformers backend makes the same rounds (its own sampler: other samples, same greedy round)
    hf = HFGenerator(llama, eos, byte_tok.pad_token_id, static_cache=False)
    run(prompts, hf, tmp_path / "h", temperature=0.0, samples_per_prompt=2, sampling=(1.0, 1, 1.0))
    h, _ = load_responses(tmp_path / "h", len(prompts), 3, samples_per_prompt=2)
    assert h[:n] == resp[:n] and h[n:] == resp[:n]  # top_k=1 sampling is greedy on either backend


def test_bench_regen_cpu_smoke(tmp_path):
    """scripts/bench_regen.py end to end on the CPU (its numbers mean nothing here): the engine and transformers
    write the same greedy tokens in float32, and the last line is the JSON result."""
    import os
    import subprocess
    import sys

    from orthrus_train.config.loader import asset_path

    from .conftest import REPO

    r = subprocess.run([sys.executable, "scripts/bench_regen.py", "--model", str(asset_path("tiny-qwen3")),
                        "--prompts", str(asset_path("tiny_prompts.jsonl")), "--field", "prompt", "--n", "6",
                        "--batch-size", "4", "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu",
                        "--backends", "engine,hf-dynamic", "--warm", "--out", str(tmp_path / "b.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / "b.json").read_text())
    e, h = res["backends"]["engine"], res["backends"]["hf-dynamic"]
    assert res["n"] == 6 and e["new_tokens"] > 0 and e["tokens_per_s"] > 0 and e["engine_batch"] == 4
    assert h["identical_to_engine"] == 1.0 and e["warm"]["new_tokens"] == e["new_tokens"]
    assert "speedup_vs_hf-dynamic" in e


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_first_response_sampled_with_the_generation_config_filters(byte_tok, llama, prompts, tmp_path, backend):
    """data.temperature > 0 samples the first response at that temperature with the target's top-k / top-p:
    with top-k 1 that is greedy, without it the response is sampled."""
    eos = [byte_tok.eos_token_id]
    gen = EngineGenerator(llama, eos, batch_size=4) if backend == "engine" else \
        HFGenerator(llama, eos, byte_tok.pad_token_id, static_cache=False)
    greedy = EngineGenerator(llama, eos, batch_size=4).generate(prompts, 8)
    run(prompts, gen, tmp_path / "k1", temperature=2.0, sampling=(0.5, 1, 1.0))
    assert load_responses(tmp_path / "k1", len(prompts), 3)[0] == greedy
    run(prompts, gen, tmp_path / "all", temperature=2.0, sampling=(0.5, 0, 1.0))
    assert load_responses(tmp_path / "all", len(prompts), 3)[0] != greedy


def test_compile_policy_of_the_engine_backend(byte_tok, llama, prompts, monkeypatch, tmp_path, record_engine_flag):
    """data.compile_steps: auto decodes uncompiled on the CPU and says why; true builds the engine with a
    compiled step and points the inductor cache at the folder given (the stage gives RUN/cache/torchinductor)."""
    import orthrus_train.decode.engine as engine_mod

    gen = EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4)
    want = gen.generate(prompts, 6)
    assert gen.compile_info["used"] is False and "not on a CUDA device" in gen.compile_info["reason"]
    assert gen.compile_info["estimated_steps"] == 3 * 6  # 10 requests in rows of 4, 6 new tokens each
    built = record_engine_flag(engine_mod, "GenerationEngine", "compile_step")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    forced = EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4, compile_steps=True,
                             compile_cache=tmp_path / "cache" / "torchinductor")
    assert forced.generate(prompts, 6) == want
    assert built == [True] and forced.compile_info["reason"] == "compile_steps=true"
    assert forced.compile_info["cache_dir"] == str(tmp_path / "cache" / "torchinductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with pytest.raises(ValueError, match="auto, true or false"):
        EngineGenerator(llama, [byte_tok.eos_token_id], compile_steps="fast")


class _InductorFailure(RuntimeError):
    """Stands for torch._inductor.exc.InductorError (its constructor differs between torch versions)."""


_InductorFailure.__module__ = "torch._inductor.exc"


def _failing_compile(calls):
    def compile_(fn, **kw):
        def compiled(*a):
            calls.append(kw)
            raise _InductorFailure("TypeError: list indices must be integers or slices, not NoneType\nmore lines")
        return compiled
    return compile_


def test_a_failed_compilation_falls_back_to_the_eager_step(byte_tok, llama, prompts, monkeypatch):
    """torch 2.11's Inductor failed to generate code for the sampled step on an H200 (session 7) and ended the
    data stage: a compilation failure now runs the step uncompiled, with the same tokens, once warned, and the
    compile report says why; an error of the step itself still propagates."""
    import orthrus_train.decode.engine as engine_mod

    settings = dict(temperature=1.0, seed=3)
    want = EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4).generate(prompts, 6, **settings)
    calls = []
    monkeypatch.setattr(engine_mod.torch, "compile", _failing_compile(calls))
    gen = EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4, compile_steps=True)
    with pytest.warns(UserWarning, match="torch.compile failed .*_InductorFailure.*runs uncompiled"):
        assert gen.generate(prompts, 6, **settings) == want
    assert len(calls) == 1  # compiled once, then eager for good
    info = gen.compile_info
    assert info["used"] is True and info["error"] == ("_InductorFailure: TypeError: list indices must be integers "
                                                      "or slices, not NoneType")
    assert gen.generate(prompts, 6, **settings) == want and len(calls) == 1

    def broken(fn, **kw):  # an error raised by the step, not by the compiler
        def compiled(*a):
            raise ValueError("not a compile failure")
        return compiled
    monkeypatch.setattr(engine_mod.torch, "compile", broken)
    with pytest.raises(ValueError, match="not a compile failure"):
        EngineGenerator(llama, [byte_tok.eos_token_id], batch_size=4, compile_steps=True).generate(prompts, 6)
