"""Real jobs on the local Slurm cluster (.ci/slurm_setup.sh): 2 tasks on the CPU, requeue, stages.

Two kinds of workload:
* ``standin_train.py`` (this folder): the launch contract with no model, steps of a fixed length,
  so preemption timing is under the test's control;
* the real CLI, ``python -m orthrus_train recipe=tiny ... launcher=slurm``, as a user runs it.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_testlib import REPO, STANDIN, read_events, tail_logs
from orthrus_train.launch.dist_env import port_from_job_id
from orthrus_train.launch.slurm import SlurmConfig, submit

pytestmark = pytest.mark.slurm

HAVE_CLI = (REPO / "orthrus_train" / "cli.py").exists() and (REPO / "recipes" / "tiny.yaml").exists()
needs_cli = pytest.mark.skipif(not HAVE_CLI, reason="orthrus_train/cli.py or recipes/tiny.yaml not there yet")

CPU_TASKS = dict(nodes=1, gpus_per_node=0, tasks_per_node=2, cpus_per_task=1)
CLI_CPU_TASKS = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2", "launcher.cpus_per_task=1"]


def hostname_short() -> str:
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()


def submit_standin(cluster, run: Path, name: str, args: list[str], **cfg) -> str:
    config = SlurmConfig(**{**CPU_TASKS, "job_name": name, "time": "10", **cfg})
    job = submit(config, run, [sys.executable, str(STANDIN), *args])
    assert job is not None
    return cluster.track(job)


def submit_cli(cluster, run: Path, overrides: list[str]) -> str:
    out = subprocess.run([sys.executable, "-m", "orthrus_train", "recipe=tiny", *overrides, f"run_dir={run}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    ids = re.findall(r"Submitted Slurm job (\d+)", out.stdout)
    assert ids, out.stdout
    for job in ids:
        cluster.track(job)
    return ids[-1]


def assert_completed(info: dict, logs) -> None:
    assert info, "job record vanished (MinJobAge too small?)"
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), tail_logs(logs)


def assert_no_step_lost(events: list[dict], total: int) -> None:
    """Every step 1..total ran; an attempt resumes right after the newest checkpoint of the ones
    before it, so only steps after that checkpoint run twice."""
    attempts = sorted({e["attempt"] for e in events})
    newest_ckpt = 0
    for a in attempts:
        mine = [e for e in events if e["attempt"] == a]
        start = next(e for e in mine if e["ev"] == "start")
        assert start["step"] == newest_ckpt, f"attempt {a} resumed at {start['step']}, newest checkpoint {newest_ckpt}"
        steps = [e["step"] for e in mine if e["ev"] == "step"]
        assert steps == list(range(newest_ckpt + 1, newest_ckpt + 1 + len(steps))), f"attempt {a}: {steps}"
        newest_ckpt = max([e["step"] for e in mine if e["ev"] == "ckpt"], default=newest_ckpt)
    ran = collections.Counter(e["step"] for e in events if e["ev"] == "step")
    assert set(ran) == set(range(1, total + 1))
    assert [e for e in events if e["ev"] == "done"][-1]["step"] == total


# --------------------------------------------------------------------------- 2 tasks, launch contract


def test_two_tasks_resolve_distinct_ranks_and_checkpoint(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    job = submit_standin(slurm_cluster, run, "t-ranks", ["standin.steps=3"])
    log = run / "slurm" / f"t-ranks-{job}.out"
    info = slurm_cluster.wait(job, timeout=300, logs=[log])
    assert_completed(info, [log])
    assert log.exists() and f"[orthrus] job {job}" in log.read_text()

    ranks = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("all-attempt0-rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert sorted(r["local_rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert (r["world_size"], r["local_world_size"], r["num_nodes"], r["node_rank"]) == (2, 2, 1, 0)
        assert r["source"] == "slurm"
        assert r["master_addr"] == hostname_short()  # first host of SLURM_JOB_NODELIST
        assert r["master_port"] == port_from_job_id(job)
        assert r["allreduce_rank_sum"] == 1  # a real gloo group over env:// formed
        assert r["env"]["RANK"] == str(r["rank"]) and r["env"]["WORLD_SIZE"] == "2"
        assert r["nccl_nvls_enable"] == "0"
        assert r["argv"][-3:] == ["launcher=local", f"run_dir={run}", "resume=auto"]
    assert len({r["pid"] for r in ranks}) == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-3"
    assert (run / "DONE").read_text().strip() == "3"


# --------------------------------------------------------------------------- requeue (stand-in)


def test_scontrol_requeue_resumes_from_newest_checkpoint(slurm_cluster, tmp_path):
    """scontrol requeue sends SIGTERM: checkpoint, exit, start again, resume, finish."""
    run = tmp_path / "run"
    total = 14
    job = submit_standin(slurm_cluster, run, "t-requeue", [f"standin.steps={total}", "standin.step_sleep=1"])
    log = run / "slurm" / f"t-requeue-{job}.out"
    slurm_cluster.wait_for(lambda: (run / "checkpoints" / "step-3").is_dir(), 90, "checkpoint step-3", job, [log])
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = slurm_cluster.wait(job, timeout=300, logs=[log])
    assert_completed(info, [log])
    assert int(info["Restarts"]) == 1

    events = read_events(run / "steps.log")
    assert_no_step_lost(events, total)
    assert sorted({e["attempt"] for e in events}) == [0, 1]
    stop = [e for e in events if e["ev"] == "signal"]
    assert [(e["attempt"], e["signal"], e["requeued"]) for e in stop] == [(0, "SIGTERM", False)]
    # the stop checkpoint is the newest step of attempt 0: nothing of attempt 0 is redone
    assert next(e for e in events if e["attempt"] == 1 and e["ev"] == "start")["step"] == stop[0]["step"]
    log_text = log.read_text()
    assert "restart 0" in log_text and "restart 1" in log_text  # --open-mode=append kept both attempts


def test_time_limit_warning_makes_the_job_requeue_itself(slurm_cluster, tmp_path):
    """--time=2 with --signal=USR1@80: Slurm warns the tasks; rank 0 checkpoints and requeues the
    job itself, and the requeued job resumes from that checkpoint.

    Slurm checks time limits every 30 s and warns once the time left is at most the asked time
    plus ~30 s, so the warning comes 10-40 s into the job (measured on 22.05). The first
    attempt's steps outlast that window; the requeued attempt runs fast and finishes before its
    own earliest warning."""
    run = tmp_path / "run"
    total = 50
    job = submit_standin(slurm_cluster, run, "t-warn",
                         [f"standin.steps={total}", "standin.step_sleep=1", "standin.step_sleep_after_restart=0.02"],
                         time="2", signal_seconds_before_end=80)
    log = run / "slurm" / f"t-warn-{job}.out"
    info = slurm_cluster.wait(job, timeout=300, logs=[log])
    assert_completed(info, [log])

    events = read_events(run / "steps.log")
    assert_no_step_lost(events, total)
    warned = [e for e in events if e["ev"] == "signal"]
    assert [(e["attempt"], e["signal"], e["requeued"]) for e in warned] == [(0, "SIGUSR1", True)], tail_logs([log])
    assert 5 <= warned[0]["step"] < total
    assert int(info["Restarts"]) == 1
    assert f"requeued Slurm job {job}" in log.read_text()


# --------------------------------------------------------------------------- stages and data arrays


def test_separate_stages_and_data_array(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    one = {"tasks_per_node": 1}
    cfg = SlurmConfig(**CPU_TASKS, job_name="t-stages", time="10", separate_stages=True, data_array_shards=2,
                      stage_overrides={"data": one, "eval": one, "export": one})
    last = submit(cfg, run, [sys.executable, str(STANDIN), "standin.steps=2"])
    jobs = [json.loads(line) for line in (run / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert [j["stage"] for j in jobs] == ["data", "train", "eval", "export"] and jobs[-1]["job_id"] == last
    for j in jobs:
        slurm_cluster.track(j["job_id"])
    logs = [run / "slurm" / "*.out"]
    for j in jobs:
        assert_completed(slurm_cluster.wait(j["job_id"], timeout=300, logs=logs), logs)

    shards = sorted((json.loads(p.read_text()) for p in (run / "data").glob("shard-*.json")), key=lambda s: s["index"])
    assert [(s["index"], s["count"], s["source"]) for s in shards] == [(0, 2, "slurm-array"), (1, 2, "slurm-array")]
    assert (run / "slurm" / f"t-stages-data-{jobs[0]['job_id']}_0.out").exists()
    assert (run / "slurm" / f"t-stages-data-{jobs[0]['job_id']}_1.out").exists()
    train_ranks = sorted(json.loads(p.read_text())["rank"] for p in (run / "ranks").glob("train-attempt0-rank*.json"))
    assert train_ranks == [0, 1]
    # afterok ordering: each stage started after the previous one finished
    train_start = read_events(run / "steps.log")[0]["t"]
    assert max(s["t"] for s in shards) < train_start
    eval_t = json.loads((run / "eval.json").read_text())["t"]
    export_t = json.loads((run / "export.json").read_text())["t"]
    assert (run / "DONE").stat().st_mtime < eval_t < export_t


# --------------------------------------------------------------------------- the real CLI


@needs_cli
def test_tiny_recipe_as_a_two_task_job(slurm_cluster, tmp_path):
    """The user's command: the whole tiny pipeline as one Slurm job with 2 tasks on the CPU."""
    run = tmp_path / "run"
    job = submit_cli(slurm_cluster, run, [*CLI_CPU_TASKS, "launcher.job_name=t-tiny", "train.max_steps=20",
                                          "train.save_every=10"])
    log = run / "slurm" / f"t-tiny-{job}.out"
    assert (run / "slurm" / "t-tiny.sbatch").exists()
    info = slurm_cluster.wait(job, timeout=400, logs=[log])
    assert_completed(info, [log])

    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert (latest / "COMPLETE").exists()
    assert {p.name for p in latest.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}  # both ranks saved
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["plan"]["world"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 20
    assert (run / "eval" / "report.json").exists(), tail_logs([log])
    assert (run / "export" / "config.json").exists(), tail_logs([log])


@needs_cli
def test_tiny_recipe_as_separate_stage_jobs(slurm_cluster, tmp_path):
    """data (a 2-task job array) -> train (2 tasks) -> eval -> export, chained with afterok."""
    run = tmp_path / "run"
    submit_cli(slurm_cluster, run, [*CLI_CPU_TASKS, "launcher.job_name=t-sep", "launcher.separate_stages=true",
                                    "launcher.data_array_shards=2",
                                    "+launcher.stage_overrides={data: {tasks_per_node: 1}, eval: {tasks_per_node: 1}, "
                                    "export: {tasks_per_node: 1}}",
                                    "train.max_steps=10", "train.save_every=5"])
    jobs = [json.loads(line) for line in (run / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert [j["stage"] for j in jobs] == ["data", "train", "eval", "export"]
    logs = [run / "slurm" / "*.out"]
    for j in jobs:
        assert_completed(slurm_cluster.wait(j["job_id"], timeout=300, logs=logs), logs)
    data_id = jobs[0]["job_id"]
    assert {p.name for p in (run / "slurm").glob("t-sep-data-*.out")} == {f"t-sep-data-{data_id}_0.out",
                                                                           f"t-sep-data-{data_id}_1.out"}
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["plan"]["world"] == 2
    assert (run / "eval" / "report.json").exists() and (run / "export" / "config.json").exists()


@needs_cli
def test_requeued_tiny_training_resumes_without_losing_steps(slurm_cluster, tmp_path):
    """scontrol requeue on the real trainer: it checkpoints on SIGTERM and the requeued job resumes
    from that checkpoint (resume=auto); steps after the last checkpoint are redone exactly."""
    run = tmp_path / "run"
    one = ["launcher.tasks_per_node=1"]
    data_job = submit_cli(slurm_cluster, run, [*CLI_CPU_TASKS, *one, "launcher.job_name=t-rq-data", "stage=data"])
    data_log = run / "slurm" / f"t-rq-data-{data_job}.out"
    assert_completed(slurm_cluster.wait(data_job, timeout=300, logs=[data_log]), [data_log])

    total = 120
    job = submit_cli(slurm_cluster, run, [*CLI_CPU_TASKS, "launcher.job_name=t-rq-train", "stage=train",
                                          f"train.max_steps={total}", "train.save_every=20"])
    log = run / "slurm" / f"t-rq-train-{job}.out"
    latest = run / "checkpoints" / "latest"
    slurm_cluster.wait_for(latest.exists, 150, "the first checkpoint", job, [log])
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    requeued_at = time.time()
    info = slurm_cluster.wait(job, timeout=300, logs=[log])
    assert_completed(info, [log])
    assert int(info["Restarts"]) == 1

    text = log.read_text()
    resumed = re.findall(r"resumed from (\S+) at step (\d+)/", text)
    assert len(resumed) == 1, tail_logs([log])
    resume_step = int(resumed[0][1])
    assert 0 < resume_step < total, f"requeued at {requeued_at}, resumed at {resume_step}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seen = collections.defaultdict(list)
    for r in records:
        seen[r["step"]].append(r["loss"])
    assert set(seen) == set(range(1, total + 1)), "a step is missing from metrics.jsonl"
    redone = sorted(s for s, losses in seen.items() if len(losses) > 1)
    assert all(s > resume_step for s in redone), f"steps up to the checkpoint were redone: {redone}"
    assert all(len(seen[s]) <= 2 for s in redone)
    for s in redone:  # exact resume: a redone step computes the same loss
        assert seen[s][0] == pytest.approx(seen[s][1], rel=1e-5, abs=1e-6), s
    # SIGTERM made the trainer write a checkpoint at the step it stopped: nothing was redone
    assert "signal received" in text, "the trainer did not checkpoint on SIGTERM:\n" + tail_logs([log])
    assert redone == [], f"steps redone after requeue: {redone}"
