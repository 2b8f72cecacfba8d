"""Helpers for the Slurm tests (imported by conftest.py and the tests; a unique module name)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # when the package is not pip-installed
    sys.path.insert(0, str(REPO))

STANDIN = Path(__file__).resolve().parent / "standin_train.py"
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
}
USABLE_NODE_STATES = ("idle", "mixed", "allocated", "completing")


def cluster_problem() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (start a local cluster with .ci/slurm_setup.sh as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if out.returncode != 0:
        return f"sinfo exited {out.returncode}: {out.stderr.strip()} (is slurmctld running? .ci/slurm_setup.sh)"
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    usable = [n for n in nodes if n[0].rstrip("*~#!%$@^-") in USABLE_NODE_STATES]
    if not usable:
        states = ", ".join(n[0] for n in nodes) or "no nodes"
        return f"sinfo shows no usable node ({states}); run .ci/slurm_setup.sh"
    if max(int(re.sub(r"\D", "", n[1]) or 0) for n in usable) < 2:
        return "no Slurm node has 2 CPUs (the tests run 2 tasks of 1 CPU)"
    return None


class Cluster:
    """Submit, wait for and inspect jobs on the local test cluster; cancels leftovers at teardown."""

    def __init__(self):
        self.jobs: list[str] = []

    def track(self, job_id: str) -> str:
        self.jobs.append(str(job_id))
        return str(job_id)

    def show(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict ({} once the job record is gone)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
        if out.returncode != 0:
            return {}
        fields = {}
        for item in re.findall(r"(\S+?)=(\S*)", out.stdout.splitlines()[0] if out.stdout else ""):
            fields.setdefault(item[0], item[1])
        return fields

    def state(self, job_id: str) -> str:
        return self.show(job_id).get("JobState", "GONE")

    def wait(self, job_id: str, timeout: float, logs: list[Path] = ()) -> dict[str, str]:
        """Wait until the job reaches a terminal state; fail with its log on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.show(job_id)
            if not info or info.get("JobState") in TERMINAL_STATES:
                return info
            time.sleep(1.0)
        subprocess.run(["scancel", str(job_id)], capture_output=True)
        pytest.fail(f"job {job_id} not finished after {timeout:.0f}s ({self.state(job_id)})\n{tail_logs(logs)}")

    def wait_for(self, predicate, timeout: float, what: str, job_id: str | None = None, logs=()) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if job_id is not None and self.state(job_id) in TERMINAL_STATES:
                pytest.fail(f"job {job_id} ended ({self.state(job_id)}) before {what}\n{tail_logs(logs)}")
            time.sleep(0.3)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tail_logs(logs)}")

    def cancel_all(self) -> None:
        live = [j for j in self.jobs if self.state(j) not in TERMINAL_STATES | {"GONE"}]
        if live:
            subprocess.run(["scancel", *live], capture_output=True)


def tail_logs(paths, chars: int = 4000) -> str:
    out = []
    for p in paths:
        for f in sorted(Path(p).parent.glob(Path(p).name)) if any(c in str(p) for c in "*?") else [Path(p)]:
            if f.exists():
                out.append(f"---- {f} ----\n{f.read_text(errors='replace')[-chars:]}")
    return "\n".join(out) or "(no log files)"


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
