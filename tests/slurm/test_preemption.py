"""PreemptionHandler and any_rank, in-process (signals sent to ourselves with os.kill)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orthrus_train.launch import preemption
from orthrus_train.launch.preemption import PreemptionHandler, any_rank, shared_handler

REPO = Path(__file__).resolve().parents[2]


def deliver(sig: int) -> None:
    """Send ``sig`` to this process and let the Python-level handler run."""
    os.kill(os.getpid(), sig)
    for _ in range(100):  # the handler runs between bytecodes of the main thread
        time.sleep(0.001)


@pytest.fixture
def fake_scontrol(tmp_path):
    """An ``scontrol`` that records its arguments (and fails when FAKE_SCONTROL_FAIL is set)."""
    calls = tmp_path / "calls.txt"
    exe = tmp_path / "scontrol"
    exe.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" >> {calls}
        if [ -n "$FAKE_SCONTROL_FAIL" ]; then echo "Invalid job id specified" >&2; exit 1; fi
        """))
    exe.chmod(0o755)
    return exe, calls


def test_sigusr1_sets_flag_and_exit_code():
    h = PreemptionHandler().install()
    try:
        assert not h.should_checkpoint_and_exit and h.exit_code == 0 and h.received_signal is None
        deliver(signal.SIGUSR1)
        assert h.should_checkpoint_and_exit
        assert h.received_signal == signal.SIGUSR1
        assert h.exit_code == 128 + signal.SIGUSR1
        deliver(signal.SIGTERM)  # a later signal does not change what came first
        assert h.received_signal == signal.SIGUSR1 and h.signal_count == 2
    finally:
        h.uninstall()


def test_sigterm_is_caught_not_fatal():
    with PreemptionHandler() as h:
        deliver(signal.SIGTERM)  # would end the test process without the handler
        assert h.should_checkpoint_and_exit and h.exit_code == 143


def test_uninstall_restores_previous_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    term_before = signal.getsignal(signal.SIGTERM)
    try:
        h = PreemptionHandler().install()
        assert signal.getsignal(signal.SIGTERM) != term_before
        deliver(signal.SIGUSR1)
        assert seen == [] and h.should_checkpoint_and_exit
        h.uninstall()
        deliver(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGTERM) == term_before
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_uninstall_leaves_sigusr1_ignored_not_fatal():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        PreemptionHandler().install().uninstall()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        deliver(signal.SIGUSR1)  # would end the test process with the default action
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_warning_during_interpreter_exit_does_not_kill_the_process(tmp_path):
    """Python resets handlers to SIG_DFL at exit; a late SIGUSR1 must not make a finished run fail."""
    script = tmp_path / "late.py"
    script.write_text(textwrap.dedent(
        """
        import atexit, os, signal, sys
        from orthrus_train.launch.preemption import shared_handler
        def late_warning():  # registered first, so it runs after the handler's own exit hook
            os.kill(os.getpid(), signal.SIGUSR1)
            print("survived", signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, flush=True)
        atexit.register(late_warning)
        shared_handler()
        sys.exit(0)
        """
    ))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "survived True"), out.stderr


def test_handler_does_no_io(monkeypatch):
    """The signal handler must only record: no logging, no file or subprocess calls."""
    def forbidden(*a, **k):
        raise AssertionError("I/O inside the signal handler")

    h = PreemptionHandler(environ={"SLURM_JOB_ID": "1"}, rank=0, scontrol="/nonexistent").install()
    try:
        monkeypatch.setattr(logging.Logger, "_log", forbidden)
        monkeypatch.setattr("builtins.open", forbidden)
        monkeypatch.setattr(subprocess, "run", forbidden)
        deliver(signal.SIGUSR1)
        assert h.should_checkpoint_and_exit
    finally:
        monkeypatch.undo()
        h.uninstall()


def test_install_outside_main_thread_is_refused():
    import threading

    errors = []
    t = threading.Thread(target=lambda: errors.append(_try_install()))
    t.start()
    t.join()
    assert "main thread" in errors[0]


def _try_install():
    try:
        PreemptionHandler().install()
    except RuntimeError as e:
        return str(e)
    return "installed"


def test_requeue_on_warning_signal_runs_scontrol_once(fake_scontrol, caplog):
    exe, calls = fake_scontrol
    with PreemptionHandler(environ={"SLURM_JOB_ID": "4242"}, rank=0, scontrol=str(exe)) as h:
        assert h.requeue() is False  # no signal yet
        deliver(signal.SIGUSR1)
        with caplog.at_level(logging.INFO, logger="orthrus_train.launch.preemption"):
            assert h.requeue() is True
            assert h.requeue() is True  # once: no second scontrol call
    assert calls.read_text().splitlines() == ["requeue 4242"]
    assert h.requeued
    assert "requeued Slurm job 4242" in caplog.text


@pytest.mark.parametrize(
    "kwargs, environ, sig, why",
    [
        ({"rank": 1}, {"SLURM_JOB_ID": "7"}, signal.SIGUSR1, "not rank 0"),
        ({"rank": 0, "requeue_enabled": False}, {"SLURM_JOB_ID": "7"}, signal.SIGUSR1, "requeue disabled"),
        ({"rank": 0}, {}, signal.SIGUSR1, "outside Slurm"),
        ({"rank": 0}, {"SLURM_JOB_ID": "7"}, signal.SIGTERM, "SIGTERM: Slurm ends or requeues the job itself"),
    ],
)
def test_requeue_conditions(fake_scontrol, kwargs, environ, sig, why):
    exe, calls = fake_scontrol
    with PreemptionHandler(environ=environ, scontrol=str(exe), **kwargs) as h:
        deliver(sig)
        assert h.should_checkpoint_and_exit, why
        assert h.requeue() is False, why
    assert not calls.exists(), why


def test_requeue_on_sigterm_when_asked(fake_scontrol):
    exe, calls = fake_scontrol
    with PreemptionHandler(environ={"SLURM_JOB_ID": "9"}, rank=0, scontrol=str(exe),
                           requeue_on=(signal.SIGUSR1, signal.SIGTERM)) as h:
        deliver(signal.SIGTERM)
        assert h.requeue() is True
    assert calls.read_text().split() == ["requeue", "9"]


def test_rank_comes_from_dist_env(fake_scontrol):
    exe, calls = fake_scontrol
    env = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2",
           "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_STEP_ID": "0"}
    with PreemptionHandler(environ=env, scontrol=str(exe)) as h:
        deliver(signal.SIGUSR1)
        assert h.requeue() is False  # rank 1
    with PreemptionHandler(environ=dict(env, SLURM_PROCID="0", SLURM_LOCALID="0"), scontrol=str(exe)) as h:
        deliver(signal.SIGUSR1)
        assert h.requeue() is True
    assert calls.read_text().splitlines() == ["requeue 5"]


def test_failed_scontrol_is_logged_not_raised(fake_scontrol, monkeypatch, caplog):
    exe, _ = fake_scontrol
    monkeypatch.setenv("FAKE_SCONTROL_FAIL", "1")
    with PreemptionHandler(environ={"SLURM_JOB_ID": "3"}, rank=0, scontrol=str(exe)) as h:
        deliver(signal.SIGUSR1)
        with caplog.at_level(logging.ERROR):
            assert h.requeue() is False
    assert "Invalid job id specified" in caplog.text and not h.requeued


def test_missing_scontrol_is_logged(caplog):
    with PreemptionHandler(environ={"SLURM_JOB_ID": "3"}, rank=0, scontrol="no-such-scontrol-xyz") as h:
        deliver(signal.SIGUSR1)
        with caplog.at_level(logging.ERROR):
            assert h.requeue() is False
    assert "not found on PATH" in caplog.text


def test_shared_handler_keeps_an_early_signal(monkeypatch):
    monkeypatch.setattr(preemption, "_SHARED", None)
    early = shared_handler(requeue_enabled=False)  # e.g. the CLI, before anything slow
    try:
        deliver(signal.SIGUSR1)  # would terminate the process without a handler
        later = shared_handler(requeue_enabled=True)  # e.g. the trainer
        assert later is early and later.should_checkpoint_and_exit and later.requeue_enabled
    finally:
        early.uninstall()


def test_any_rank_without_process_group_is_identity():
    assert any_rank(True) is True and any_rank(False) is False


def test_any_rank_agrees_across_two_processes(tmp_path):
    """Only rank 1 saw the signal; both ranks must decide to stop (all-reduce MAX over gloo)."""
    script = tmp_path / "agree.py"
    script.write_text(textwrap.dedent(
        """
        import sys, torch.distributed as dist
        from orthrus_train.launch.preemption import any_rank
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
        print(any_rank(rank == 1), any_rank(False))
        dist.destroy_process_group()
        """
    ))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(store)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.split())
    assert outs == [["True", "False"], ["True", "False"]]


# --------------------------------------------------------------------------- real Slurm: the generated script
# a small tiny-recipe run (tests/shell/test_rerun.py has the same shape); 12 steps leave room for the requeue
PIPELINE = ["data.num_samples=20", "data.holdout_count=4", "data.max_new_tokens=24", "train.seq_len=128",
            "train.anchors_per_row=8", "train.micro_batch=2", "train.global_batch=4", "train.epochs=100",
            "train.max_steps=12", "train.save_every=2", "heads.block_size=4", "eval.num_prompts=2",
            "eval.max_new_tokens=8", "eval.temperatures=[0.0]", "eval.lossless.enabled=false"]


@pytest.mark.slurm
def test_preempted_pipeline_job_reruns_its_generated_script_unchanged_and_completes(slurm_cluster, tmp_path):
    """The user's command (stage=all, 2 tasks) as a Slurm job, requeued during training: Slurm runs the
    same generated batch script again, which skips the finished data stage, resumes training and completes.
    Submitting that script once more by hand skips every stage."""
    import json
    import re

    from slurm_testlib import tail_logs

    run = tmp_path / "run"
    env = dict(os.environ, ORTHRUS_NO_PROGRESS="1", ORTHRUS_DEBUG_STEP_SLEEP="1")  # steps long enough to requeue
    out = subprocess.run([sys.executable, "-m", "orthrus_train", "recipe=tiny", f"run_dir={run}", *PIPELINE,
                          "launcher=slurm", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2",
                          "launcher.cpus_per_task=1", "launcher.job_name=t-pre", "launcher.time=30"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    job = slurm_cluster.track(re.findall(r"Submitted Slurm job (\d+)", out.stdout)[-1])
    script = run / "slurm" / "t-pre.sbatch"
    text, mtime = script.read_text(), script.stat().st_mtime_ns
    log = run / "slurm" / f"t-pre-{job}.out"

    slurm_cluster.wait_for((run / "checkpoints" / "latest").exists, 400, "the first checkpoint", job, [log])
    assert not (run / "checkpoints" / "step-00000012").exists()
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    info = slurm_cluster.wait(job, timeout=400, logs=[log])
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), tail_logs([log])
    assert int(info["Restarts"]) == 1
    assert (script.read_text(), script.stat().st_mtime_ns) == (text, mtime), "the batch script was rewritten"

    second = log.read_text().split("signal received", 1)[-1]  # the requeued attempt
    assert "data: complete" in second and ", skipped" in second, tail_logs([log])
    assert re.search(r"resumed from \S+ at step [1-9]\d*/12", second), tail_logs([log])
    assert (run / "checkpoints" / "step-00000012" / "COMPLETE").exists()
    assert (run / "eval" / "report.md").exists() and (run / "export" / "config.json").exists()
    assert f"report: {run / 'eval' / 'report.md'}" in second

    # the same script submitted again: every stage is finished
    again = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=run)
    assert again.returncode == 0, again.stderr
    job2 = slurm_cluster.track(again.stdout.strip().split(";")[0])
    log2 = run / "slurm" / f"t-pre-{job2}.out"
    info = slurm_cluster.wait(job2, timeout=300, logs=[log2])
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), tail_logs([log2])
    text2 = log2.read_text()
    assert "train: complete at step 12, skipped" in text2 and "=== stage" not in text2, tail_logs([log2])
    assert json.loads((run / "stages" / "eval.json").read_text())["inputs"]["checkpoint"] == "step-00000012"
