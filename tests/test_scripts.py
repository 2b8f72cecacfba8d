"""CPU smoke runs of the GPU benchmark scripts: they must run end to end and write what they promise (their
numbers mean nothing on the CPU)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, env=None, timeout=600, prog=(sys.executable,), rc=0):
    r = subprocess.run([*prog, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == rc, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_profile_decode_step_smoke(tmp_path):
    out = tmp_path / "p.json"
    _run(["scripts/profile_decode_step.py", "--batch", "2", "--prompt-len", "6", "--steps", "1", "--attn", "auto",
          "math", "--profile", "--top", "3", "--refill", "2", "1", "--refill-lengths", "5", "9", "--refill-rows", "2",
          "--out", str(out)], tmp_path)
    rep = json.loads(out.read_text())
    assert [r["attn"] for r in rep["rows"]] == ["auto", "math"]
    for r in rep["rows"]:
        assert r["ar_ms_per_step"] > 0 and r["spec_ms_per_step"] > 0 and len(r["spec_top"]) == 3
        # a refill of 2 rows and one of 1: timed, and the eager prefill's ops profiled (hundreds on 30 layers)
        assert [x["refill_rows"] for x in r["refills"]] == [2, 1]
        for x in r["refills"]:
            assert x["refill_ms"] > 0 and x["refill_ops"] > 300 and len(x["refill_top"]) == 3
            assert x["staged_refill_ms"] > 0  # the same rows copied from prompts staged ahead
        # one refill per prompt length, each new length and then again
        assert [(x["prompt_len"], x["rows"]) for x in r["refill_lengths"]] == [(5, 2), (9, 2)]
        assert all(x["first_ms"] > 0 and x["again_ms"] > 0 for x in r["refill_lengths"])


def test_profile_decode_step_fused_argmax(tmp_path):
    """--fused-argmax off on --lm-head (the next GPU lease's comparison), on the CPU with the kernel in the Triton
    interpreter: each row says whether the fused greedy LM head ran; the LM head alone timed both ways at the step's
    token counts (B, B*(K-1), B*K), the same tokens."""
    pytest.importorskip("triton")
    out = tmp_path / "f.json"
    _run(["scripts/profile_decode_step.py", "--tiny", "--batch", "2", "--prompt-len", "6", "--steps", "1", "--attn",
          "sdpa", "--block-size", "4", "--fused-argmax", "off", "on", "--lm-head", "--out", str(out)], tmp_path,
         env={"TRITON_INTERPRET": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert [(r["fused_argmax"], r["fused_argmax_active"]) for r in rows] == [("off", False), ("on", True)]
    assert all("fused_argmax_error" not in r and r["spec_ms_per_step"] > 0 for r in rows)
    heads = rows[0]["lm_head"]
    assert [x["tokens"] for x in heads] == [2, 6, 8]
    assert all(x["same_ids"] and x["fused_us"] > 0 and x["unfused_us"] > 0 for x in heads)


def test_profile_decode_step_qk_norm_in_rope(tmp_path):
    """--qk-norm-in-rope off on (the next GPU lease's comparison) on a reduced Qwen3-8B (q/k norms) with the norm,
    RoPE and K/V write kernels in the Triton interpreter: each row says which ran, and the fused one launches one
    kernel fewer per layer and pass (2 layers: 2 in an AR step, 4 in a drafted one)."""
    pytest.importorskip("triton")
    out = tmp_path / "q.json"
    _run(["scripts/profile_decode_step.py", "--tiny", "--shape", "qwen3-8b", "--batch", "1", "--prompt-len", "6",
          "--steps", "1", "--attn", "sdpa", "--block-size", "4", "--norm", "triton", "--rope", "triton", "--kv-write",
          "triton", "--mlp", "torch", "--qk-norm-in-rope", "off", "on", "--count-ops", "--out", str(out)], tmp_path,
         env={"TRITON_INTERPRET": "1"})
    off, on = json.loads(out.read_text())["rows"]
    assert (off["qk_norm_in_rope"], on["qk_norm_in_rope"]) == ("off", "on")
    assert on["kv_write_resolved"] == "triton" and on["norm_resolved"] == "triton"
    assert (off["ar_ops"] - on["ar_ops"], off["spec_ops"] - on["spec_ops"]) == (2, 4)


def test_profile_decode_step_one_json_per_shape(tmp_path):
    """The next GPU session's command, on the CPU at reduced width: one JSON per shape, op counts, floor fields."""
    _run(["scripts/profile_decode_step.py", "--tiny", "--shape", "smollm2-135m", "qwen3-8b", "--batch", "1", "2",
          "--prompt-len", "6", "--steps", "1", "--attn", "auto", "--count-ops", "--out", str(tmp_path)], tmp_path)
    for shape in ("smollm2-135m", "qwen3-8b"):
        rep = json.loads((tmp_path / f"{shape}.json").read_text())
        assert rep["shape"] == shape and rep["weight_bytes_per_ar_step"] > 0 and "ar_floor_ms" in rep
        assert [r["batch"] for r in rep["rows"]] == [1, 2]
        for r in rep["rows"]:
            assert 0 < r["ar_ops"] < r["spec_ops"] and "ar_over_floor" in r and r["spec_over_ar"] > 0


def test_profile_decode_step_compares_the_fused_kernels(tmp_path):
    """--kv-write / --mlp: one row per setting, each recording what it asked for and what ran: here (a CPU, no
    interpreter) the RoPE resolves to torch, so the K/V write asked for as "triton" ran as "torch" (the RoPE setting
    wins), and the row says so. (The fused kernels' op counts: the next test.)"""
    out = tmp_path / "p.json"
    _run(["scripts/profile_decode_step.py", "--tiny", "--batch", "2", "--prompt-len", "6", "--steps", "1",
          "--block-size", "4", "--attn", "auto", "--kv-write", "torch", "triton", "--mlp", "torch", "--count-ops",
          "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kv_write"], r["kv_write_resolved"], r["mlp"], r["mlp_resolved"]) for r in rows] == [
        ("torch", "torch", "torch", "torch"), ("triton", "torch", "torch", "torch")]
    assert rows[1]["decode_kernels"] == {"norm": "torch", "rope": "torch", "kv_write": "torch", "mlp": "torch",
                                         "attention": "auto"}
    assert rows[0]["ar_ops"] == rows[1]["ar_ops"] > 0


def test_count_decode_ops_counts_the_fused_decode_kernels(tmp_path):
    """In the Triton interpreter with the kernels named, the count is a GPU step's kernels: per layer and pass one
    RoPE + K/V write kernel (no separate RoPE kernel, no scatter_), one SwiGLU kernel (no silu, no mul), no cat of
    the joint q/k norm weight; the JSON records what ran. (The unfused counts beside them: the README of
    docs/results/2026-12-02-kvrope-ops.)"""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (the interpreter)")
    _run(["scripts/count_decode_ops.py", "--shape", "tiny-qwen3", "--batch", "1", "--block-size", "4",
          "--norm", "triton", "--rope", "triton", "--kv-write", "triton", "--mlp", "triton", "--out-dir", str(tmp_path),
          "--tag", "fused"], tmp_path, env={"TRITON_INTERPRET": "1"})
    rep = json.loads((tmp_path / "ops_fused_tiny-qwen3.json").read_text())
    assert rep["decode_kernels"] == {"norm": "triton", "rope": "triton", "kv_write": "triton", "mlp": "triton",
                                     "attention": "auto"}
    for row in rep["rows"]:  # greedy, sampled
        for mode, passes in (("ar", 1), ("spec", 2)):
            f = row[mode]["layer_ops"]
            assert f["triton:_rope_kv_kernel"] == f["triton:_silu_mul_kernel"] == passes
            # input (+ add), post-attention (+ add); the joint q/k norm runs in the RoPE + K/V write kernel
            assert f["triton:_rms_norm_kernel"] == 2 * passes
            assert row[mode]["ops_per_layer"] == sum(f.values())
            assert not {"scatter_", "triton:_rope_kernel", "silu", "mul", "cat"} & set(f)


def test_count_decode_ops_smoke(tmp_path):
    _run(["scripts/count_decode_ops.py", "--shape", "tiny-llama", "--batch", "2", "--out-dir", str(tmp_path),
          "--tag", "t"], tmp_path)
    rep = json.loads((tmp_path / "ops_t_tiny-llama.json").read_text())
    assert rep["layers"] == 2 and len(rep["rows"]) == 2  # greedy, sampled
    for r in rep["rows"]:
        assert r["ar"]["ops_per_step"] == 2 * r["ar"]["ops_per_layer"] + r["ar"]["ops_outside_layers"]
        assert r["spec"]["ops_per_step"] > r["ar"]["ops_per_step"]


def test_bench_kernels_smoke(tmp_path):
    out = tmp_path / "k.json"
    _run(["scripts/bench_kernels.py", "--smoke", "--out", str(out)], tmp_path, env={"TRITON_INTERPRET": "1"})
    rep = json.loads(out.read_text())
    assert rep["loss"] and rep["verify"]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rep["loss"])
    assert all(r["ms"] > 0 for r in rep["verify"])


def test_sweep_decode_kernels_smoke(tmp_path):
    """Every setting of the sweep runs (here in the interpreter) and agrees with its reference: the SiLU tiles bit
    for bit with eager torch, the attention's split counts within bfloat16 rounding of one split."""
    out = tmp_path / "s.json"
    _run(["scripts/sweep_decode_kernels.py", "--smoke", "--out", str(out), "--silu", "smollm2_b16_ar", "--attn",
          "smollm2_b1_k16"], tmp_path, env={"TRITON_INTERPRET": "1"})
    rows = json.loads(out.read_text())["rows"]
    silu = [r for r in rows if r["kernel"] == "silu_mul"]
    attn = [r for r in rows if r["kernel"] == "live_attention"]
    assert len(silu) == 7 and all(r["max_diff"] == 0 for r in silu)
    assert [r["setting"] for r in attn][1:] == ["splits1", "splits2", "splits3", "splits4", "splits6"]
    assert all(r["max_diff"] <= 2 ** -7 for r in attn)


def test_bench_train_real_model_several_micro_batches(tmp_path):
    """The next lease's training-throughput command on a model file (here the tiny checkpoint, on the CPU): one
    row per micro batch, each run with its own global batch (micro x world) and measured steps."""
    out = tmp_path / "t.json"
    _run(["scripts/bench_train.py", "--recipe", "tiny", "--model", "orthrus_train/assets/tiny-qwen3", "--vocab",
          "300", "--seq-len", "64", "--anchors", "4", "--block", "4", "--micro", "1", "2", "--steps", "2",
          "--warmup", "1", "--device", "cpu", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    assert [r["micro"] for r in rows] == [1, 2]
    for r in rows:
        assert r["shape"].endswith("tiny-qwen3") and r["steps_measured"] == 2 and r["tokens_per_s"] > 0
        assert "profile" not in r


def test_bench_train_profiles_the_steps_after_the_warm_up(tmp_path):
    """--profile-steps N: torch.profiler over the N steps after the warm-up; the row names the top operators and
    their time (host time on the CPU; kernel time and the device's busy share on a GPU), --profile-out gets the
    profiler's table and --trace-out the profiled steps' timeline (gzipped Chrome trace)."""
    import gzip

    out, prof = tmp_path / "t.json", tmp_path / "prof"
    _run(["scripts/bench_train.py", "--recipe", "tiny", "--model", "orthrus_train/assets/tiny-qwen3", "--vocab",
          "300", "--seq-len", "64", "--anchors", "4", "--block", "4", "--micro", "2", "--steps", "3",
          "--warmup", "1", "--device", "cpu", "--profile-steps", "2", "--profile-out", str(prof),
          "--trace-out", str(prof), "--out", str(out)],
         tmp_path)
    trace = json.loads(gzip.decompress((prof / "train_trace_micro2.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    p = json.loads(out.read_text())["profile"]
    assert p["steps"] == 2 and p["wall_s"] > 0 and p["time_kind"].startswith("host")
    names = [r["name"] for r in p["top"]]
    assert any(n in names for n in ("aten::mm", "aten::addmm", "MmBackward0")), names  # the steps' matmuls
    assert all(r["self_ms"] >= 0 and r["calls"] >= 1 for r in p["top"])
    assert "aten::mm" in (prof / "train_profile_micro2.txt").read_text()
    assert p["trace"] == str(prof / "train_trace_micro2.json.gz")


def test_learning_curve_collects_reports_into_curve_json(tmp_path):
    """scripts/learning_curve.py: eval reports of the main run's checkpoints and of extra runs -> curve.json
    rows {run, supervised_tokens, steps, benchmark, temperature, acceptance_length, tpf, speedup}, the
    training-side curve at the budgets, curve.md and the plot."""
    def metrics(run, steps, per_step):
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": s, "supervised_tokens": per_step, "loss": 3.0 - 0.1 * s, "expected_accept": 1.5 + 0.1 * s,
             "agreement": [0.8, 0.3]}) + "\n" for s in steps))

    def report(path, accept):
        path.parent.mkdir(parents=True)
        cell = lambda a: {"spec": {"acceptance_length": a, "tpf": a / 2, "tokens_per_s": 100 * a,  # noqa: E731
                                   **({"acceptance_length_se": 0.125} if a == 3.0 else {})},
                          "ar": {"tokens_per_s": 100.0}, "speedup": a}
        path.write_text(json.dumps({"benchmarks": {"gsm8k": {"results": {"T=0": cell(accept), "T=1": cell(accept - 0.5)}}}}))

    def samples(path, per_prompt):  # the eval's samples.jsonl: prompt uid -> (emitted tokens, verify passes)
        path.write_text("".join(json.dumps({"benchmark": "gsm8k", "uid": u, "temperature": 0.0, "method": "spec",
                                            "turns": [{"tokens": list(range(t)), "verify_passes": v,
                                                       "draft_passes": v}]}) + "\n"
                                for u, (t, v) in per_prompt.items()))

    metrics(tmp_path / "main", range(1, 9), 1000)
    recs = [json.loads(x) for x in (tmp_path / "main" / "metrics.jsonl").read_text().splitlines()]
    recs[5].update(val_loss=1.5, val_expected_accept=2.5, val_agreement=[0.7, 0.2])  # step 6 validated
    (tmp_path / "main" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    report(tmp_path / "curve" / "step-2" / "eval" / "report.json", 2.0)
    report(tmp_path / "curve" / "step-8" / "eval" / "report.json", 3.0)
    samples(tmp_path / "curve" / "step-2" / "eval" / "samples.jsonl", {"a": (4, 2), "b": (6, 3), "c": (2, 2)})
    samples(tmp_path / "curve" / "step-8" / "eval" / "samples.jsonl", {"a": (6, 2), "b": (9, 3), "c": (2, 2)})
    metrics(tmp_path / "abl", range(1, 5), 500)
    report(tmp_path / "abl" / "eval" / "report.json", 2.5)
    out = tmp_path / "out"
    _run(["scripts/learning_curve.py", str(out), f"{tmp_path / 'main'}:{tmp_path / 'curve'}",
          "--extra", f"abl-lr={tmp_path / 'abl'}:{tmp_path / 'abl' / 'eval' / 'report.json'}",
          "--extra", f"missing={tmp_path / 'abl'}:{tmp_path / 'nope.json'}", "--budgets", "2,8"], tmp_path)
    rows = json.loads((out / "curve.json").read_text())
    key = lambda r: (r["run"], r["steps"], r["temperature"])  # noqa: E731
    got = {key(r): r for r in rows}
    assert set(got) == {("main", 2, 0.0), ("main", 2, 1.0), ("main", 8, 0.0), ("main", 8, 1.0),
                        ("abl-lr", 4, 0.0), ("abl-lr", 4, 1.0)}
    assert got[("main", 8, 0.0)]["supervised_tokens"] == 8000 and got[("main", 2, 0.0)]["supervised_tokens"] == 2000
    assert got[("main", 8, 0.0)]["acceptance_length"] == 3.0 and got[("main", 8, 1.0)]["tpf"] == 1.25
    assert got[("abl-lr", 4, 0.0)]["supervised_tokens"] == 2000 and got[("abl-lr", 4, 0.0)]["speedup"] == 2.5
    for r in rows:
        assert {"supervised_tokens", "steps", "benchmark", "temperature", "acceptance_length", "tpf",
                "speedup"} <= set(r)
    train = json.loads((out / "training_curve.json").read_text())
    # the training side needs only metrics.jsonl: "missing" (no eval report) still has its training row
    assert [(r["run"], r["steps"]) for r in train] == [("main", 2), ("main", 8), ("abl-lr", 4), ("missing", 4)]
    assert (out / "curve.png").stat().st_size > 0 and "| main | 8 | 0.01M | gsm8k |" in (out / "curve.md").read_text()
    # budgets compared prompt by prompt: 12/7 -> 17/7 on the same three prompts, with the paired error
    paired = json.loads((out / "paired.json").read_text())
    assert [(p["from_step"], p["to_step"], p["benchmark"], p["prompts"]) for p in paired] == [(2, 8, "gsm8k", 3)]
    assert paired[0]["acceptance_length"]["diff"] == pytest.approx(5 / 7) and paired[0]["acceptance_length"]["diff_se"] > 0
    assert "| 2 -> 8 | gsm8k | 0 | 3 | +0.714 (" in (out / "curve.md").read_text()
    # the training side carries the last validation at or before each budget
    assert "val_loss" not in train[0] and (train[1]["val_step"], train[1]["val_expected_accept"]) == (6, 2.5)
    # the error bar where the report has one (reports before it have none: no "±")
    assert got[("main", 8, 0.0)]["acceptance_length_se"] == 0.125 and got[("main", 2, 0.0)]["acceptance_length_se"] is None
    md = (out / "curve.md").read_text()
    assert "| 0 | 3.00 ± 0.12 | 1.50 |" in md and "| 0 | 2.00 | 1.00 |" in md


def test_plot_sessions_draws_the_t0_curves_of_several_runs(tmp_path):
    """scripts/plot_sessions.py: one figure of several runs' curve.json (their main run at T=0); the committed
    multi-session figures are drawn with it (docs/results/*/plot_sessions.py)."""
    runs = []
    for name, shift in (("a", 0.0), ("b", 0.3)):
        rows = [{"run": "main", "supervised_tokens": n, "steps": n // 10, "benchmark": b, "temperature": t,
                 "acceptance_length": 2.0 + shift + n / 1e7, "tpf": 1.0, "speedup": 1.0}
                for n in (10 ** 6, 10 ** 7) for b in ("gsm8k", "humaneval") for t in (0.0, 1.0)]
        rows.append({**rows[0], "run": "medusa"})  # not the main run: left out
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
        runs += ["--run", f"run {name}", str(tmp_path / f"{name}.json"), "5,1" if shift else "solid"]  # 5,1: dashes
    out = tmp_path / "s.png"
    _run(["scripts/plot_sessions.py", str(out), *runs, "--title", "two runs"], tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    bad = _run(["scripts/plot_sessions.py", str(tmp_path / "bad.png"), *runs[:3], "5,x"], tmp_path, rc=1)
    assert "line style '5,x'" in bad.stderr and "Traceback" not in bad.stderr and not (tmp_path / "bad.png").exists()

    # --continued: run b continued run a's last heads; its rows move onto a's token axis, after a's last point
    total = tmp_path / "total.json"
    _run(["scripts/plot_sessions.py", str(out), "--continued", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
          str(total), "--run", "b continued", str(total), "solid"], tmp_path)
    got = json.loads(total.read_text())
    a_rows = json.loads((tmp_path / "a.json").read_text())
    b_main = [r for r in json.loads((tmp_path / "b.json").read_text()) if r["run"] == "main"]
    start = [r for r in a_rows if r["run"] == "main" and r["supervised_tokens"] == 10 ** 7]
    assert got[:len(start)] == start and len(got) == len(start) + len(b_main)
    assert [r["supervised_tokens"] for r in got[len(start):]] == [r["supervised_tokens"] + 10 ** 7 for r in b_main]
    assert [r["acceptance_length"] for r in got[len(start):]] == [r["acceptance_length"] for r in b_main]


def test_learning_curve_driver_returns_the_heads_within_a_device_calls_file_limit(tmp_path):
    """scripts/run_learning_curve_gpu.sh (the tiny recipe on the CPU, phases data and train): after training, OUT
    holds the last checkpoint's heads as parts plus one heads-meta.tar, at most 7 files with results.tgz and
    phases.txt (a device call returns at most 8), and they reassemble to the checkpoint's heads.safetensors with
    its checksum and COMPLETE (what a warm start needs). A failed split publishes nothing and says so."""
    import hashlib
    import tarfile

    root, out = tmp_path / "root", tmp_path / "out"

    def driver(env, *phases, model="orthrus_train/assets/tiny-qwen3", rc=0):
        _run(["scripts/run_learning_curve_gpu.sh", model, str(root), str(out), *phases], tmp_path, env=env,
             prog=("bash",), rc=rc)
    env = {"RECIPE": "tiny", "SAMPLES": "1", "MAX_NEW": "16", "STEPS": "4", "SAVE": "2", "GB": "4", "MB": "2",
           "MEDUSA_RUN": "0", "ABLATIONS": "none", "HEADS_PART_BYTES": "40000", "SELF_PROMPTS": "6",
           "SELF_SEED_WORDS": "2", "DATA_EXTRA": "data.temperature=0.5 data.self_prompts.min_words=0"}
    driver(env, "data", "train")
    # SELF_PROMPTS / SELF_SEED_WORDS reach the data stage: the backbone wrote 6 prompts, each accounted
    data_rep = json.loads((root / "main" / "data" / "report.json").read_text())
    assert data_rep["config"]["temperature"] == 0.5 and data_rep["config"]["self_prompts"]["min_words"] == 0  # DATA_EXTRA
    w = data_rep["regeneration"]["self_prompts"]
    assert w["count"] == 6 and w["seed_words"] == 2 and w["added"] + w["duplicates"] + w["unfinished"] + \
        w["too_short"] == 6
    sample = (root / "results" / "self_prompts_sample.jsonl")
    assert not w["added"] or len(sample.read_text().splitlines()) == w["added"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 7 and "results.tgz" in files, files
    parts = sorted((out / "heads").glob("heads.safetensors.part*"))
    assert len(parts) >= 2  # split under the per-file limit (40 KB here)
    with tarfile.open(out / "heads" / "heads-meta.tar") as t:
        t.extractall(tmp_path / "meta")
    meta = tmp_path / "meta"
    assert {"COMPLETE", "SHA256SUMS", "SOURCE", "config.yaml", "trainer_state.json"} <= {p.name for p in meta.iterdir()}
    whole = b"".join(p.read_bytes() for p in parts)
    assert (meta / "SHA256SUMS").read_text().split()[0] == hashlib.sha256(whole).hexdigest()
    ckpt = Path((meta / "SOURCE").read_text().strip())
    assert whole == (ckpt / "heads.safetensors").read_bytes()
    assert "[heads] step-00000004 ->" in (root / "results" / "phases.txt").read_text()
    # a poll from a later device call waits on OUT/RUNNING: gone when the driver ends, with an [end] line
    assert not (out / "RUNNING").exists()
    assert "[end] rc=0 phases: data train" in (root / "results" / "phases.txt").read_text()

    # a split that fails publishes nothing (the earlier heads stay) and says so
    env["HEADS_PART_BYTES"] = "0"
    driver(env, "train")
    assert "[heads] step-00000004: copy failed" in (root / "results" / "phases.txt").read_text()
    assert sorted((out / "heads").glob("heads.safetensors.part*")) == parts and not (out / ".heads.tmp").exists()

    # a phase that later phases need fails: the driver stops, says so, and still removes OUT/RUNNING
    driver(env, "train", model=str(tmp_path / "no-such-model"), rc=1)
    phases = (root / "results" / "phases.txt").read_text()
    assert "[stop] main_train failed" in phases and phases.rstrip().endswith("[end] rc=1 phases: train")
    assert not (out / "RUNNING").exists()

    # the eval phase keeps each budget's per-prompt records beside its report, and two budgets compare by prompt
    env.update({"BUDGETS": "2 4", "EVAL_N": "3", "EVAL_NEW": "8", "EVAL_BS": "2"})
    driver(env, "eval")
    res = root / "results"
    assert {"curve_step2_samples.jsonl.gz", "curve_step4_samples.jsonl.gz"} <= {p.name for p in res.iterdir()}
    r = _run(["scripts/compare_evals.py", str(res / "curve_step2_samples.jsonl.gz"),
              str(res / "curve_step4_samples.jsonl.gz")], tmp_path)
    assert "| B - A (paired SE) |" in r.stdout and r.stdout.count("\n| ") >= 2


def test_compare_evals_pairs_prompts_by_uid(tmp_path):
    """scripts/compare_evals.py: two evals' samples.jsonl (a run folder, an eval/ folder or the file, gzipped or
    not) -> per benchmark and temperature, each side's acceptance length with its error and B - A with the
    paired error over the prompts both hold; prompts in one only are left out and said so; bad input: one line."""
    import gzip

    def line(bench, uid, T, method, per_turn):
        return json.dumps({"benchmark": bench, "uid": uid, "temperature": T, "method": method, "turns": [
            {"tokens": list(range(t)), "verify_passes": v, "draft_passes": v if method == "spec" else 0,
             "accepted": [], "prompt_len": 3, "finish_reason": "eos", "seed": 0, "block_size": 4}
            for t, v in per_turn]}) + "\n"
    a = tmp_path / "runA" / "eval"
    a.mkdir(parents=True)
    (a / "samples.jsonl").write_text(
        line("gsm8k", "u1", 0.0, "spec", [(6, 3)]) + line("gsm8k", "u2", 0.0, "spec", [(4, 2), (2, 2)])
        + line("gsm8k", "u3", 0.0, "spec", [(8, 4)]) + line("gsm8k", "u1", 0.0, "ar", [(6, 6)]))
    b = tmp_path / "b.jsonl.gz"
    with gzip.open(b, "wt") as f:  # u2 better, u3 absent, u4 only here
        f.write(line("gsm8k", "u2", 0.0, "spec", [(6, 2), (2, 1)]) + line("gsm8k", "u1", 0.0, "spec", [(6, 3)])
                + line("gsm8k", "u4", 0.0, "spec", [(9, 1)]))
    out = tmp_path / "cmp.json"
    r = _run(["scripts/compare_evals.py", str(tmp_path / "runA"), str(b), "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["prompts"] == 2 and (rows[0]["only_a"], rows[0]["only_b"]) == (1, 1)
    al = rows[0]["acceptance_length"]
    assert al["a"] == pytest.approx(12 / 7) and al["b"] == pytest.approx(14 / 6)
    assert al["diff"] == pytest.approx(14 / 6 - 12 / 7) and al["diff_se"] > 0
    assert "| gsm8k | 0 | 2 | 1.71 ± " in r.stdout and "1 prompts only in A, 1 only in B" in r.stdout
    for args, needle in (([str(tmp_path / "nope"), str(b)], "no samples.jsonl at"),
                         ([str(a), str(b), "--method", "medusa"], "no benchmark and temperature")):
        bad = _run(["scripts/compare_evals.py", *args], tmp_path, rc=2)
        assert needle in bad.stderr and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_simulate_refills_replays_a_real_eval(tmp_path):
    """scripts/simulate_refills.py on session 15's GPU eval (report + samples kept in docs/results): the replay with
    the measured fill cost gives the measured engine steps within 3% and refills within 1 on every benchmark; prompts
    staged ahead give fewer idle rows than one pass per fill at the same pass cost; a wrong path is one line."""
    d = ROOT / "docs/results/2026-12-01-s15-self-prompts"
    out = tmp_path / "sim.json"
    _run(["scripts/simulate_refills.py", "--report", str(d / "curve_step800_report.json"),
          "--samples", str(d / "curve_step800_samples.jsonl.gz"), "--out", str(out)], tmp_path)
    rep = json.loads(out.read_text())
    assert rep["batch"] == 16 and set(rep["benchmarks"]) == {"gsm8k", "humaneval", "arena_hard"}
    for name, res in rep["benchmarks"].items():
        for method in ("spec", "ar"):
            meas, rep_ = res[method]["measured"], res[method]["replay"]
            assert abs(rep_["engine_steps"] - meas["engine_steps"]) <= 0.03 * meas["engine_steps"], (name, method)
            assert abs(rep_["refills"] - meas["refills"]) <= 2, (name, method)
            assert res[method]["staged"]["occupancy"] >= res[method]["pass"]["occupancy"] - 0.02, (name, method)
        assert res["staged"]["speedup"] > res["measured"]["speedup"]
        assert res["spec"]["staged"]["prefill_passes"] < res["spec"]["staged"]["refills"]
    # an eval's own uncompressed samples.jsonl reads the same
    import gzip
    plain = tmp_path / "samples.jsonl"
    plain.write_bytes(gzip.decompress((d / "curve_step800_samples.jsonl.gz").read_bytes()))
    _run(["scripts/simulate_refills.py", "--report", str(d / "curve_step800_report.json"), "--samples", str(plain),
          "--benchmarks", "gsm8k", "--out", str(tmp_path / "plain.json")], tmp_path)
    assert json.loads((tmp_path / "plain.json").read_text())["benchmarks"]["gsm8k"] == rep["benchmarks"]["gsm8k"]
    r = _run(["scripts/simulate_refills.py", "--report", str(tmp_path / "nope.json"), "--samples", str(out)],
             tmp_path, rc=2)
    assert "nope.json does not exist" in r.stderr and "Traceback" not in r.stderr


def test_profile_decode_step_asks_for_the_install_when_the_kernels_are_missing(monkeypatch, capsys):
    """A forced kernel (`--attn live`, `--kv-write triton`, ...) without an importable orthrus_kernels (the checkout
    on PYTHONPATH, not installed) is refused before anything is built, in one line naming the install; "auto"
    settings alone run on (each falls back to torch with a warning, and the JSON records what ran)."""
    spec = importlib.util.spec_from_file_location("profile_decode_step", ROOT / "scripts" / "profile_decode_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "orthrus_kernels" else real(name, *a))
    monkeypatch.setattr(mod, "profile_shape", lambda *a: pytest.fail("built a model"))
    with pytest.raises(SystemExit) as e:
        mod.main(["--tiny", "--attn", "auto", "live", "--kv-write", "triton"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--attn live --kv-write triton needs the Triton kernels" in err and "pip install -e ." in err
    ran = []
    monkeypatch.setattr(mod, "profile_shape", lambda *a: ran.append(a[1]))
    mod.main(["--tiny", "--attn", "auto", "sdpa"])
    assert ran == ["smollm2-135m"]
