"""render_sbatch / submit: the batch script's properties, without a Slurm cluster."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orthrus_train.launch.slurm import (
    DEFAULT_ENV,
    SlurmConfig,
    SlurmConfigError,
    coerce_config,
    orthrus_command,
    parse_slurm_time,
    render_sbatch,
    submit,
    task_argv,
)

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["recipe=qwen3-72b", "launcher=slurm", "launcher.nodes=4", "train.lr=1e-4", "resume=never",
             "run_dir=relative/run"]


def directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_argv(script: str) -> list[str]:
    """The srun command of the script, as argv (joined over the line continuation)."""
    text = script.replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("srun "))
    return shlex.split(line)


def gpu_cfg(**kw) -> SlurmConfig:
    base = dict(nodes=4, gpus_per_node=8, cpus_per_task=12, mem="0", partition="gpu", account="proj",
                qos="high", time="2-00:00:00", job_name="q72")
    base.update(kw)
    return SlurmConfig(**base)


def test_gpu_job_directives(tmp_path):
    s = render_sbatch(gpu_cfg(), tmp_path / "run", orthrus_command(OVERRIDES, python="python"))
    assert s.startswith("#!/bin/bash\n")
    d = directives(s)
    for expected in ["--job-name=q72", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                     "--cpus-per-task=12", "--mem=0", "--partition=gpu", "--account=proj", "--qos=high",
                     "--time=2-00:00:00", f"--output={tmp_path / 'run'}/slurm/%x-%j.out", "--open-mode=append",
                     f"--chdir={Path.cwd()}", "--requeue", "--signal=USR1@120"]:
        assert expected in d, (expected, d)
    assert not any(x.startswith("--signal=B:") for x in d), "the signal must reach the srun tasks, not the shell"
    assert not any(x.startswith("--array") for x in d)


def test_srun_runs_one_task_per_gpu_with_local_launcher(tmp_path):
    run = tmp_path / "run"
    argv = srun_argv(render_sbatch(gpu_cfg(), run, orthrus_command(OVERRIDES, python="python")))
    i = argv.index("python")
    assert argv[:i] == ["srun", "--kill-on-bad-exit=1", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                        "--cpus-per-task=12"]
    # same overrides in order, launcher group/resume/run_dir replaced; launcher.* settings kept
    assert argv[i:] == ["python", "-m", "orthrus_train", "recipe=qwen3-72b", "launcher.nodes=4", "train.lr=1e-4",
                        "launcher=local", f"run_dir={run}", "resume=auto"]


def test_overrides_only_argv_gets_the_module_command(tmp_path):
    argv = task_argv(["recipe=tiny", "train.max_steps=3"], tmp_path)
    assert argv == [sys.executable, "-m", "orthrus_train", "recipe=tiny", "train.max_steps=3", "launcher=local",
                    f"run_dir={tmp_path}", "resume=auto"]


def test_task_argv_drops_only_the_replaced_keys(tmp_path):
    argv = task_argv(["python", "-m", "orthrus_train", "+launcher=slurm", "launcher_extra=1", "stage=train",
                      "~resume", "run_dir=x"], tmp_path, stage="eval")
    assert argv == ["python", "-m", "orthrus_train", "launcher_extra=1", "launcher=local", f"run_dir={tmp_path}",
                    "resume=auto", "stage=eval"]


def test_env_and_setup_order(tmp_path):
    cfg = gpu_cfg(setup_lines=["module load cuda/12.4", "source /opt/venv/bin/activate"],
                  env={**DEFAULT_ENV, "NCCL_SOCKET_IFNAME": "ib0", "NOTE": "two words", "PYTHONUNBUFFERED": None})
    s = render_sbatch(cfg, tmp_path, orthrus_command(OVERRIDES))
    lines = s.splitlines()
    idx = {key: next(i for i, line in enumerate(lines) if key in line) for key in
           ["unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT", "module load cuda/12.4",
            "export NCCL_NVLS_ENABLE=0", "export NCCL_SOCKET_IFNAME=ib0", "srun "]}
    assert list(idx.values()) == sorted(idx.values()), "unset -> setup -> env -> srun"
    assert "export NOTE='two words'" in lines
    assert "export ORTHRUS_IN_SLURM_JOB=1" in lines
    assert not any("PYTHONUNBUFFERED" in line for line in lines), "None removes a default"


def test_default_env_turns_nvls_off(tmp_path):
    assert SlurmConfig().env["NCCL_NVLS_ENABLE"] == "0"
    assert "export NCCL_NVLS_ENABLE=0" in render_sbatch(SlurmConfig(), tmp_path, ["recipe=tiny"]).splitlines()


def test_requeue_off_and_no_signal(tmp_path):
    d = directives(render_sbatch(gpu_cfg(requeue=False, signal_seconds_before_end=0), tmp_path, ["recipe=x"]))
    assert "--no-requeue" in d and "--requeue" not in d
    assert not any(x.startswith("--signal") for x in d)


def test_cpu_job_uses_tasks_per_node(tmp_path):
    cfg = SlurmConfig(gpus_per_node=0, tasks_per_node=2, cpus_per_task=1)
    s = render_sbatch(cfg, tmp_path, ["recipe=tiny"])
    d = directives(s)
    assert "--ntasks-per-node=2" in d and not any("gpus" in x for x in d)
    assert srun_argv(s)[:5] == ["srun", "--kill-on-bad-exit=1", "--nodes=1", "--ntasks-per-node=2",
                                "--cpus-per-task=1"]
    assert "--mem" not in s and "--partition" not in s and "--time" not in s


def test_extra_sbatch_lines(tmp_path):
    d = directives(render_sbatch(gpu_cfg(extra_sbatch_lines=["--exclusive", "#SBATCH --constraint=h100"]),
                                 tmp_path, ["recipe=x"]))
    assert "--exclusive" in d and "--constraint=h100" in d


def test_stage_job_and_data_array(tmp_path):
    cfg = gpu_cfg(separate_stages=True, data_array_shards=4,
                  stage_overrides={"data": {"nodes": 1, "time": "12:00:00"}})
    data = render_sbatch(cfg, tmp_path, ["recipe=x"], stage="data")
    d = directives(data)
    assert {"--array=0-3", "--nodes=1", "--time=12:00:00", "--job-name=q72-data",
            f"--output={tmp_path}/slurm/%x-%A_%a.out"} <= set(d)
    assert srun_argv(data)[-1] == "stage=data" and "--nodes=1" in srun_argv(data)
    train = render_sbatch(cfg, tmp_path, ["recipe=x"], stage="train")
    assert "--nodes=4" in directives(train) and not any(x.startswith("--array") for x in directives(train))
    assert srun_argv(train)[-1] == "stage=train"


def test_array_for_a_data_only_run(tmp_path):
    s = render_sbatch(gpu_cfg(data_array_shards=2), tmp_path, ["recipe=x", "stage=data"])
    assert "--array=0-1" in directives(s)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"nodes": 0}, "launcher.nodes=0"),
        ({"gpus_per_node": 8, "tasks_per_node": 2}, "launcher.tasks_per_node=2"),
        ({"time": "1:2:3:4"}, "launcher.time"),
        ({"time": "2", "signal_seconds_before_end": 120}, "launcher.signal_seconds_before_end=120"),
        ({"signal_seconds_before_end": 70000}, "65535"),
        ({"mem": "lots"}, "launcher.mem"),
        ({"job_name": "my job"}, "launcher.job_name"),
        ({"partition": "a b"}, "launcher.partition"),
        ({"env": {"RANK": "0"}}, "launcher.env.RANK"),
        ({"env": {"BAD-NAME": "0"}}, "launcher.env key"),
        ({"setup_lines": "module load x"}, "launcher.setup_lines"),
        ({"stage_overrides": {"training": {}}}, "launcher.stage_overrides.training"),
        ({"stage_overrides": {"data": {"separate_stages": True}}}, "cannot override separate_stages"),
        ({"data_array_shards": 4}, "launcher.data_array_shards=4"),
    ],
)
def test_config_errors_name_the_key(tmp_path, kw, message):
    with pytest.raises(SlurmConfigError) as e:
        render_sbatch(SlurmConfig(**kw), tmp_path, ["recipe=x"])
    assert message in str(e.value)


def test_unknown_key_is_named():
    with pytest.raises(SlurmConfigError, match="launcher.gpus;.*valid keys"):
        coerce_config({"gpus": 8})


def test_coerce_from_mapping_and_omegaconf():
    from omegaconf import OmegaConf

    cfg = coerce_config({"type": "slurm", "nodes": 2, "time": 90})
    assert cfg.nodes == 2 and cfg.time == "90"
    node = OmegaConf.structured(SlurmConfig(nodes=3, env={"A": "1"}))
    assert coerce_config(node).nodes == 3 and coerce_config(node).env == {"A": "1"}


@pytest.mark.parametrize("value, seconds", [("30", 1800), ("10:30", 630), ("1:00:00", 3600), ("2-00", 172800),
                                            ("1-02:03", 93780), ("1-00:00:05", 86405), ("INFINITE", None)])
def test_parse_slurm_time(value, seconds):
    assert parse_slurm_time(value) == seconds


def test_script_is_valid_bash(tmp_path):
    s = render_sbatch(gpu_cfg(setup_lines=["echo 'hi there'"], env={"X": "a'b\"c $HOME"}), tmp_path, ["recipe=x"])
    f = tmp_path / "s.sh"
    f.write_text(s)
    out = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "export X='a'\"'\"'b\"c $HOME'" in s  # single-quoted: no expansion


# --------------------------------------------------------------------------- submit (fake sbatch)


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` on PATH that records its arguments and answers like --parsable."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch-calls.jsonl"
    counter = tmp_path / "next-id"
    counter.write_text("100")
    exe = bindir / "sbatch"
    exe.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        if os.environ.get("FAKE_SBATCH_FAIL"):
            print("sbatch: error: Batch job submission failed: Invalid account", file=sys.stderr)
            sys.exit(1)
        n = int(open({str(counter)!r}).read())
        open({str(counter)!r}, "w").write(str(n + 1))
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        print(f"{{n}};cluster")
        """))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_submit_writes_script_and_prints_id_and_log(tmp_path, fake_sbatch, capsys):
    run = tmp_path / "run"
    job = submit(SlurmConfig(job_name="t"), run, ["recipe=tiny"])
    assert job == "100"
    script = run / "slurm" / "t.sbatch"
    assert script.read_text() == render_sbatch(SlurmConfig(job_name="t"), run, ["recipe=tiny"])
    calls = [json.loads(x) for x in fake_sbatch.read_text().splitlines()]
    assert calls == [["--parsable", str(script)]]
    out = capsys.readouterr().out
    assert "Submitted Slurm job 100" in out and f"{run}/slurm/t-100.out" in out
    assert json.loads((run / "slurm" / "jobs.jsonl").read_text())["job_id"] == "100"


def test_separate_stages_are_chained_with_afterok(tmp_path, fake_sbatch, capsys):
    run = tmp_path / "run"
    cfg = SlurmConfig(job_name="p", separate_stages=True, data_array_shards=3)
    last = submit(cfg, run, ["recipe=tiny"])
    calls = [json.loads(x) for x in fake_sbatch.read_text().splitlines()]
    assert [Path(c[-1]).name for c in calls] == ["p-data.sbatch", "p-train.sbatch", "p-eval.sbatch",
                                                 "p-export.sbatch"]
    assert calls[0] == ["--parsable", str(run / "slurm" / "p-data.sbatch")]
    for prev_id, call in zip(["100", "101", "102"], calls[1:]):
        assert f"--dependency=afterok:{prev_id}" in call and "--kill-on-invalid-dep=yes" in call
    assert last == "103"
    assert "--array=0-2" in directives((run / "slurm" / "p-data.sbatch").read_text())
    out = capsys.readouterr().out
    assert f"{run}/slurm/p-data-100_%a.out" in out and "(export)" in out


def test_dry_run_submits_nothing(tmp_path, fake_sbatch, capsys):
    run = tmp_path / "run"
    assert submit(SlurmConfig(dry_run=True, separate_stages=True), run, ["recipe=tiny"]) is None
    assert not fake_sbatch.exists()
    out = capsys.readouterr().out
    assert "#SBATCH --job-name=orthrus-train" in out
    assert f"would run: data_job=$(sbatch --parsable {run}/slurm/orthrus-data.sbatch)" in out
    assert ("would run: train_job=$(sbatch --parsable --dependency=afterok:$data_job --kill-on-invalid-dep=yes "
            f"{run}/slurm/orthrus-train.sbatch)") in out
    assert (run / "slurm" / "orthrus-export.sbatch").exists()


def test_sbatch_failure_is_reported(tmp_path, fake_sbatch, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    with pytest.raises(RuntimeError, match="Invalid account"):
        submit(SlurmConfig(), tmp_path, ["recipe=tiny"])


def test_separate_stages_refuses_a_stage_override(tmp_path, fake_sbatch):
    with pytest.raises(SlurmConfigError, match="drop stage=train"):
        submit(SlurmConfig(separate_stages=True), tmp_path, ["recipe=tiny", "stage=train"])


def test_missing_sbatch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="sbatch not found.*dry_run"):
        submit(SlurmConfig(), tmp_path, ["recipe=tiny"])


# --------------------------------------------------------------------------- through the real CLI


@pytest.mark.skipif(not (REPO / "orthrus_train" / "cli.py").exists(), reason="the CLI is not there yet")
def test_cli_dry_run_writes_and_prints_the_script(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "orthrus_train", "recipe=tiny", "launcher=slurm", "launcher.dry_run=true",
         "launcher.nodes=2", "launcher.gpus_per_node=4", "launcher.partition=gpu", f"run_dir={run}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    script = run / "slurm" / "orthrus.sbatch"
    assert script.exists()
    text = script.read_text()
    assert text in out.stdout
    d = directives(text)
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu"} <= set(d)
    argv = srun_argv(text)
    assert argv[argv.index("-m") + 1:][:2] == ["orthrus_train", "recipe=tiny"]
    assert argv[-3:] == ["launcher=local", f"run_dir={run}", "resume=auto"]
    assert "launcher=slurm" not in argv


# --------------------------------------------------------------------------- refused before submitting


def _cli(*args):
    from orthrus_train import cli
    return cli.main(list(args))


@pytest.mark.parametrize("extra", [[], ["launcher.separate_stages=true"], ["launcher.dry_run=true"]])
def test_random_weights_with_a_data_stage_are_refused_before_submitting(tmp_path, fake_sbatch, capsys, extra):
    run = tmp_path / "run"
    rc = _cli("recipe=qwen3-72b", "model.init=random", "launcher=slurm", f"run_dir={run}", *extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.init=random with stage=all: the data stage needs real weights" in err and "stage=train" in err
    assert not fake_sbatch.exists() and not run.exists()  # nothing submitted, nothing written


def test_stage_train_without_data_is_refused_at_submit_and_noted_on_a_dry_run(tmp_path, fake_sbatch, capsys):
    run = tmp_path / "run"
    args = ["recipe=qwen3-72b", "model.init=random", "stage=train", "launcher=slurm", f"run_dir={run}"]
    assert _cli(*args) == 2
    assert "run stage=data first" in capsys.readouterr().err and not fake_sbatch.exists() and not run.exists()
    assert _cli(*args, "launcher.dry_run=true") == 0  # prints the script, says what the job will need
    out, err = capsys.readouterr()
    assert "note: stage=train:" in err and "before submitting" in err and "#SBATCH --nodes=8" in out
    (run / "data" / "train").mkdir(parents=True)  # data copied in: the real submission goes through
    assert _cli(*args) == 0
    assert [Path(c[-1]).name for c in map(json.loads, fake_sbatch.read_text().splitlines())] == ["orthrus.sbatch"]


def _readme_slurm_dry_run() -> list[str]:
    """The README's Slurm dry-run command, as written (continuation lines joined)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "launcher=slurm" in x and "launcher.dry_run=true" in x)
    return shlex.split(line.split("#")[0])


def test_readme_slurm_dry_run_works_as_written(tmp_path):
    argv = _readme_slurm_dry_run()
    assert argv[:3] == ["python", "-m", "orthrus_train"] and "model.init=random" in argv
    p = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "error:" not in p.stderr
    srun = srun_argv(p.stdout[p.stdout.index("#!/bin/bash"):])
    assert "stage=train" in srun and "model.init=random" in srun  # the job would not run the data stage
