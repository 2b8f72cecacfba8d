"""The server regeneration backend against an OpenAI-compatible stub on loopback serving the tiny backbone.

Every test starts its own stub (tests/data/openai_stub.py) on 127.0.0.1 with an ephemeral port; the stub
stops by itself after a few minutes even if a test dies. The reference everywhere is local greedy
regeneration (HFGenerator) of the same prompts with the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from orthrus_train.data import ChatRenderer, HFGenerator, load_responses, regenerate
from orthrus_train.data.config import DataConfig, ServerConfig
from orthrus_train.data.regen import Generator
from orthrus_train.data.server import ServerError, ServerGenerator

from .openai_stub import TINY, OpenAIStub

QUESTIONS = ["hi", "what is two plus two?", "x", "tell me a story about a cat", "ok", "why is the sky blue",
             "name three colors", "a"]
N = 10  # max_new_tokens
FAST = dict(backoff_s=0.01)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY))


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tok):
    r = ChatRenderer(tok)
    return [r.encode_prompt([{"role": "user", "content": q}]).input_ids for q in QUESTIONS]


@pytest.fixture(scope="module")
def stop_id(tok, model, prompts):
    """A token the tiny model writes early in some responses but not all: used as an extra end-of-turn id."""
    free = HFGenerator(model, [tok.eos_token_id], tok.pad_token_id).generate(prompts, N)
    counts = Counter(t for r in free for t in set(r[1:N - 2]))
    # absent from at least one whole response, so that one still runs to N tokens
    stop = next(t for t, c in counts.most_common() if any(t not in r for r in free))
    return stop


@pytest.fixture(scope="module")
def reference(tok, model, prompts, stop_id):
    out = HFGenerator(model, [tok.eos_token_id, stop_id], tok.pad_token_id).generate(prompts, N)
    assert any(r[-1] == stop_id and len(r) < N for r in out) and any(len(r) == N for r in out)
    return out


def stub(model, **kw) -> OpenAIStub:
    return OpenAIStub(model=model, lifetime_s=120, **kw)


def gen_for(srv, tok, stop_id, **kw) -> ServerGenerator:
    return ServerGenerator(srv.url, tok, [stop_id], **{**FAST, **kw})


# ------------------------------------------------------------------------------------- equal to local


def test_regenerate_through_server_equals_local_greedy(tmp_path, tok, model, prompts, stop_id, reference):
    with stub(model) as srv:
        gen = gen_for(srv, tok, stop_id, concurrency=4)
        assert isinstance(gen, Generator)
        stats = regenerate(prompts, gen, tmp_path / "regen", max_new_tokens=N, batch_size=4, shard_size=3,
                           rank=0, world_size=1, progress=False)
        responses, totals = load_responses(tmp_path / "regen", len(prompts), 3)
    assert responses == reference
    assert stats.shards_done == 3 and totals["new_tokens"] == sum(map(len, reference))
    # the prompts went as the locally rendered token ids, the tokenizer was checked through /tokenize
    assert gen.token_prompts and gen.tokenizer_check == "/tokenize"
    assert sorted(map(tuple, srv.prompts[1:])) == sorted(map(tuple, prompts))  # [0] is the probe
    assert all(b["temperature"] == 0.0 and stop_id in b["stop_token_ids"] for b in srv.bodies)
    assert all("logprobs" not in b for b in srv.bodies[1:])  # the reply carries token_ids: no logprobs asked


@pytest.mark.parametrize("features, check, warns", [
    (dict(token_ids_field=False), "/tokenize", None),  # ids from logprobs "token_id:N"
    (dict(token_ids_field=False, logprob_ids=False), "/tokenize", "tokenized again from their text"),
    (dict(token_prompts=False), "/tokenize", "refuses token-id prompts"),
    (dict(tokenize_endpoint=False), "prompt_token_ids", None),
    (dict(tokenize_endpoint=False, prompt_ids_field=False), "usage.prompt_tokens", "only by the prompt's token"),
    # llama-cpp-python's server: 500 to a token-id prompt, /extras/tokenize, text replies
    (dict(token_prompts=False, token_prompt_status=500, tokenize_style="llama-cpp-python", token_ids_field=False,
          logprob_ids=False), "/extras/tokenize", "refuses token-id prompts"),
    # llama.cpp's llama-server: /tokenize reads "content" (an empty list for vLLM's body)
    (dict(tokenize_style="llama-server"), "/tokenize", None),
], ids=["logprob-ids", "text-reply", "text-prompt", "no-tokenize", "count-only", "llama-cpp-python", "llama-server"])
def test_wire_fallbacks_give_the_same_responses(tok, model, prompts, stop_id, reference, features, check, warns):
    with stub(model, **features) as srv, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = gen_for(srv, tok, stop_id)
        out = gen.generate(prompts, N)
    assert out == reference  # the byte tokenizer re-encodes text losslessly, so even the text path matches
    assert gen.tokenizer_check == check
    assert gen.token_prompts == features.get("token_prompts", True)
    if not gen.token_prompts:
        assert all(isinstance(p, str) for p in srv.prompts) and all(b["add_special_tokens"] is False for b in srv.bodies)
    msgs = [str(w.message) for w in caught]
    assert any(warns in m for m in msgs) if warns else not any("server" in m or "127.0.0.1" in m for m in msgs)
    if features.get("token_prompt_status") == 500:  # a refusal, not an outage: one token-id attempt, no retries
        assert sum(isinstance(p, list) for p in srv.prompts) == 0
        assert srv.completion_attempts == srv.completions + 1


def test_sampling_sends_per_prompt_seeds(tok, model, prompts, stop_id):
    with stub(model) as srv:
        gen = gen_for(srv, tok, stop_id, concurrency=3)
        a = gen.generate(prompts, N, temperature=1.0, seed=5)
        b = gen.generate(prompts, N, temperature=1.0, seed=5)
        c = gen.generate(prompts, N, temperature=1.0, seed=6)
        seeds = [body.get("seed") for body in srv.bodies[1:]]
    assert a == b != c  # same seed, same responses whatever order the requests completed in
    assert len(set(seeds[:len(prompts)])) == len(prompts)


# ------------------------------------------------------------------------------- retries, timeouts


@pytest.mark.parametrize("status, retry_after", [(503, None), (429, "0"), (500, None)])
def test_transient_failures_are_retried(tok, model, prompts, stop_id, reference, status, retry_after):
    with stub(model, fail_first=3, fail_status=status, retry_after=retry_after) as srv:
        out = gen_for(srv, tok, stop_id, max_retries=3, concurrency=2).generate(prompts, N)
        assert srv.completion_attempts - srv.completions == 3
    assert out == reference


def test_gives_up_after_max_retries_with_one_line(tok, model, prompts, stop_id):
    with stub(model, fail_first=3) as srv:
        with pytest.raises(ServerError, match=r"failed 3 time\(s\), last: HTTP 503: stub: overloaded") as e:
            gen_for(srv, tok, stop_id, max_retries=2).generate(prompts, N)
        assert srv.completions == 0 and "\n" not in str(e.value)


def test_unreachable_server(tok, stop_id):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"/v1/models failed 3 time\(s\), last: .*refused.*is the server up"):
        ServerGenerator(f"http://127.0.0.1:{port}/v1/", tok, [stop_id], max_retries=2, **FAST).generate([[1, 2]], 4)
    assert time.monotonic() - t0 < 10


def test_client_errors_are_not_retried(tok, model, prompts, stop_id):
    with stub(model) as srv:
        gen = gen_for(srv, tok, stop_id, max_retries=5, concurrency=1)
        gen.connect()
        srv.max_model_len = 64
        with pytest.raises(ServerError, match=r"refused a \d+-token prompt with max_tokens=100: HTTP 400: This "
                                              r"model's maximum context length is 64.*max-model-len"):
            gen.generate(prompts[:1], 100)
        assert srv.completion_attempts == 2  # the probe and one refused request, never retried


def test_timeout_is_retried_then_reported(tok, model, prompts, stop_id, reference):
    with stub(model, slow_first=1) as srv:  # the first completion (the probe) takes SLOW_S = 3 s
        out = gen_for(srv, tok, stop_id, timeout_s=1.5, max_retries=1).generate(prompts, N)
    assert out == reference
    with stub(model, slow_first=1) as srv:
        with pytest.raises(ServerError, match=r"failed 1 time\(s\), last: .*timed out.*timeout_s=1.5"):
            gen_for(srv, tok, stop_id, timeout_s=1.5, max_retries=0).generate(prompts, N)


def test_concurrency_bounds_requests_in_flight(tok, model, prompts, stop_id):
    for concurrency in (1, 3):
        cfg = DataConfig.from_dict({"server": {"concurrency": concurrency}})
        with stub(model, delay_s=0.15) as srv:
            cfg.server.url = srv.url
            gen = ServerGenerator.from_config(cfg.server, tok, [stop_id])
            gen.generate(prompts, 4)
            assert srv.max_in_flight == concurrency


# -------------------------------------------------------------------------- model / tokenizer check


def test_wrong_model_is_refused_before_any_completion(tok, model, stop_id):
    with stub(model, served_name="someone/other-model") as srv:
        with pytest.raises(ServerError) as e:
            gen_for(srv, tok, stop_id, model="tiny-qwen3").generate([[1, 2, 3]], 4)
        assert srv.completion_attempts == 0
    msg = str(e.value)
    assert "serves ['someone/other-model'], not data.server.model='tiny-qwen3'" in msg and "\n" not in msg


def test_model_none_takes_the_only_served_model(tok, model, prompts, stop_id, reference):
    with stub(model, served_name="whatever-name") as srv:
        gen = gen_for(srv, tok, stop_id)
        assert gen.generate(prompts, N) == reference and gen.model == "whatever-name"


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory):
    """The tiny tokenizer with <|im_start|> and <|im_end|> swapped: same vocabulary size, other ids."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("other_tok")
    for f in TINY.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    tj = json.loads((d / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    a, b = ids["<|im_start|>"], ids["<|im_end|>"]
    for t in tj["added_tokens"]:
        t["id"] = {a: b, b: a}.get(t["id"], t["id"])
    tj["added_tokens"].sort(key=lambda t: t["id"])
    (d / "tokenizer.json").write_text(json.dumps(tj))
    other = AutoTokenizer.from_pretrained(str(d))
    assert other("<|im_start|>", add_special_tokens=False)["input_ids"] == [b]
    return other


@pytest.mark.parametrize("features, how", [({}, "its /tokenize of"),
                                            (dict(tokenize_endpoint=False), "a text completion of")])
def test_other_tokenizer_is_refused(tok, other_tok, model, stop_id, features, how):
    with stub(model, tokenizer=other_tok, **features) as srv:
        with pytest.raises(ServerError, match="the server's tokenizer differs from the local one") as e:
            gen_for(srv, tok, stop_id).generate([[1, 2, 3]], 4)
        assert srv.completions == (1 if features else 0)  # at most the 1-token probe
    assert how in str(e.value) and "first difference at token 0" in str(e.value)


# --------------------------------------------------------------------------------------- api key, config


def test_api_key_from_the_configured_environment_variable(tok, model, prompts, stop_id, reference, monkeypatch):
    cfg = DataConfig.from_dict({"server": {"api_key_env": "ORTHRUS_TEST_SERVER_KEY", "max_retries": 0}})
    with stub(model, api_key="sekret") as srv:
        cfg.server.url = srv.url
        monkeypatch.delenv("ORTHRUS_TEST_SERVER_KEY", raising=False)
        with pytest.raises(ServerError, match="api_key_env='ORTHRUS_TEST_SERVER_KEY': that environment variable"):
            ServerGenerator.from_config(cfg.server, tok, [stop_id])
        monkeypatch.setenv("ORTHRUS_TEST_SERVER_KEY", "wrong")
        with pytest.raises(ServerError, match="HTTP 401.*data.server.api_key_env"):
            ServerGenerator.from_config(cfg.server, tok, [stop_id]).generate(prompts, N)
        monkeypatch.setenv("ORTHRUS_TEST_SERVER_KEY", "sekret")
        assert ServerGenerator.from_config(cfg.server, tok, [stop_id]).generate(prompts, N) == reference


def test_config_keys_reach_the_generator(tok):
    cfg = DataConfig.from_dict({"server": {"url": "http://h:8000/v1/", "model": "m", "concurrency": 7,
                                           "timeout_s": 12.5, "max_retries": 2}})
    assert isinstance(cfg.server, ServerConfig)
    g = ServerGenerator.from_config(cfg.server, tok, model_path=str(TINY))
    assert (g.url, g.model, g.concurrency, g.timeout_s, g.max_retries, g.api_key) == \
        ("http://h:8000", "m", 7, 12.5, 2, None)
    assert tok.eos_token_id in g.eos_token_ids
    # the connection settings do not change what the data is: a finished run folder stays valid
    assert cfg.fingerprint() == DataConfig().fingerprint()


@pytest.mark.parametrize("server, match", [
    ({"concurrency": 0}, "data.server.concurrency: must be >= 1"),
    ({"timeout_s": 0}, "data.server.timeout_s: must be > 0"),
    ({"max_retries": -1}, "data.server.max_retries: must be >= 0"),
    ({"adress": "x"}, r"data.server: unknown key\(s\) \['adress'\]"),
])
def test_bad_server_config_is_refused(server, match):
    with pytest.raises(ValueError, match=match):
        DataConfig.from_dict({"server": server})


def test_url_is_required(tok):
    with pytest.raises(ServerError, match="data.server.url=http://host:8000"):
        ServerGenerator.from_config(ServerConfig(), tok)
    with pytest.raises(ServerError, match="must start with http://"):
        ServerGenerator.from_config(ServerConfig(url="host:8000"), tok)


# ------------------------------------------------------------------------------------------------ resume

_CHILD = """
import json, sys
from transformers import AutoTokenizer
from orthrus_train.data import regenerate
from orthrus_train.data.server import ServerGenerator
url, out, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = json.load(open(sys.argv[4]))
tok = AutoTokenizer.from_pretrained(sys.argv[5])
regenerate(prompts, ServerGenerator(url, tok, [stop], concurrency=1), out, max_new_tokens={N}, batch_size=2,
           shard_size=2, rank=0, world_size=1, progress=False)
"""


def test_killed_run_resumes_without_redoing_finished_shards(tmp_path, tok, model, prompts, stop_id, reference):
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "regen"
    with stub(model, delay_s=0.25) as srv:
        child = subprocess.Popen([sys.executable, "-c", _CHILD.format(N=N), srv.url, str(out), str(stop_id),
                                  str(tmp_path / "prompts.json"), str(TINY)], env=dict(os.environ),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while not (out / "shard-00000.json").exists():
                assert child.poll() is None, child.stdout.read()
                assert time.monotonic() < deadline, "the child wrote no shard in 120 s"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            if child.poll() is None:
                child.kill()
            child.stdout.close()
        while srv.in_flight:  # the request the child left behind finishes into a closed socket
            time.sleep(0.05)
        done = sorted(p.name for p in out.glob("shard-*.json"))
        assert 1 <= len(done) < 4, done  # killed mid-way
        before = srv.completions
        srv.delay_s = 0.0
        stats = regenerate(prompts, gen_for(srv, tok, stop_id), out, max_new_tokens=N, batch_size=2, shard_size=2,
                           rank=0, world_size=1, progress=False)
        resumed = srv.prompts[before + 1:]  # after this generator's probe
    assert stats.shards_skipped == len(done) and stats.shards_done == 4 - len(done)
    assert len(resumed) == len(prompts) - 2 * len(done)  # finished shards were not sent again
    assert load_responses(out, len(prompts), 2)[0] == reference


# ------------------------------------------------------------------------------------- the user's path


def test_data_stage_with_the_server_generator_equals_local(tmp_path, tok, model):
    """run_data_stage writes the same packed data whether the responses come from the server or locally."""
    from orthrus_train.data.stage import run_data_stage

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"q": q}) + "\n" for q in QUESTIONS * 2))
    cfg = {"sources": [{"path_or_id": str(src), "format": "prompt", "field": "q"}], "dedup": False,
           "max_new_tokens": N, "seq_len": 128, "batch_size": 4, "shard_size": 5, "progress": False}
    local = run_data_stage(cfg, tmp_path / "local", HFGenerator(model, [tok.eos_token_id], tok.pad_token_id),
                           tokenizer=tok, rank=0, world_size=1)
    with stub(model) as srv:
        cfg["server"] = {"url": srv.url, "model": "tiny-qwen3", "concurrency": 3}
        gen = ServerGenerator.from_config(DataConfig.from_dict(cfg).server, tok, model_path=str(TINY))
        served = run_data_stage(cfg, tmp_path / "served", gen, tokenizer=tok, rank=0, world_size=1)
        assert srv.completions == 1 + len(QUESTIONS) * 2
    n = len(QUESTIONS) * 2
    assert load_responses(tmp_path / "served/data/regen", n, 5)[0] == load_responses(tmp_path / "local/data/regen", n, 5)[0]
    for key in ("rows_written", "tokens", "supervised_tokens", "accounting"):
        assert served[key] == local[key]


def _has_backend_switch() -> bool:
    import dataclasses

    return "regen_backend" in {f.name for f in dataclasses.fields(DataConfig)}


@pytest.mark.skipif(not _has_backend_switch(), reason="data.regen_backend (engine|hf|server) is not merged yet")
def test_server_backend_needs_a_url():
    with pytest.raises(ValueError, match="data.server.url: data.regen_backend=server needs the server's address"):
        DataConfig.from_dict({"regen_backend": "server"})
    DataConfig.from_dict({"regen_backend": "server", "regenerate": False})  # nothing to regenerate: no server


@pytest.mark.slow
@pytest.mark.skipif(not _has_backend_switch(), reason="data.regen_backend (engine|hf|server) is not merged yet")
def test_cli_data_stage_through_a_server(tmp_path, model):
    from ..conftest import orthrus

    def responses(run):
        meta = json.loads((run / "data/regen/meta.json").read_text())
        return load_responses(run / "data/regen", meta["n_prompts"], meta["shard_size"])[0]

    common = ["recipe=tiny", "stage=data", "data.num_samples=16", "data.holdout_count=2", "data.max_new_tokens=16",
              "data.progress=false"]
    orthrus(*common, f"run_dir={tmp_path / 'hf'}", "data.regen_backend=hf")
    with stub(model) as srv:
        orthrus(*common, f"run_dir={tmp_path / 'srv'}", "data.regen_backend=server", f"data.server.url={srv.url}",
                "data.server.model=tiny-qwen3", "data.server.concurrency=4")
        assert srv.completions > 1
        bad = orthrus(*common, f"run_dir={tmp_path / 'bad'}", "data.regen_backend=server",
                      f"data.server.url={srv.url}", "data.server.model=my-qwen3", check=False)
    assert responses(tmp_path / "srv") == responses(tmp_path / "hf")
    regen = {r: json.loads((tmp_path / r / "data/report.json").read_text())["regeneration"] for r in ("srv", "hf")}
    assert regen["srv"]["prompts"] > 0 and regen["hf"]["generator"] == {"backend": "hf"}
    # the report says what generated the responses and how they travelled
    assert regen["srv"]["generator"] == {"backend": "server", "url": srv.url, "model": "tiny-qwen3",
                                         "tokenizer_check": "/tokenize", "prompts_as": "token ids",
                                         "responses_as": "token ids"}
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "serves ['tiny-qwen3'], not data.server.model='my-qwen3'" in errors[0]
    assert not list((tmp_path / "bad").glob("data/regen/shard-*.json"))
