"""Shared test fixtures: a tiny run folder with packed data, made once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
os.environ.setdefault("ORTHRUS_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Triton fixes interpreter-vs-GPU mode when a kernel is decorated, i.e. at the first import of
# orthrus_kernels, whichever test module triggers it. Decide it once, here, before any test module
# is collected: on a CPU-only machine build the kernels for the interpreter (so tests/kernels runs
# the real kernel code), then unset the variable so backend="auto" keeps every other test (and every
# subprocess) on the torch path; tests/kernels/conftest.py sets it again around its own tests.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import orthrus_kernels  # noqa: F401
        except ImportError:
            pass
        finally:
            del os.environ["TRITON_INTERPRET"]

# Small settings on top of the tiny recipe, shared by the training tests.
TINY_FAST = ["data.num_samples=40", "data.holdout_count=4", "data.max_new_tokens=40", "train.seq_len=128",
             "train.anchors_per_row=8", "train.micro_batch=2", "train.global_batch=4", "train.max_steps=6",
             "train.save_every=2", "train.wandb.mode=disabled", "heads.block_size=4"]


def free_port() -> int:
    """A TCP port free on this machine now, for a test's torch.distributed.run rendezvous (a fixed port fails the
    test whenever another run on the machine holds it: seen with two test runs side by side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthrus(*args, cwd=None, env=None, timeout=600, check=True):
    e = dict(os.environ, ORTHRUS_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "orthrus_train", *args], cwd=cwd or REPO, env=e, text=True,
                       capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"orthrus_train {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A run folder holding only the data stage of the tiny recipe (copied per test that trains)."""
    run = tmp_path_factory.mktemp("tiny-data") / "run"
    orthrus("recipe=tiny", f"run_dir={run}", "stage=data", *TINY_FAST)
    return run


@pytest.fixture
def tiny_run(tiny_data, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_data, run)
    return run


@pytest.fixture
def record_engine_flag(monkeypatch):
    """install(module, name, flag) -> list: module.<name> (an engine class) is replaced by a builder that
    records the keyword `flag` of every build and builds with it False: the wiring of a compile setting is
    under test, not inductor on the CPU."""
    def install(module, name: str, flag: str) -> list:
        seen, real = [], getattr(module, name)

        def building(*a, **k):
            seen.append(k.pop(flag, False))
            return real(*a, **{flag: False}, **k)
        monkeypatch.setattr(module, name, building)
        return seen
    return install
