"""Running the same command again: finished stages are skipped (one line each), interrupted ones resume.

The CLI runs as a user runs it, in subprocesses. Kills are made deterministic with the testing hook
ORTHRUS_DEBUG_STEP_SLEEP (a pause after each regeneration batch, each training step, and before the eval).
"""
import json
import os
import signal
import subprocess
import sys
import time

from orthrus_train.data.stage import tokenizer_fingerprint
from tests.conftest import REPO, orthrus

# a small tiny-recipe run: 4 regeneration batches of 4 prompts, 4 training steps (checkpoints at 2 and 4)
FAST = ["data.num_samples=20", "data.holdout_count=4", "data.max_new_tokens=24", "data.shard_size=4",
        "data.batch_size=4", "train.seq_len=128", "train.anchors_per_row=8", "train.micro_batch=2",
        "train.global_batch=4", "train.max_steps=4", "train.save_every=2", "heads.block_size=4",
        "eval.num_prompts=2", "eval.max_new_tokens=8", "eval.temperatures=[0.0]", "eval.lossless.enabled=false"]


def mtimes(run):
    """Every file of the stages' outputs with its modification time."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for d in ("data", "checkpoints", "eval", "export", "stages")
            for p in (run / d).rglob("*") if p.is_file()}


def test_tokenizer_is_identified_by_content_not_path(tmp_path):
    from transformers import AutoTokenizer

    from orthrus_train.model.backbones import load_tokenizer
    from orthrus_train.model.tiny_tokenizer import build_byte_tokenizer

    src = REPO / "orthrus_train" / "assets" / "tiny-qwen3"
    tok = load_tokenizer(str(src))
    tok.save_pretrained(str(tmp_path / "copy"))
    copy = AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    assert copy.name_or_path != tok.name_or_path
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tok)
    copy.chat_template = copy.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenizer_fingerprint(copy) != tokenizer_fingerprint(tok)
    other = build_byte_tokenizer()
    other.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(build_byte_tokenizer())


def test_data_fingerprint_ignores_the_tokenizer_path_and_keeps_the_generating_model():
    from orthrus_train.data.config import DataConfig

    assert DataConfig(model="m", tokenizer="m").fingerprint() == DataConfig(model="m", tokenizer="RUN/tok").fingerprint()
    assert DataConfig(model="a").fingerprint() != DataConfig(model="b").fingerprint()  # it writes the responses
    assert (DataConfig(model="a", regenerate=False).fingerprint()
            == DataConfig(model="b", regenerate=False).fingerprint())  # only its tokenizer counts, by content
    assert DataConfig(seq_len=64).fingerprint() != DataConfig(seq_len=128).fingerprint()


def test_same_command_twice_skips_finished_stages(tmp_path):
    run = tmp_path / "run"
    first = orthrus("recipe=tiny", f"run_dir={run}", *FAST)
    assert f"report: {run / 'eval' / 'report.md'}" == first.stdout.strip().splitlines()[-1]
    before = mtimes(run)

    second = orthrus("recipe=tiny", f"run_dir={run}", *FAST)  # failed before: tokenizer path in the fingerprint
    out = second.stdout
    assert "data: complete (" in out and f"rows in {run / 'data'}), skipped" in out
    assert "train: complete at step 4, skipped" in out
    assert f"eval: complete from step-00000004 ({run / 'eval' / 'report.md'}), skipped" in out
    assert f"export: complete from step-00000004 ({run / 'export'}), skipped" in out
    assert "=== stage" not in out
    assert "unable to detect" not in out + second.stderr  # DeepSpeed's accelerator warning on the CPU
    assert f"report: {run / 'eval' / 'report.md'}" == out.strip().splitlines()[-1]
    # the demo's closing note points at the table only where this run printed one
    assert "untrained vs trained heads above" in first.stdout
    assert "untrained vs trained heads in the report below" in out and "heads above" not in out
    assert mtimes(run) == before, "a skipped stage rewrote its outputs"

    # other eval settings: eval runs again, and so does the export (its card shows the eval report)
    third = orthrus("recipe=tiny", f"run_dir={run}", *FAST, "eval.max_new_tokens=6")
    assert "data: complete" in third.stdout and "train: complete at step 4, skipped" in third.stdout
    assert "=== stage eval ===" in third.stdout and "=== stage export ===" in third.stdout
    assert json.loads((run / "eval" / "report.json").read_text())["settings"]["max_new_tokens"] == 6


def run_until_killed(args, log, ready, what, timeout=600):
    """Start the CLI with the step pause on, kill -9 it once ready() holds; the stage must still be running."""
    env = dict(os.environ, ORTHRUS_NO_PROGRESS="1", PYTHONUNBUFFERED="1", ORTHRUS_DEBUG_STEP_SLEEP="2")
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "orthrus_train", *args], cwd=REPO, env=env, stdout=f,
                             stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert p.poll() is None, f"the run ended before the kill {what}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no kill point {what} after {timeout} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        assert p.poll() is None, f"the run ended before the kill {what}"
        p.send_signal(signal.SIGKILL)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    return log.read_text()


def test_kill9_in_each_stage_then_the_same_command_completes(tmp_path):
    run = tmp_path / "run"
    args = ["recipe=tiny", f"run_dir={run}", *FAST]
    regen = run / "data" / "regen"

    # 1. killed during the data stage, after the first regeneration shard of four
    run_until_killed(args, tmp_path / "1.log", lambda: any(regen.glob("shard-*.json")), "during data")
    assert not (run / "data" / "report.json").exists()
    done_shards = len(list(regen.glob("shard-*.json")))
    assert 1 <= done_shards < 4

    # 2. the same command resumes the data (finished shards are kept), then is killed during training
    latest = run / "checkpoints" / "latest"
    out = run_until_killed(args, tmp_path / "2.log", latest.exists, "during training")
    assert f"(skipped {done_shards})" in out, out[-3000:]
    assert latest.read_text().strip() == "step-00000002"

    # 3. data is skipped, training resumes at step 2 and finishes; killed during the eval
    out = run_until_killed(args, tmp_path / "3.log", (run / "eval").exists, "during eval")
    assert "data: complete" in out and "resumed from" in out and "at step 2/4" in out, out[-3000:]
    assert (run / "checkpoints" / "step-00000004" / "COMPLETE").exists()
    assert not (run / "stages" / "eval.json").exists()

    # 4. the same command finishes: the eval runs again (it was interrupted), then the export
    out = orthrus(*args).stdout
    assert "data: complete" in out and "train: complete at step 4, skipped" in out
    assert "=== stage eval ===" in out and "=== stage export ===" in out
    assert (run / "eval" / "report.md").exists() and (run / "export" / "config.json").exists()
    assert json.loads((run / "stages" / "eval.json").read_text())["inputs"]["checkpoint"] == "step-00000004"
    steps = sorted({json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()})
    assert steps == [1, 2, 3, 4]

    # 5. and once more: nothing left to do
    out = orthrus(*args).stdout
    assert "=== stage" not in out and out.count(", skipped") == 4
