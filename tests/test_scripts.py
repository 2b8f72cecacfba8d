"""CPU smoke runs of the GPU benchmark scripts: they must run end to end and write what they promise (their
numbers mean nothing on the CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, env=None, timeout=600):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_profile_decode_step_smoke(tmp_path):
    out = tmp_path / "p.json"
    _run(["scripts/profile_decode_step.py", "--batch", "2", "--prompt-len", "6", "--steps", "1", "--attn", "auto",
          "math", "--profile", "--top", "3", "--out", str(out)], tmp_path)
    rep = json.loads(out.read_text())
    assert [r["attn"] for r in rep["rows"]] == ["auto", "math"]
    for r in rep["rows"]:
        assert r["ar_ms_per_step"] > 0 and r["spec_ms_per_step"] > 0 and len(r["spec_top"]) == 3


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
