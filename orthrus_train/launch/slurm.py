"""Render and submit Slurm batch jobs for a run.

``python -m orthrus_train recipe=NAME launcher=slurm ...`` ends here: :func:`submit` writes
``run_dir/slurm/<job name>.sbatch`` and hands it to ``sbatch --parsable``. Inside the job, ``srun``
starts one task per GPU; each task runs the same command with ``launcher=local resume=auto`` and
finds its rank through :mod:`orthrus_train.launch.dist_env` (the same code path as torchrun).

With ``separate_stages`` the pipeline becomes four jobs, data -> train -> eval -> export, each
waiting for the previous one (``--dependency=afterok``); the data job can be a job array over shards
(``data_array_shards``). See docs/slurm.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from orthrus_train.launch.dist_env import TORCH_ENV_VARS

PIPELINE_STAGES = ("data", "train", "eval", "export")

# NVLink SHARP / multicast (NVLS) is off by default: on many H100/H200 systems NCCL's NVLS path
# needs the IMEX/fabric manager set up for multicast objects and otherwise fails at communicator
# creation or hangs; it also reserves extra GPU memory per communicator. docs/slurm.md has more.
DEFAULT_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "PYTHONUNBUFFERED": "1",
}


class SlurmConfigError(ValueError):
    """A ``launcher.*`` value that Slurm would reject or that makes no sense; names the key."""


@dataclass
class SlurmConfig:
    """``launcher=slurm`` settings. Each field maps to an ``#SBATCH`` line or to the job script.

    Resources
        nodes: number of nodes (``--nodes``).
        gpus_per_node: GPUs per node (``--gpus-per-node``); one task (process) per GPU is started
            (``--ntasks-per-node``). 0 = CPU-only job, tasks from ``tasks_per_node``.
        tasks_per_node: tasks per node when ``gpus_per_node`` is 0 (default 1); must equal
            ``gpus_per_node`` (or stay unset) otherwise.
        cpus_per_task: CPU cores per task (``--cpus-per-task``, also passed to ``srun`` because
            Slurm 22.05's srun does not inherit it). None = cluster default.
        mem: memory per node, Slurm syntax (``--mem``: ``"480G"``; ``"0"`` = all of the node's).
        partition / account / qos: ``--partition`` / ``--account`` / ``--qos``; None = not set.
        time: time limit (``--time``): ``"MM"``, ``"HH:MM:SS"``, ``"D-HH:MM:SS"``...; None = the
            partition's default.
    Identity
        job_name: Slurm job name (``--job-name``); separate stages get ``<job_name>-<stage>``.
            Also the script's file name: ``run_dir/slurm/<job_name>.sbatch``.
    Preemption
        signal_seconds_before_end: ask Slurm for SIGUSR1 this many seconds before the time limit
            (``--signal=USR1@N``; 0 = none). Without ``B:`` the signal goes to every srun task, i.e.
            to the training processes themselves. Slurm may send it up to 60 s early.
        requeue: ``--requeue`` (may be requeued, and requeues itself on the warning signal) or
            ``--no-requeue``.
    Submission
        dry_run: write and print the script(s) and the sbatch command(s); submit nothing.
        extra_sbatch_lines: more directives, e.g. ``["--exclusive", "--constraint=h100"]``
            (``#SBATCH`` is added when missing).
        env: variables exported before ``srun`` (after ``setup_lines``); a value of None removes a
            default. Default: ``NCCL_NVLS_ENABLE=0``, ``PYTHONUNBUFFERED=1``.
        setup_lines: shell lines run first in the job, e.g. ``module load cuda/12.4``,
            ``source /path/venv/bin/activate``.
        python: interpreter for the tasks; None = the one that submits (``sys.executable``).
            Set ``python`` when ``setup_lines`` activate an environment.
    Stages
        separate_stages: submit data -> train -> eval -> export as four jobs, each starting only
            when the previous one succeeded (``--dependency=afterok``).
        data_array_shards: run the data stage as a job array of this many tasks
            (``--array=0-(N-1)``); each reads its shard from ``SLURM_ARRAY_TASK_ID`` /
            ``SLURM_ARRAY_TASK_COUNT`` (:func:`~orthrus_train.launch.dist_env.resolve_data_shard`).
            0 = no array. Needs ``separate_stages`` (or a run with ``stage=data``).
        stage_overrides: per-stage resource changes, e.g.
            ``{"data": {"nodes": 1, "time": "12:00:00"}, "eval": {"nodes": 1}}``.
    """

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    job_name: str = "orthrus"
    signal_seconds_before_end: int = 120
    requeue: bool = True
    dry_run: bool = False
    extra_sbatch_lines: list[str] = field(default_factory=list)
    env: dict[str, str | None] = field(default_factory=lambda: dict(DEFAULT_ENV))
    setup_lines: list[str] = field(default_factory=list)
    python: str | None = None
    separate_stages: bool = False
    data_array_shards: int = 0
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ntasks_per_node(self) -> int:
        """Processes per node: one per GPU, or ``tasks_per_node`` on CPU-only jobs."""
        if self.gpus_per_node > 0:
            return self.gpus_per_node
        return self.tasks_per_node or 1


# Keys a launcher mapping may carry besides the fields (a Hydra group's discriminator).
_IGNORED_KEYS = frozenset({"_target_", "name", "type"})
# Fields stage_overrides may change (resources and job-script contents, not the pipeline shape).
_STAGE_OVERRIDABLE = frozenset(
    {
        "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "partition", "account",
        "qos", "time", "signal_seconds_before_end", "requeue", "extra_sbatch_lines", "env",
        "setup_lines", "python",
    }
)


def _to_plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, SlurmConfig):
        return dataclasses.asdict(cfg)
    try:  # OmegaConf DictConfig (the Hydra schema mirrors SlurmConfig)
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise SlurmConfigError(f"launcher config must be a SlurmConfig, dataclass or mapping, got {type(cfg).__name__}")


def coerce_config(launcher_cfg: Any) -> SlurmConfig:
    """SlurmConfig from a SlurmConfig, a dataclass, a dict or an OmegaConf node; validated."""
    data = {k: v for k, v in _to_plain(launcher_cfg).items() if k not in _IGNORED_KEYS}
    names = {f.name for f in dataclasses.fields(SlurmConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SlurmConfigError(
            f"unknown launcher key(s) {', '.join('launcher.' + k for k in unknown)}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    cfg = SlurmConfig(**data)
    validate(cfg)
    return cfg


_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(value: str | int | None) -> int | None:
    """Seconds in a Slurm ``--time`` value; None for unset/INFINITE. Raises on a malformed value."""
    if value is None:
        return None
    text = str(value).strip()
    if text.upper() in ("INFINITE", "UNLIMITED"):
        return None
    m = _TIME_RE.match(text)
    if not m:
        raise SlurmConfigError(
            f"launcher.time={value!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"
        )
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 60  # MM


def _check_int(cfg: SlurmConfig, name: str, minimum: int, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SlurmConfigError(f"launcher.{name}={value!r} must be an integer")
    if value < minimum:
        raise SlurmConfigError(f"launcher.{name}={value} must be >= {minimum}")


def validate(cfg: SlurmConfig) -> None:
    """Raise :class:`SlurmConfigError` naming the first bad ``launcher.*`` key."""
    _check_int(cfg, "nodes", 1)
    _check_int(cfg, "gpus_per_node", 0)
    _check_int(cfg, "tasks_per_node", 1, optional=True)
    _check_int(cfg, "cpus_per_task", 1, optional=True)
    _check_int(cfg, "signal_seconds_before_end", 0)
    _check_int(cfg, "data_array_shards", 0)
    if cfg.gpus_per_node > 0 and cfg.tasks_per_node not in (None, cfg.gpus_per_node):
        raise SlurmConfigError(
            f"launcher.tasks_per_node={cfg.tasks_per_node} but launcher.gpus_per_node={cfg.gpus_per_node}: "
            "GPU jobs run one task per GPU; leave tasks_per_node unset (it is for gpus_per_node=0)"
        )
    if cfg.signal_seconds_before_end > 65535:
        raise SlurmConfigError(f"launcher.signal_seconds_before_end={cfg.signal_seconds_before_end} exceeds Slurm's 65535")
    if cfg.time is not None:
        cfg.time = str(cfg.time)
        limit = parse_slurm_time(cfg.time)
        if limit is not None and cfg.signal_seconds_before_end and cfg.signal_seconds_before_end >= limit:
            raise SlurmConfigError(
                f"launcher.signal_seconds_before_end={cfg.signal_seconds_before_end} is not below "
                f"launcher.time={cfg.time!r} ({limit} s): the warning would come at the start"
            )
    if cfg.mem is not None:
        cfg.mem = str(cfg.mem)
        if not re.fullmatch(r"\d+[KMGT]?", cfg.mem.strip(), re.IGNORECASE):
            raise SlurmConfigError(f"launcher.mem={cfg.mem!r} is not Slurm memory syntax (e.g. 480G, 64000M, 0)")
    if not cfg.job_name or re.search(r"[\s/%]", cfg.job_name):
        raise SlurmConfigError(f"launcher.job_name={cfg.job_name!r} must be non-empty, without spaces, '/' or '%'")
    for key in ("partition", "account", "qos"):
        value = getattr(cfg, key)
        if value is not None and (not str(value).strip() or re.search(r"\s", str(value))):
            raise SlurmConfigError(f"launcher.{key}={value!r} must be a single word")
    for key in ("extra_sbatch_lines", "setup_lines"):
        lines = getattr(cfg, key)
        if isinstance(lines, str) or not isinstance(lines, (list, tuple)):
            raise SlurmConfigError(f"launcher.{key} must be a list of strings, got {type(lines).__name__}")
        for line in lines:
            if not isinstance(line, str) or "\n" in line:
                raise SlurmConfigError(f"launcher.{key} entry {line!r} must be a one-line string")
    if not isinstance(cfg.env, Mapping):
        raise SlurmConfigError(f"launcher.env must be a mapping of variable names to values, got {type(cfg.env).__name__}")
    for name, value in cfg.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise SlurmConfigError(f"launcher.env key {name!r} is not a shell variable name")
        if name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            raise SlurmConfigError(
                f"launcher.env.{name}: rank variables come from Slurm inside each task; do not set them"
            )
    if not isinstance(cfg.stage_overrides, Mapping):
        raise SlurmConfigError("launcher.stage_overrides must map a stage name to a mapping of launcher keys")
    for stage, over in cfg.stage_overrides.items():
        if stage not in PIPELINE_STAGES:
            raise SlurmConfigError(
                f"launcher.stage_overrides.{stage}: unknown stage; stages are {', '.join(PIPELINE_STAGES)}"
            )
        if not isinstance(over, Mapping):
            raise SlurmConfigError(f"launcher.stage_overrides.{stage} must be a mapping of launcher keys")
        bad = sorted(set(over) - _STAGE_OVERRIDABLE)
        if bad:
            raise SlurmConfigError(
                f"launcher.stage_overrides.{stage}: cannot override {', '.join(bad)}; "
                f"per-stage keys are {', '.join(sorted(_STAGE_OVERRIDABLE))}"
            )


def config_for_stage(cfg: SlurmConfig, stage: str | None) -> SlurmConfig:
    """``cfg`` with ``stage_overrides[stage]`` applied (and validated)."""
    over = dict(cfg.stage_overrides.get(stage, {})) if stage else {}
    if not over:
        return cfg
    out = dataclasses.replace(cfg, **over)
    validate(out)
    return out


# --------------------------------------------------------------------------- command lines

_OVERRIDE_RE = re.compile(r"^(?:\+\+|\+|~)?(?P<key>[A-Za-z_][\w.\-/@]*)(?:=(?P<value>.*))?$", re.S)


def _override_key(arg: str) -> str | None:
    """The key of a Hydra override (``launcher.nodes=2`` -> ``launcher.nodes``), else None."""
    if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
        return None
    m = _OVERRIDE_RE.match(arg)
    return m.group("key") if m else None


def _stage_in(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if _override_key(arg) == "stage" and "=" in arg:
            return arg.split("=", 1)[1]
    return None


def orthrus_command(overrides: Sequence[str], python: str | None = None) -> list[str]:
    """``[python, "-m", "orthrus_train", *overrides]``: the usual ``command_argv``."""
    return [python or sys.executable, "-m", "orthrus_train", *overrides]


def task_argv(command_argv: Sequence[str], run_dir: str | os.PathLike, stage: str | None = None) -> list[str]:
    """The command each srun task runs.

    ``command_argv`` is the whole command (``[python, "-m", "orthrus_train", *overrides]``, or any
    script that takes the same overrides) or just the Hydra overrides, in which case
    ``python -m orthrus_train`` (this interpreter) is put in front. The launcher group choice
    (``launcher=slurm``), ``resume=`` and ``run_dir=`` (and ``stage=`` when ``stage`` is given)
    are replaced by ``launcher=local run_dir=<absolute> resume=auto [stage=<stage>]``; every
    other item keeps its place, ``launcher.*`` settings included (the job sees the same
    ``launcher.requeue`` etc. as the submitter).
    """
    if isinstance(command_argv, (str, bytes)) or not command_argv:
        raise SlurmConfigError("command_argv must be a non-empty list of strings (e.g. orthrus_command(overrides))")
    argv = [str(a) for a in command_argv]
    if _override_key(argv[0]) is not None:  # only overrides: the CLI's command in front
        argv = orthrus_command(argv)
    dropped = {"launcher", "resume", "run_dir"} | ({"stage"} if stage else set())
    out = [a for a in argv if _override_key(a) not in dropped]
    out += ["launcher=local", f"run_dir={Path(run_dir).resolve()}", "resume=auto"]
    if stage:
        out.append(f"stage={stage}")
    return out


# --------------------------------------------------------------------------- rendering


def job_name_for(cfg: SlurmConfig, stage: str | None) -> str:
    return f"{cfg.job_name}-{stage}" if stage else cfg.job_name


def _array_spec(cfg: SlurmConfig, stage: str | None, command_argv: Sequence[str]) -> str | None:
    if cfg.data_array_shards <= 0:
        return None
    effective = stage or _stage_in(command_argv)
    if effective == "data":
        return f"0-{cfg.data_array_shards - 1}"
    if stage is None and not cfg.separate_stages:
        raise SlurmConfigError(
            f"launcher.data_array_shards={cfg.data_array_shards} needs launcher.separate_stages=true or "
            "stage=data: an array over the whole pipeline would train once per shard"
        )
    return None


def log_pattern(run_dir: str | os.PathLike, array: bool = False) -> str:
    """Slurm ``--output`` pattern: ``run_dir/slurm/%x-%j.out`` (``%x-%A_%a.out`` for arrays)."""
    name = "%x-%A_%a.out" if array else "%x-%j.out"
    return str(Path(run_dir).resolve() / "slurm" / name)


def _directive(line: str) -> str:
    line = line.strip()
    if line.startswith("#SBATCH"):
        return line
    return f"#SBATCH {line}"


def render_sbatch(
    launcher_cfg: Any,
    run_dir: str | os.PathLike,
    command_argv: Sequence[str],
    stage: str | None = None,
) -> str:
    """The batch script for one job of the run.

    ``stage=None`` runs ``command_argv`` as given (the whole pipeline, or the ``stage=`` it names);
    ``stage="train"`` etc. renders that stage's job (``stage_overrides`` applied, ``stage=train``
    appended). Dependencies between stage jobs are sbatch arguments (see :func:`submit`), not part
    of the script, so a script can be resubmitted by hand.
    """
    base = coerce_config(launcher_cfg)
    if stage is not None and stage not in PIPELINE_STAGES:
        raise SlurmConfigError(f"unknown stage {stage!r}; stages are {', '.join(PIPELINE_STAGES)}")
    cfg = config_for_stage(base, stage)
    run_dir = Path(run_dir).resolve()
    array = _array_spec(cfg, stage, command_argv)
    argv = task_argv(command_argv, run_dir, stage)
    if cfg.python:
        argv[0] = cfg.python
    ntasks = cfg.ntasks_per_node
    name = job_name_for(cfg, stage)

    d: list[str] = [
        f"--job-name={name}",
        f"--nodes={cfg.nodes}",
        f"--ntasks-per-node={ntasks}",
    ]
    if cfg.gpus_per_node > 0:
        d.append(f"--gpus-per-node={cfg.gpus_per_node}")
    if cfg.cpus_per_task:
        d.append(f"--cpus-per-task={cfg.cpus_per_task}")
    if cfg.mem is not None:
        d.append(f"--mem={cfg.mem}")
    for key in ("partition", "account", "qos", "time"):
        value = getattr(cfg, key)
        if value is not None:
            d.append(f"--{key}={value}")
    d += [
        f"--output={log_pattern(run_dir, array=array is not None)}",
        # A requeued job appends to its log instead of truncating the first attempt's.
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
        "--requeue" if cfg.requeue else "--no-requeue",
    ]
    if cfg.signal_seconds_before_end > 0:
        # No "B:": the signal goes to the srun tasks (the python processes), not the batch shell.
        d.append(f"--signal=USR1@{cfg.signal_seconds_before_end}")
    if array:
        d.append(f"--array={array}")

    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={cfg.nodes}", f"--ntasks-per-node={ntasks}"]
    if cfg.gpus_per_node > 0:
        srun.append(f"--gpus-per-node={cfg.gpus_per_node}")
    if cfg.cpus_per_task:
        srun.append(f"--cpus-per-task={cfg.cpus_per_task}")

    lines = [
        "#!/bin/bash",
        f"# Generated by orthrus_train.launch.slurm for run {run_dir}"
        + (f", stage {stage}" if stage else "")
        + ". Submit again with: sbatch <this file>",
    ]
    lines += [_directive(x) for x in d]
    lines += [_directive(x) for x in cfg.extra_sbatch_lines]
    lines += [
        "",
        "set -eo pipefail",
        'echo "[orthrus] job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task ${SLURM_ARRAY_TASK_ID})} '
        'on ${SLURM_JOB_NODELIST}, restart ${SLURM_RESTART_COUNT:-0}, $(date -Is)"',
        "",
        "# Rank facts come from Slurm inside each task (orthrus_train.launch.dist_env); drop values",
        "# inherited from the submitting shell so they cannot override Slurm's.",
        "unset " + " ".join(TORCH_ENV_VARS),
    ]
    lines += [
        "# The CLI inside the job runs the stages instead of submitting again.",
        "export ORTHRUS_IN_SLURM_JOB=1",
    ]
    if cfg.setup_lines:
        lines += ["", "# setup (launcher.setup_lines)"] + list(cfg.setup_lines)
    env = {k: v for k, v in cfg.env.items() if v is not None}
    if env:
        lines += ["", "# environment (launcher.env)"]
        lines += [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    if cfg.cpus_per_task:
        lines.append(f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{cfg.cpus_per_task}}}")
    lines += [
        "",
        f"# {cfg.nodes} node(s) x {ntasks} task(s); each task resolves its rank via dist_env and resumes",
        "# from run_dir/checkpoints/latest when present (resume=auto).",
        shlex.join(srun) + " \\\n    " + shlex.join(argv),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- submission


@dataclass
class SubmittedJob:
    stage: str | None
    job_id: str | None  # None on a dry run
    script: Path
    log: str  # log path (with the job id filled in once known)
    sbatch_argv: list[str]


def _sbatch_exe() -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise RuntimeError(
            "sbatch not found on PATH: submit from a Slurm login node, or use launcher.dry_run=true "
            "to only write the batch script"
        )
    return exe


def _parse_job_id(stdout: str) -> str:
    # --parsable prints "<job id>" or "<job id>;<cluster>"
    text = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = text.split(";", 1)[0].strip()
    if not re.fullmatch(r"\d+", job_id):
        raise RuntimeError(f"could not read a job id from sbatch --parsable output {stdout!r}")
    return job_id


def submit_jobs(launcher_cfg: Any, run_dir: str | os.PathLike, command_argv: Sequence[str]) -> list[SubmittedJob]:
    """Write the script(s), submit them (unless ``dry_run``) and return what was done."""
    cfg = coerce_config(launcher_cfg)
    run_dir = Path(run_dir).resolve()
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    if cfg.separate_stages:
        given = _stage_in(command_argv)
        if given is not None:
            raise SlurmConfigError(
                f"launcher.separate_stages=true submits every stage as its own job; drop stage={given} "
                "(or set launcher.separate_stages=false to run only that stage)"
            )
        stages: list[str | None] = list(PIPELINE_STAGES)
    else:
        stages = [None]

    jobs: list[SubmittedJob] = []
    previous: str | None = None
    for stage in stages:
        stage_cfg = config_for_stage(cfg, stage)
        name = job_name_for(stage_cfg, stage)
        script = slurm_dir / f"{name}.sbatch"
        script.write_text(render_sbatch(cfg, run_dir, command_argv, stage=stage))
        script.chmod(0o755)
        array = _array_spec(stage_cfg, stage, command_argv) is not None
        argv = ["sbatch", "--parsable"]
        if jobs:
            # on a dry run, a shell variable the printed commands assign (see submit())
            dep = previous if previous is not None else f"${jobs[-1].stage}_job"
            argv += [f"--dependency=afterok:{dep}", "--kill-on-invalid-dep=yes"]
        argv.append(str(script))
        log_path = log_pattern(run_dir, array).replace("%x", name)
        if cfg.dry_run:
            jobs.append(SubmittedJob(stage, None, script, log_path, argv))
            continue
        argv[0] = _sbatch_exe()
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"sbatch failed (exit {proc.returncode}) for {script}:\n{(proc.stderr or proc.stdout).strip()}"
                + (f"\nalready submitted: {', '.join(j.job_id for j in jobs)}" if jobs else "")
            )
        job_id = _parse_job_id(proc.stdout)
        log_path = log_path.replace("%j", job_id).replace("%A", job_id)
        jobs.append(SubmittedJob(stage, job_id, script, log_path, argv))
        previous = job_id
    if not cfg.dry_run:
        with open(slurm_dir / "jobs.jsonl", "a") as f:
            for j in jobs:
                f.write(json.dumps({"stage": j.stage, "job_id": j.job_id, "script": str(j.script), "log": j.log}) + "\n")
    return jobs


def submit(
    launcher_cfg: Any, run_dir: str | os.PathLike, command_argv: Sequence[str], file=None
) -> str | None:
    """Submit the run to Slurm and print the job id(s) and log path(s).

    Writes ``run_dir/slurm/<job name>.sbatch`` (one per stage with ``separate_stages``), runs
    ``sbatch --parsable`` (with ``--dependency=afterok:<previous>`` between stages) and appends the
    ids to ``run_dir/slurm/jobs.jsonl``. Returns the id of the last job (the one whose success
    means the run is done), or None on a dry run, which only writes and prints the script(s).
    """
    out = file if file is not None else sys.stdout
    jobs = submit_jobs(launcher_cfg, run_dir, command_argv)
    for j in jobs:
        label = f" ({j.stage})" if j.stage else ""
        if j.job_id is None:
            cmd = " ".join(a if a.startswith("--dependency=") else shlex.quote(a) for a in j.sbatch_argv)
            if j.stage:
                cmd = f"{j.stage}_job=$({cmd})"
            print(f"# dry run{label}: wrote {j.script}\n# would run: {cmd}", file=out)
            print(j.script.read_text(), file=out)
        else:
            print(f"Submitted Slurm job {j.job_id}{label}: script {j.script}", file=out)
            print(f"  logs: {j.log}", file=out)
    if jobs and jobs[0].job_id is not None:
        print(f"  watch: squeue -j {','.join(j.job_id for j in jobs)}", file=out)
    return jobs[-1].job_id if jobs else None
