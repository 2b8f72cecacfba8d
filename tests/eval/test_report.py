"""run_eval end to end on a tiny model: report files, metrics per benchmark and temperature, the multi-turn protocol,
training-overlap exclusion, the lossless section."""
import json

import pytest
import torch

from eval_testlib import word_tokenizer, write_prompt_files
from orthrus_train.eval.benchmarks import PromptRenderer, first_turn_key
from orthrus_train.eval.report import run_eval


def test_run_eval_writes_report(qwen3_model, tmp_path, capsys):
    tok = word_tokenizer()
    _, chat = write_prompt_files(tmp_path, n=5)
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    holdout = [f"w{i} w{i + 1} w{i + 2}" for i in range(6)]
    (run / "data" / "holdout.jsonl").write_text("".join(
        json.dumps({"uid": f"0:{i}", "messages": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": "w9"}]}) + "\n"
        for i, q in enumerate(holdout)))
    # the data stage's training prompts: one of them is also a holdout prompt (must be reported and excluded)
    train = {"messages": [{"role": "user", "content": holdout[2]}]}
    (run / "data" / "prompts.jsonl").write_text(json.dumps(train) + "\n")
    cfg = dict(benchmarks=["holdout", "chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
               num_prompts=5, max_new_tokens=16, temperatures=[0.0, 1.0], batch_size=3, verify_backend="torch",
               hf_generate_reference=True,
               lossless=dict(greedy_prompts=5, ks_min_tokens=1500, chi2_prefixes=1, chi2_samples=300,
                             chi2_min_conditional=60))
    rep = run_eval(qwen3_model, tok, cfg, run)
    out = run / "eval"
    for f in ("report.json", "report.md", "samples.jsonl", "accept_histogram.png", "per_position_acceptance.png",
              "tpf.png", "speed.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["benchmarks"].keys() == rep["benchmarks"].keys() == {"holdout", "chat"}
    assert set(on_disk["definitions"]) >= {"acceptance_length", "tpf"} and on_disk["settings"]["num_prompts"] == 5

    hold = on_disk["benchmarks"]["holdout"]
    assert hold["train_overlap"] == 1 and hold["excluded"] == 1 and hold["used"] == 5
    assert on_disk["train_prompts"]["hashes"] == 1
    for name, b in on_disk["benchmarks"].items():
        assert set(b["results"]) == {"T=0", "T=1"}
        for cell in b["results"].values():
            s, a = cell["spec"], cell["ar"]
            assert s["prompts"] == 5 and s["verify_passes"] == s["draft_passes"] > 0
            assert 1.0 <= s["acceptance_length"] <= 4.0 and s["tpf"] == s["emitted_tokens"] / (2 * s["verify_passes"])
            assert a["acceptance_length"] == a["tpf"] == 1.0 and a["draft_passes"] == 0
            assert cell["speedup"] > 0 and cell["hf_generate"]["tokens_per_s"] > 0
            assert cell["efficiency"] == cell["speedup"] / s["tpf"]  # issue 17's measure, in every cell
            assert len(s["per_position_acceptance"]) == 3 and abs(sum(s["accept_histogram"]) - 1) < 1e-9
            assert s["warnings"]  # fewer than 100 prompts
        assert b["results"]["T=0"]["hf_generate"]["greedy_first_turn_match_rate"] == 1.0

    # multi-turn: the 2nd turn is asked after the model's own 1st answer
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    chat_rows = [s for s in samples if s["benchmark"] == "chat" and s["method"] == "spec" and s["temperature"] == 1.0]
    assert len(chat_rows) == 5 and all(len(s["turns"]) == 2 for s in chat_rows)
    turns = [json.loads(ln)["turns"] for ln in chat.read_text().splitlines()]
    r = PromptRenderer(tok)
    for row, t in zip(chat_rows, turns):
        expect = r.encode(t, [r.decode(row["turns"][0]["tokens"])])
        assert row["turns"][1]["prompt_len"] == len(expect)

    ll = on_disk["lossless"]
    assert ll["passed"] and ll["greedy"]["match_rate"] == 1.0 and ll["greedy"]["prompts"] == 5
    assert ll["exact_sampler"]["passed"] and ll["exact_sampler"]["tokens"] >= 1500
    assert ll["components"] == {"exact_sampler": True, "greedy_float32": True, "ks_float32": True,
                                "chi_square_float32": True, "low_precision_divergences_explained": None}
    assert on_disk["sampling"]["source"].startswith("plain") and on_disk["sampling"]["top_k"] == 0
    assert ll["ks"]["tokens"] >= 1500 and ll["ks"]["passed"]
    assert ll["chi_square"]["passed"] and ll["chi_square"]["testable"] >= 1

    md = (out / "report.md").read_text()
    assert "| benchmark | temp | prompts | acceptance length ± SE | TPF |" in md and "Lossless checks: **PASS**" in md
    eff = on_disk["benchmarks"]["chat"]["results"]["T=0"]["efficiency"]
    assert "| speedup | efficiency |" in md and f" | {eff:.2f} | " in md and "- **efficiency**: speedup / TPF" in md
    for b in ("holdout", "chat"):  # the error bar over the prompts, in the json and beside each acceptance length
        se = on_disk["benchmarks"][b]["results"]["T=0"]["spec"]["acceptance_length_se"]
        al = on_disk["benchmarks"][b]["results"]["T=0"]["spec"]["acceptance_length"]
        assert se >= 0 and f"| {b} | T=0 | 5 | {al:.2f} ± {se:.2f} |" in md
    # every cell here decodes for well under 10 s: its speedup is flagged, naming the cells, in the json and the md
    short = [w for w in on_disk["warnings"] if w.startswith("wall-clock speedups timed over less than 10 s")]
    assert len(short) == 1 and all(f"{b} {t} " in short[0] for b in ("holdout", "chat") for t in ("T=0", "T=1"))
    assert "decode_tokens_per_s" in short[0] and short[0] in md
    assert "tiny model" in md and "![speed.png](speed.png)" in md
    printed = capsys.readouterr().out
    assert "acc.len" in printed and "holdout" in printed and "only show that the machinery works" in printed
    assert first_turn_key(holdout[2]) not in {first_turn_key(t[0]) for t in turns}


def test_hf_reference_is_capped_and_its_failure_keeps_engine_results(qwen3_model, tmp_path, monkeypatch):
    """The transformers reference runs after every engine number is on disk, on at most hf_generate_prompts
    prompts; if it fails the report records why and keeps every engine result."""
    import orthrus_train.eval.report as report_mod

    tok = word_tokenizer()
    _, chat = write_prompt_files(tmp_path, n=5)
    base = dict(benchmarks=["chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
                num_prompts=5, max_new_tokens=8, temperatures=[0.0], batch_size=2, verify_backend="torch",
                hf_generate_reference=True, hf_generate_prompts=2, plots=False,
                lossless=dict(enabled=False))
    calls = []
    real = report_mod.hf_generate

    def counting(backbone, ids, *a, **k):
        calls.append(len(ids))
        return real(backbone, ids, *a, **k)
    monkeypatch.setattr(report_mod, "hf_generate", counting)
    rep = run_eval(qwen3_model, tok, base, tmp_path / "ok")
    hf = rep["benchmarks"]["chat"]["results"]["T=0"]["hf_generate"]
    assert hf["prompts"] == 2 and hf["tokens_per_s"] > 0
    assert sum(calls) == 2 + 2 * 2  # warm-up (one full batch: 2 prompts) + 2 prompts x 2 turns

    seen_on_disk = {}

    def broken(backbone, ids, *a, **k):
        # the engine results were written before the reference started
        seen_on_disk.update(json.loads((tmp_path / "bad" / "eval" / "report.json").read_text()))
        raise RuntimeError("compiled graph exploded")
    monkeypatch.setattr(report_mod, "hf_generate", broken)
    rep = run_eval(qwen3_model, tok, base, tmp_path / "bad")
    cell = rep["benchmarks"]["chat"]["results"]["T=0"]
    assert "compiled graph exploded" in cell["hf_generate"]["error"] and cell["spec"]["emitted_tokens"] > 0
    assert any("reference failed" in w for w in rep["warnings"])
    assert seen_on_disk["status"] == "transformers generate reference pending"
    assert seen_on_disk["benchmarks"]["chat"]["results"]["T=0"]["spec"]["emitted_tokens"] > 0
    final = json.loads((tmp_path / "bad" / "eval" / "report.json").read_text())
    assert "status" not in final and "error" in final["benchmarks"]["chat"]["results"]["T=0"]["hf_generate"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_eval_on_gpu_mask_embedding_graphs_and_hf_reference(tmp_path):
    """The real-model eval's configuration at tiny scale: a Llama backbone with no spare embedding row (the
    separate mask embedding), K=16, bf16, batch 16 with CUDA graphs, two temperatures, the transformers
    reference and the lossless checks, in one process (the first SmolLM2 eval crashed in this setting)."""
    from orthrus_train.model import OrthrusModel, build_random, tiny_config

    tok = word_tokenizer()
    _, chat = write_prompt_files(tmp_path, n=20)
    bb = build_random(tiny_config("llama", vocab_size=128, hidden_size=64), seed=0)
    m = OrthrusModel(bb, block_size=16, vocab_len=128).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    assert m.mask_embedding is not None
    cfg = dict(benchmarks=["chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
               num_prompts=20, max_new_tokens=32, temperatures=[0.0, 1.0], batch_size=16,
               hf_generate_reference=True, hf_generate_prompts=16,
               lossless=dict(greedy_prompts=20, ks_min_tokens=3000, chi2_prefixes=1, chi2_samples=400,
                             chi2_min_conditional=60))
    rep = run_eval(m, tok, cfg, tmp_path / "run")
    for tk in ("T=0", "T=1"):
        cell = rep["benchmarks"]["chat"]["results"][tk]
        assert cell["cuda_graphs"] is True and "cuda_graph_error" not in cell
        assert cell["spec"]["emitted_tokens"] > 0 and cell["ar"]["acceptance_length"] == 1.0
        assert cell["hf_generate"]["tokens_per_s"] > 0, cell["hf_generate"]
    ll = rep["lossless"]
    assert ll["ks"]["tokens"] >= 3000 and ll["ks"]["passed"] and ll["chi_square"]["passed"]
    g = ll["greedy"]
    assert g["prompts"] == 20 and g["match_rate"] > 0.5 and g["passed"], g


def test_low_precision_model_gets_the_strict_float32_greedy_check(qwen3_model, tmp_path):
    """A bf16 model: the exact sampler test runs on the bf16 model itself; its greedy divergences are weighed
    against its measured noise floor; greedy exactness, KS and chi-square run on a float32 copy and count in the
    verdict; the bf16 model itself is left untouched."""
    import copy

    tok = word_tokenizer()
    single, _ = write_prompt_files(tmp_path, n=4)
    m = copy.deepcopy(qwen3_model).to(torch.bfloat16)
    cfg = dict(benchmarks=["math"], benchmark_paths={"math": str(single)}, benchmark_fields={"math": "question"},
               num_prompts=4, max_new_tokens=12, temperatures=[0.0, 1.0], batch_size=2, verify_backend="torch",
               plots=False, lossless=dict(greedy_prompts=4, ks_min_tokens=200, chi2_prefixes=1, chi2_samples=200,
                                          chi2_min_conditional=50))
    rep = run_eval(m, tok, cfg, tmp_path / "run")
    ll = rep["lossless"]
    nf = ll["noise_floor"]
    assert nf["dtype"] == "bfloat16" and nf["floor"] >= 0 and nf["positions"] > 0  # CPU bf16: often exactly 0
    assert ll["greedy"]["dtype"] == "bfloat16" and ll["greedy"]["tolerance"] == pytest.approx(2 * nf["floor"])
    assert ll["exact_sampler"]["dtype"] == "bfloat16" and ll["exact_sampler"]["passed"]
    g32 = ll["greedy_float32"]
    assert g32["dtype"] == "float32" and g32["prompts"] == 4 and g32["match_rate"] == 1.0 and g32["passed"]
    assert g32["tolerance"] < 1e-3
    assert ll["ks"]["dtype"] == ll["chi_square"]["dtype"] == "float32" and ll["ks"]["counts_in_verdict"]
    assert set(ll["components"]) == {"exact_sampler", "greedy_float32", "ks_float32", "chi_square_float32",
                                     "low_precision_divergences_explained"}
    assert all(v is True for v in ll["components"].values()) and ll["passed"]
    assert next(m.parameters()).dtype == torch.bfloat16
    md = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "(a') greedy exactness, float32 copy (math, float32) | pass" in md
    assert "| (0) sampler vs the verify pass's own distributions (model dtype) | pass |" in md
    assert "noise floor, bfloat16" in md and "(b) KS test of the randomized PIT, float32 | pass" in md
    # no float32 copy: the end-to-end tests run in bf16, reported but not counted
    cfg["lossless"]["greedy_float32"] = False
    ll = run_eval(m, tok, cfg, tmp_path / "run2")["lossless"]
    assert ll["greedy_float32"]["passed"] is None and "greedy_float32=false" in ll["greedy_float32"]["skipped"]
    assert ll["ks"]["dtype"] == "bfloat16" and not ll["ks"]["counts_in_verdict"]
    assert ll["components"]["ks_float32"] is None and ll["components"]["exact_sampler"] is True


def test_a_divergence_beyond_the_noise_floor_fails_the_verdict(qwen3_model, tmp_path, monkeypatch):
    """A greedy divergence whose top-2 gap is above factor x floor is a bug (verdict FAIL), one within it is
    explained (PASS): the tolerance is the measured floor, not a fixed number."""
    import orthrus_train.eval.report as report_mod

    tok = word_tokenizer()
    single, _ = write_prompt_files(tmp_path, n=3)
    real_pair = report_mod._greedy_pair

    def diverging(engines, ids, max_new, eos):  # the drafted output differs at token 2 of prompt 0
        spec, ar = real_pair(engines, ids, max_new, eos)
        spec[0] = spec[0][:2] + [(spec[0][2] + 1) % 100] + spec[0][3:]
        return spec, ar
    monkeypatch.setattr(report_mod, "_greedy_pair", diverging)
    cfg = dict(benchmarks=["math"], benchmark_paths={"math": str(single)}, benchmark_fields={"math": "question"},
               num_prompts=3, max_new_tokens=8, temperatures=[1.0], batch_size=3, verify_backend="torch",
               plots=False, lossless=dict(greedy_prompts=3, ks_min_tokens=100, chi2_prefixes=0))
    ll = run_eval(qwen3_model, tok, cfg, tmp_path / "a")["lossless"]
    (d,) = ll["greedy"]["divergences"]
    assert d["top2_gap"] > ll["greedy"]["tolerance"] and not d["near_tie"]
    assert ll["components"]["greedy_float32"] is False and not ll["passed"]
    cfg["lossless"]["noise_floor_factor"] = 2 * d["top2_gap"] / max(ll["noise_floor"]["floor"], 1e-30)
    ll = run_eval(qwen3_model, tok, cfg, tmp_path / "b")["lossless"]
    assert ll["greedy"]["divergences"][0]["near_tie"] and ll["passed"]


def _gc_model(qwen3_model, **gen):
    import copy

    from transformers import GenerationConfig

    m = copy.deepcopy(qwen3_model)
    m.backbone.generation_config = GenerationConfig(**gen)
    return m


def test_sampling_follows_the_generation_config_and_is_reported(qwen3_model, tmp_path):
    """By default the sampled cells use the backbone's generation_config (temperature, top-k, top-p, min-p), as
    the model is served; the report states it; eval.top_k overrides it (top_k 1 makes sampling greedy, which
    proves the filter reaches the engine); eval.sampling=plain samples at T=1 unfiltered."""
    tok = word_tokenizer()
    single, _ = write_prompt_files(tmp_path, n=3)
    m = _gc_model(qwen3_model, do_sample=True, temperature=0.6, top_k=20, top_p=0.95, min_p=0.01)
    base = dict(benchmarks=["math"], benchmark_paths={"math": str(single)}, benchmark_fields={"math": "question"},
                num_prompts=3, max_new_tokens=10, batch_size=3, verify_backend="torch", plots=False,
                lossless=dict(greedy_prompts=3, ks_min_tokens=200, chi2_prefixes=0, greedy_float32=False))
    rep = run_eval(m, tok, base, tmp_path / "gc")
    s = rep["sampling"]
    assert (s["temperature"], s["top_k"], s["top_p"], s["min_p"]) == (0.6, 20, 0.95, 0.01)
    assert s["source"] == "generation_config" and s["temperatures"] == [0.0, 0.6]
    assert set(rep["benchmarks"]["math"]["results"]) == {"T=0", "T=0.6"}
    assert rep["lossless"]["sampling"] == {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.01}
    assert rep["lossless"]["exact_sampler"]["passed"]
    md = (tmp_path / "gc" / "eval" / "report.md").read_text()
    assert "Sampling (T > 0): top-k 20, top-p 0.95, min-p 0.01 (generation_config)." in md

    rep = run_eval(m, tok, {**base, "top_k": 1, "lossless": dict(enabled=False)}, tmp_path / "k1")
    assert rep["sampling"]["top_k"] == 1 and rep["sampling"]["source"] == "generation_config + eval overrides"
    rows = [json.loads(ln) for ln in (tmp_path / "k1" / "eval" / "samples.jsonl").read_text().splitlines()]
    by_t = {t: [r["turns"][0]["tokens"] for r in rows if r["temperature"] == t and r["method"] == "spec"]
            for t in (0.0, 0.6)}
    assert by_t[0.6] == by_t[0.0]

    rep = run_eval(m, tok, {**base, "sampling": "plain", "lossless": dict(enabled=False)}, tmp_path / "plain")
    s = rep["sampling"]
    assert (s["temperature"], s["top_k"], s["top_p"], s["min_p"], s["source"]) == (1.0, 0, 1.0, 0.0, "plain")
    with pytest.raises(ValueError, match="eval.sampling: 'served' is not one of generation_config, plain"):
        run_eval(m, tok, {**base, "sampling": "served"}, tmp_path / "bad")


def test_draft_temperature_reaches_the_engine_and_the_report(qwen3_model, tmp_path, monkeypatch):
    """eval.draft_temperature=0: the sampled cells propose argmax drafts (the acceptance rule is told so), the
    lossless checks test that proposal and pass, and report.json / report.md say so; a negative value is a
    one-line config error."""
    from orthrus_train.decode import verify

    tok = word_tokenizer()
    single, _ = write_prompt_files(tmp_path, n=3)
    seen = []
    real = verify.verify

    def spy(*a, **kw):
        if kw.get("temperature", 0) > 0 and a[0].shape[1] > 0:  # drafted verify passes at T > 0
            seen.append(kw.get("draft_is_greedy", False))
        return real(*a, **kw)
    monkeypatch.setattr(verify, "verify", spy)
    base = dict(benchmarks=["math"], benchmark_paths={"math": str(single)}, benchmark_fields={"math": "question"},
                num_prompts=3, max_new_tokens=10, temperatures=[0.0, 0.8], batch_size=3, verify_backend="torch",
                plots=False, lossless=dict(greedy_prompts=3, ks_min_tokens=300, chi2_prefixes=0,
                                           greedy_float32=False), draft_temperature=0.0)
    rep = run_eval(qwen3_model, tok, base, tmp_path / "argmax")
    assert seen and all(seen)
    assert rep["sampling"]["draft_temperature"] == 0.0
    assert rep["lossless"]["sampling"]["draft_temperature"] == 0.0 and rep["lossless"]["exact_sampler"]["passed"]
    md = (tmp_path / "argmax" / "eval" / "report.md").read_text()
    assert "argmax drafts" in md and "drafts proposed at T=0" in md
    seen.clear()
    rep = run_eval(qwen3_model, tok, {**base, "draft_temperature": None, "lossless": dict(enabled=False)},
                   tmp_path / "same")
    assert seen and not any(seen) and rep["sampling"]["draft_temperature"] is None
    with pytest.raises(ValueError, match="eval.draft_temperature: must be >= 0"):
        run_eval(qwen3_model, tok, {**base, "draft_temperature": -1.0}, tmp_path / "bad")


def test_progress_bar_on_stderr_only_when_asked_or_a_tty(qwen3_model, tmp_path, capsys, monkeypatch):
    tok = word_tokenizer()
    single, _ = write_prompt_files(tmp_path, n=3)
    cfg = dict(benchmarks=["math"], benchmark_paths={"math": str(single)}, benchmark_fields={"math": "question"},
               num_prompts=3, max_new_tokens=6, temperatures=[0.0], batch_size=2, verify_backend="torch",
               plots=False, lossless=dict(enabled=False))
    monkeypatch.delenv("ORTHRUS_PROGRESS", raising=False)
    run_eval(qwen3_model, tok, cfg, tmp_path / "quiet")  # stderr is not a TTY under pytest: no bar
    assert "tok/s" not in capsys.readouterr().err
    monkeypatch.setenv("ORTHRUS_PROGRESS", "1")
    run_eval(qwen3_model, tok, cfg, tmp_path / "shown")
    err = capsys.readouterr().err
    assert "eval math T=0" in err and "6/6" in err and "ar" in err and "tok/s" in err
    monkeypatch.setenv("ORTHRUS_PROGRESS", "0")
    run_eval(qwen3_model, tok, cfg, tmp_path / "off")
    assert "tok/s" not in capsys.readouterr().err


def test_compile_steps_policy_reaches_the_engine_and_the_report(qwen3_model, tmp_path, monkeypatch,
                                                                record_engine_flag):
    """eval.compile_steps: auto does not compile on the CPU and says why; true hands compile_steps=True to
    every engine of the benchmark runs; the report and report.md say what was used and the warm-up time."""
    import orthrus_train.eval.report as report_mod

    tok = word_tokenizer()
    _, chat = write_prompt_files(tmp_path, n=3)
    base = dict(benchmarks=["chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
                num_prompts=3, max_new_tokens=6, temperatures=[0.0], batch_size=2, verify_backend="torch",
                plots=False, lossless=dict(enabled=False))
    seen = record_engine_flag(report_mod, "DecodeEngine", "compile_steps")
    rep = run_eval(qwen3_model, tok, base, tmp_path / "auto")
    c = rep["compile"]
    assert c["setting"] == "auto" and c["used"] is False and "not on a CUDA device" in c["reason"]
    assert c["estimated_steps"] == 9 + 18  # 6 prompt-turns in batches of 2: 3 x 6 AR steps, half that drafted
    assert seen and not any(seen) and c["setup_s"] > 0
    assert "Compiled steps: no (auto: not on a CUDA device" in (tmp_path / "auto" / "eval" / "report.md").read_text()
    env = rep["environment"]  # the decode kernels the speeds were measured with
    assert (env["decode_attention"], env["decode_norm"], env["decode_rope"], env["decode_kv_write"],
            env["decode_mlp"]) == ("auto", "torch", "torch", "torch", "torch")
    seen.clear()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    from orthrus_train.model import layers
    monkeypatch.setattr(layers._ATTN_SWITCH, "value", "sdpa")  # as ORTHRUS_DECODE_ATTN=sdpa would
    rep = run_eval(qwen3_model, tok, {**base, "compile_steps": True}, tmp_path / "forced")
    assert rep["environment"]["decode_attention"] == "sdpa"
    assert rep["compile"]["used"] is True and rep["compile"]["reason"] == "compile_steps=true"
    assert seen and all(seen)
    assert rep["compile"]["cache_dir"] == str(tmp_path / "forced" / "cache" / "torchinductor")
    assert (tmp_path / "forced" / "cache" / "torchinductor").is_dir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


def test_compile_policy_decides_by_estimated_decode_steps():
    from orthrus_train.decode import compile_policy as cp

    assert cp.decide("auto", True, 60_000, 50_000)["used"] is True
    d = cp.decide("auto", True, 10_000, 50_000)
    assert d["used"] is False and "would not pay" in d["reason"]
    assert cp.decide("auto", False, 10 ** 9)["used"] is False
    assert cp.decide(True, False, 0)["used"] is True and cp.decide("off", True, 10 ** 9)["used"] is False
    with pytest.raises(ValueError, match="auto, true or false"):
        cp.normalize("sometimes")
    # 2 benchmarks of 10 and 3 prompt-turns, 2 temperatures, batch 4, 100 new tokens, drafted + AR
    assert cp.eval_steps([10, 3], 2, 4, 100, 8, True) == 2 * (150 + 300) + 2 * (50 + 100)
    assert cp.eval_steps([10], 1, 4, 100, None, False) == 300


def test_continuous_batching_key_reaches_the_engine_and_keeps_every_record(qwen3_model, tmp_path, monkeypatch):
    """eval.continuous_batching: true decodes each benchmark's turn through the engine's refilling loop, false
    in fixed batches; the per-prompt records (tokens, passes, acceptances) are the same, the report says which
    batching ran, how many engine steps each method took and how many refills the continuous batch made."""
    import orthrus_train.eval.report as report_mod

    tok = word_tokenizer()
    _, chat = write_prompt_files(tmp_path, n=5)
    base = dict(benchmarks=["chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
                num_prompts=5, max_new_tokens=10, temperatures=[0.0, 1.0], batch_size=2, verify_backend="torch",
                plots=False, lossless=dict(enabled=False))
    calls = []
    real = report_mod.DecodeEngine.generate_many

    def spy(self, *a, **k):
        calls.append(len(a[0]))
        return real(self, *a, **k)
    monkeypatch.setattr(report_mod.DecodeEngine, "generate_many", spy)
    reps, samples = {}, {}
    for on in (True, False):
        d = tmp_path / f"cb-{on}"
        reps[on] = run_eval(qwen3_model, tok, {**base, "continuous_batching": on}, d)
        samples[on] = [json.loads(line) for line in (d / "eval" / "samples.jsonl").read_text().splitlines()]
        md = (d / "eval" / "report.md").read_text()
        assert ("batching: continuous" in md) == on and ("batching: fixed" in md) != on
        if on:
            assert calls and max(calls) == 5, "all five prompts of a turn go to one refilling call"
            calls.clear()
        else:
            assert not calls, "fixed batches must not use the refilling loop"
    assert samples[True] == samples[False]
    for on in (True, False):
        for T in ("T=0", "T=1"):
            cell = reps[on]["benchmarks"]["chat"]["results"][T]
            assert cell["spec"]["engine_steps"] > 0 and cell["ar"]["engine_steps"] > 0
            # refills: prefill passes after each call's first fill (5 prompts in rows of 2: at least 2; fixed: 0)
            for mode in ("spec", "ar"):
                assert cell[mode]["refills"] >= 2 if on else cell[mode]["refills"] == 0, (on, T, cell[mode])
    assert reps[True]["settings"]["continuous_batching"] is True
    # eval.prefill_ahead_tokens: staged prompts (the default) run fewer prefill passes than fills; 0 one per fill;
    # fixed batches one per batch. The records stay the same.
    for on in (True, False):
        for T in ("T=0", "T=1"):
            for mode in ("spec", "ar"):
                c = reps[on]["benchmarks"]["chat"]["results"][T][mode]
                # two turns of 5 prompts: one staging pass per turn; fixed: 3 batches of 2 per turn
                assert c["prefill_passes"] == (2 if on else 6), (on, T, mode, c)
                assert c["prefill_graph_replays"] == 0  # (the CPU: no CUDA graphs, every pass eager)
    rep0 = run_eval(qwen3_model, tok, {**base, "prefill_ahead_tokens": 0}, tmp_path / "ahead0")
    for T in ("T=0", "T=1"):
        for mode in ("spec", "ar"):
            c = rep0["benchmarks"]["chat"]["results"][T][mode]
            assert c["prefill_passes"] == c["refills"] + 2 >= 4, c  # one pass per fill, two calls (turns)
    assert ([json.loads(x) for x in (tmp_path / "ahead0" / "eval" / "samples.jsonl").read_text().splitlines()]
            == samples[True])
    with pytest.raises(ValueError, match="eval.prefill_ahead_tokens: must be >= 0"):
        run_eval(qwen3_model, tok, {**base, "prefill_ahead_tokens": -1}, tmp_path / "bad")
    # eval.prefill_graphs reaches the eval's engine (it replays prefill passes only under CUDA graphs: none here)
    import orthrus_train.eval.report as report_mod
    seen = []

    class Recording(report_mod.DecodeEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self.prefill_graphs)
    monkeypatch.setattr(report_mod, "DecodeEngine", Recording)
    run_eval(qwen3_model, tok, {**base, "prefill_graphs": False}, tmp_path / "nographs")
    run_eval(qwen3_model, tok, base, tmp_path / "graphs")
    assert seen and seen[0] is False and seen[-1] is True


def test_speedups_timed_long_enough_get_no_timing_warning(qwen3_model, tmp_path, monkeypatch):
    """The short-timing warning follows metrics.MIN_TIMED_SECONDS: with the bar at 0 s no cell is short."""
    import orthrus_train.eval.metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "MIN_TIMED_SECONDS", 0.0)
    _, chat = write_prompt_files(tmp_path, n=3)
    cfg = dict(benchmarks=["chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
               num_prompts=3, max_new_tokens=6, temperatures=[0.0], batch_size=2, verify_backend="torch",
               plots=False, lossless=dict(enabled=False))
    rep = run_eval(qwen3_model, word_tokenizer(), cfg, tmp_path / "run")
    assert rep["benchmarks"]["chat"]["results"]["T=0"]["speedup"] > 0
    assert not [w for w in rep["warnings"] if "wall-clock speedups timed" in w], rep["warnings"]


def test_a_failed_compilation_is_reported_and_decoding_goes_on(qwen3_model, tmp_path, monkeypatch):
    """eval.compile_steps=true where torch.compile fails: the eval finishes with the eager steps (the same
    acceptance as an uncompiled eval) and report.json / report.md say that compilation failed."""
    import orthrus_train.decode.engine as engine_mod

    tok = word_tokenizer()
    _, chat = write_prompt_files(tmp_path, n=3)
    base = dict(benchmarks=["chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
                num_prompts=3, max_new_tokens=6, temperatures=[0.0], batch_size=2, verify_backend="torch",
                plots=False, lossless=dict(enabled=False))
    plain = run_eval(qwen3_model, tok, base, tmp_path / "plain")

    class Failure(RuntimeError):
        pass
    Failure.__module__ = "torch._dynamo.exc"  # as BackendCompilerFailed

    def compile_(fn, **kw):
        def compiled(*a):
            raise Failure("backend='inductor' raised: boom")
        return compiled
    monkeypatch.setattr(engine_mod.torch, "compile", compile_)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        rep = run_eval(qwen3_model, tok, {**base, "compile_steps": True}, tmp_path / "forced")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert rep["compile"]["used"] is True and rep["compile"]["error"] == "Failure: backend='inductor' raised: boom"
    got, want = rep["benchmarks"]["chat"]["results"]["T=0"], plain["benchmarks"]["chat"]["results"]["T=0"]
    assert got["spec"]["acceptance_length"] == want["spec"]["acceptance_length"] > 1.0
    assert got["spec"]["emitted_tokens"] == want["spec"]["emitted_tokens"]
    assert "compilation failed, those steps ran uncompiled: Failure" in (tmp_path / "forced" / "eval" /
                                                                       "report.md").read_text()


def test_no_engine_is_built_and_no_first_fill_shape_is_new_inside_a_timed_run(qwen3_model, tmp_path, monkeypatch):
    """The warm-up builds the engine that each timed run's first call uses (sized for the longest first turn at
    the full max_new_tokens; a one-prompt, 8-token warm-up used to size a smaller one, so the timed run built its
    own) and runs its full first batch once, so one-time costs (cache allocation, graph capture, first kernel
    compilations) stay out of the clock. Single-turn prompts: one engine call per timed run."""
    import orthrus_train.eval.report as report_mod

    tok = word_tokenizer()
    single, _ = write_prompt_files(tmp_path, n=5)
    events = []
    real_engine, real_run = report_mod.DecodeEngine, report_mod._run_turns

    def building(*a, **k):
        events.append("build")
        return real_engine(*a, **k)

    def timed(*a, **k):
        events.append("timed")
        out = real_run(*a, **k)
        events.append("end")
        return out
    monkeypatch.setattr(report_mod, "DecodeEngine", building)
    monkeypatch.setattr(report_mod, "_run_turns", timed)
    # the longest prompt last: a warm-up on the first prompt alone would size a smaller engine
    lines = single.read_text().splitlines()
    lines[-1] = json.dumps({"question": " ".join(["w1"] * 40)})
    single.write_text("\n".join(lines) + "\n")
    cfg = dict(benchmarks=["math"], benchmark_paths={"math": str(single)}, benchmark_fields={"math": "question"},
               num_prompts=5, max_new_tokens=300, temperatures=[0.0], batch_size=2, verify_backend="torch",
               plots=False, lossless=dict(enabled=False))
    rep = run_eval(qwen3_model, tok, cfg, tmp_path / "run")
    timed_spans = [i for i, e in enumerate(events) if e == "timed"]
    assert len(timed_spans) == 2 and events.count("end") == 2  # spec and ar
    for i in timed_spans:
        assert events[i + 1] == "end", events  # nothing was built between "timed" and "end"
    assert events.count("build") >= 1 and events[0] == "build"
    assert rep["compile"]["setup_s"] > 0


def test_fused_argmax_key_reaches_the_engine(qwen3_model, tmp_path, monkeypatch):
    """eval.fused_argmax reaches the eval's engine (default off); on, the greedy cell decodes through the fused
    greedy LM head (the Triton interpreter on a CPU) with the same samples, and the cell says whether it ran; where
    it cannot run (TRITON_INTERPRET unset on a CPU) the cell records why and the samples are still the same."""
    import orthrus_train.eval.report as report_mod
    from orthrus_kernels._backend import interpreting

    tok = word_tokenizer()
    _, chat = write_prompt_files(tmp_path, n=3)
    base = dict(benchmarks=["chat"], benchmark_paths={"chat": str(chat)}, benchmark_fields={"chat": "turns"},
                num_prompts=3, max_new_tokens=8, temperatures=[0.0], batch_size=2, verify_backend="torch",
                plots=False, lossless=dict(enabled=False))
    seen = []

    class Recording(report_mod.DecodeEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self.fused_argmax)
    monkeypatch.setattr(report_mod, "DecodeEngine", Recording)

    def run(name, **kw):
        rep = run_eval(qwen3_model, tok, {**base, **kw}, tmp_path / name)
        rows = (tmp_path / name / "eval" / "samples.jsonl").read_text().splitlines()
        return rep["benchmarks"]["chat"]["results"]["T=0"], [json.loads(x)["turns"] for x in rows]

    cell, samples = run("off")
    assert seen == [False] and "fused_argmax" not in cell and "fused_argmax_error" not in cell
    if not interpreting():
        pytest.skip("the rest runs the kernel in the Triton interpreter (kernels built for it: a CPU test)")
    with pytest.warns(UserWarning, match="fused_argmax: .*TRITON_INTERPRET is not set now"):
        cell, fell_back = run("unset", fused_argmax=True)
    assert seen[-1] is True and cell["fused_argmax"] is False and "TRITON_INTERPRET" in cell["fused_argmax_error"]
    assert fell_back == samples
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cell, fused = run("on", fused_argmax=True)
    assert seen[-1] is True and cell["fused_argmax"] is True and "fused_argmax_error" not in cell
    assert fused == samples
