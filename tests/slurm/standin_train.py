"""Stand-in for ``python -m orthrus_train`` in the Slurm tests: the same launch contract, no model.

Accepts Hydra-style ``key=value`` arguments (unknown ones are ignored, so the launcher's
``launcher=local run_dir=... resume=auto stage=...`` pass through) and behaves like the trainer:

* resolves its rank with ``resolve_dist_env``, exports the torch variables and initializes a real
  gloo process group over ``env://`` when the world has more than one rank;
* ``stage=train`` (or no stage): runs ``standin.steps`` steps of ``standin.step_sleep`` seconds
  (``standin.step_sleep_after_restart`` once requeued),
  writes ``run_dir/checkpoints/step-N`` (complete directory renamed into place, then
  ``checkpoints/latest`` rewritten atomically) every ``standin.ckpt_every`` steps, resumes from
  ``checkpoints/latest`` with ``resume=auto``, and on a preemption signal agrees across ranks,
  checkpoints, requeues (rank 0) and exits with the handler's exit code;
* ``stage=data`` writes ``run_dir/data/shard-I-of-N.json`` from ``resolve_data_shard``;
* ``stage=eval`` / ``stage=export`` write ``run_dir/<stage>.json``.

Everything a test checks is in the run folder: ``ranks/*.json`` (one per rank and attempt),
``steps.log`` (rank 0: ``start``/``step``/``ckpt``/``signal``/``done`` events with the attempt number
``SLURM_RESTART_COUNT``) and ``DONE``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, when not pip-installed

from orthrus_train.launch.dist_env import export_torch_env, resolve_data_shard, resolve_dist_env  # noqa: E402
from orthrus_train.launch.preemption import any_rank, shared_handler  # noqa: E402


def parse_overrides(argv: list[str]) -> dict[str, str]:
    out = {}
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            out[key.lstrip("+")] = value
    return out


def event(run_dir: Path, **fields) -> None:
    fields = {"t": round(time.time(), 3), **fields}
    with open(run_dir / "steps.log", "a") as f:
        f.write(json.dumps(fields) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    tag = latest.read_text().strip()
    state = json.loads((run_dir / "checkpoints" / tag / "state.json").read_text())
    return int(state["step"])


def save_checkpoint(run_dir: Path, step: int, attempt: int) -> None:
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step-{step}"
    if final.exists():
        return
    tmp = ckpts / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()
    (tmp / "state.json").write_text(json.dumps({"step": step, "attempt": attempt}))
    os.replace(tmp, final)
    latest_tmp = ckpts / f".latest.tmp{os.getpid()}"
    latest_tmp.write_text(f"step-{step}\n")
    os.replace(latest_tmp, ckpts / "latest")


def main(argv: list[str]) -> int:
    args = parse_overrides(argv)
    # First thing, as the CLI should: a warning during start-up must not kill the task.
    handler = shared_handler(requeue_enabled=args.get("standin.requeue", "true") == "true")
    run_dir = Path(args["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    stage = args.get("stage", "all")
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)

    d = resolve_dist_env()
    export_torch_env(d)
    dist = None
    if d.world_size > 1:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=120))
        t = torch.tensor([d.rank])
        dist.all_reduce(t)
        rank_sum = int(t.item())
    else:
        rank_sum = 0

    (run_dir / "ranks").mkdir(exist_ok=True)
    write_json_atomic(
        run_dir / "ranks" / f"{stage}-attempt{attempt}-rank{d.rank}.json",
        {
            **d.as_dict(),
            "allreduce_rank_sum": rank_sum,
            "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
            "argv": argv,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        },
    )

    if stage == "data":
        shard = resolve_data_shard(dist=d)
        (run_dir / "data").mkdir(exist_ok=True)
        write_json_atomic(
            run_dir / "data" / f"shard-{shard.index}-of-{shard.count}.json",
            {"index": shard.index, "count": shard.count, "source": shard.source, "t": time.time()},
        )
        return 0
    if stage in ("eval", "export"):
        if d.rank == 0:
            write_json_atomic(run_dir / f"{stage}.json", {"t": time.time(), "job": os.environ.get("SLURM_JOB_ID")})
        return 0

    steps = int(args.get("standin.steps", "6"))
    step_sleep = float(args.get("standin.step_sleep", "0"))
    if attempt > 0:  # lets a test make a requeued attempt finish before the next warning
        step_sleep = float(args.get("standin.step_sleep_after_restart", step_sleep))
    ckpt_every = int(args.get("standin.ckpt_every", "1"))

    start = latest_step(run_dir) if args.get("resume") == "auto" else 0
    if d.rank == 0:
        event(run_dir, ev="start", step=start, attempt=attempt, world=d.world_size)
    last_saved = start
    for step in range(start + 1, steps + 1):
        time.sleep(step_sleep)  # the "training step"
        if d.rank == 0:
            event(run_dir, ev="step", step=step, attempt=attempt)
        if step % ckpt_every == 0 or step == steps:
            if d.rank == 0:
                save_checkpoint(run_dir, step, attempt)
                event(run_dir, ev="ckpt", step=step, attempt=attempt)
            last_saved = step
        if dist is not None:
            dist.barrier()
        if any_rank(handler.should_checkpoint_and_exit):
            if last_saved != step and d.rank == 0:
                save_checkpoint(run_dir, step, attempt)
                event(run_dir, ev="ckpt", step=step, attempt=attempt)
            if dist is not None:
                dist.barrier()
            if d.rank == 0:
                sig = handler.received_signal
                requeued = handler.requeue()
                event(run_dir, ev="signal", step=step, attempt=attempt,
                      signal=sig.name if sig else "peer", requeued=requeued)
            if dist is not None:
                dist.destroy_process_group()
            return handler.exit_code or 143  # a peer's signal: exit like SIGTERM
    if d.rank == 0:
        event(run_dir, ev="done", step=steps, attempt=attempt)
        (run_dir / "DONE").write_text(f"{steps}\n")
    if dist is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
