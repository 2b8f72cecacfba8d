"""Turn Slurm's warning signal (and SIGTERM) into "checkpoint, requeue, exit".

Usage in a training loop (the trainer owns the loop; this module only owns the signal facts)::

    handler = PreemptionHandler(requeue_enabled=cfg.launcher.requeue).install()
    for step in ...:
        train_step()
        if any_rank(handler.should_checkpoint_and_exit):   # every rank takes the same branch
            save_checkpoint(step)                          # complete before anything else
            handler.requeue()                              # no-op except on rank 0 under Slurm
            sys.exit(handler.exit_code)

Which signal means what:

* ``SIGUSR1`` is the warning the sbatch script asks for (``#SBATCH --signal=USR1@120``): the time
  limit is near. We checkpoint and, on rank 0, ``scontrol requeue $SLURM_JOB_ID``: the job goes back
  to the queue and resumes from that checkpoint (``resume=auto``).
* ``SIGTERM`` means Slurm (or a person) is ending the job now: ``scancel``, ``scontrol requeue``,
  preemption, or the time limit itself. We checkpoint within ``KillWait`` (default 30 s) and exit.
  We do *not* requeue by default: after ``scancel`` the user wants the job gone, and after
  ``scontrol requeue`` or a preemption with ``PreemptMode=REQUEUE`` Slurm requeues it already.

The signal handler only records the signal number; all I/O happens in the trainer's thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import threading
from typing import Iterable, Mapping

from orthrus_train.launch.dist_env import DistEnvError, resolve_dist_env

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
DEFAULT_REQUEUE_ON = (signal.SIGUSR1,)


_AT_EXIT_REGISTERED = False


def _ignore_late_warning_at_exit() -> None:
    """At interpreter exit Python resets its signal handlers to SIG_DFL, and SIGUSR1's default
    action kills the process: a Slurm warning during shutdown would turn a finished run into a
    failed job (and cancel the stages that depend on it). Ignore SIGUSR1 from then on."""
    global _AT_EXIT_REGISTERED
    if _AT_EXIT_REGISTERED:
        return
    _AT_EXIT_REGISTERED = True

    def ignore() -> None:
        handler = signal.getsignal(signal.SIGUSR1)
        if handler in (signal.SIG_DFL, None) or isinstance(getattr(handler, "__self__", None), PreemptionHandler):
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    atexit.register(ignore)


class PreemptionHandler:
    """Records SIGUSR1/SIGTERM; tells the trainer to checkpoint and exit; requeues once.

    Args:
        requeue_enabled: allow :meth:`requeue` to call ``scontrol requeue`` (``launcher.requeue``).
        signals: signals to catch.
        requeue_on: signals after which :meth:`requeue` requeues (default: only the SIGUSR1 warning).
        environ: environment to read ``SLURM_JOB_ID`` and the rank from (default ``os.environ``).
        rank: this process's global rank; default: :func:`resolve_dist_env` of ``environ``.
        scontrol: the scontrol executable (a path or a name on PATH).
    """

    def __init__(
        self,
        requeue_enabled: bool = True,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        requeue_on: Iterable[int] = DEFAULT_REQUEUE_ON,
        environ: Mapping[str, str] | None = None,
        rank: int | None = None,
        scontrol: str = "scontrol",
    ):
        self.requeue_enabled = bool(requeue_enabled)
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.requeue_on = frozenset(signal.Signals(s) for s in requeue_on)
        self._environ = environ
        self._rank = rank
        self.scontrol = scontrol
        self._first_signum: int | None = None
        self._count = 0
        self._previous: dict[signal.Signals, object] = {}
        self._requeue_attempted = False
        self.requeued = False

    # ------------------------------------------------------------------ installation

    def install(self) -> "PreemptionHandler":
        """Register the handlers (main thread only). Returns ``self``."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread (Python signal rule)")
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        _ignore_late_warning_at_exit()
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`.

        Exception: where SIGUSR1 had its default action (terminate), it is left *ignored*: a
        warning that arrives while the process finishes must not turn a completed run into a
        failed job.
        """
        for sig, previous in self._previous.items():
            if sig == signal.SIGUSR1 and previous in (signal.SIG_DFL, None):
                previous = signal.SIG_IGN
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        # Only record: no logging, no I/O, no locks (the main thread may be inside any of them).
        if self._first_signum is None:
            self._first_signum = signum
        self._count += 1

    # ------------------------------------------------------------------ state

    @property
    def should_checkpoint_and_exit(self) -> bool:
        """True once any of the caught signals arrived (on this process; see :func:`any_rank`)."""
        return self._first_signum is not None

    @property
    def received_signal(self) -> signal.Signals | None:
        """The first signal received, or None."""
        return None if self._first_signum is None else signal.Signals(self._first_signum)

    @property
    def signal_count(self) -> int:
        return self._count

    @property
    def exit_code(self) -> int:
        """``128 + signal`` (the shell's convention: 138 for SIGUSR1, 143 for SIGTERM), 0 if none.

        Non-zero so that a stage stopped early never satisfies a later stage's ``afterok``
        dependency; a requeued job's exit code is not recorded as final by Slurm anyway.
        """
        return 0 if self._first_signum is None else 128 + int(self._first_signum)

    def _env(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def _resolve_rank(self) -> int:
        if self._rank is not None:
            return self._rank
        try:
            return resolve_dist_env(self._env()).rank
        except DistEnvError as e:  # a broken env must not stop the checkpoint-and-exit path
            log.warning("preemption: cannot resolve rank (%s); assuming not rank 0", e)
            return -1

    # ------------------------------------------------------------------ requeue

    def requeue(self) -> bool:
        """Requeue this Slurm job once; call after the checkpoint is complete.

        Acts only when all hold: a signal in ``requeue_on`` was received, requeue is enabled,
        ``SLURM_JOB_ID`` is set, this is rank 0, and it was not attempted before. Logs what it did or
        why not. Returns True when ``scontrol requeue`` succeeded.
        """
        sig = self.received_signal
        env = self._env()
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if self._requeue_attempted:
            return self.requeued
        if sig is None:
            log.debug("preemption: no signal received; not requeueing")
            return False
        if not self.requeue_enabled:
            log.info("preemption: got %s; requeue disabled (launcher.requeue=false), exiting", sig.name)
            return False
        if sig not in self.requeue_on:
            log.info("preemption: got %s; Slurm ends or requeues the job itself, not requeueing", sig.name)
            return False
        if not job_id:
            log.info("preemption: got %s outside Slurm (no SLURM_JOB_ID); not requeueing", sig.name)
            return False
        if self._resolve_rank() != 0:
            return False
        self._requeue_attempted = True
        exe = shutil.which(self.scontrol) if os.sep not in self.scontrol else self.scontrol
        if exe is None:
            log.error("preemption: cannot requeue job %s: %r not found on PATH", job_id, self.scontrol)
            return False
        cmd = [exe, "requeue", str(job_id)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("preemption: %s failed: %s", " ".join(cmd), e)
            return False
        if proc.returncode != 0:
            log.error(
                "preemption: %s exited %d: %s", " ".join(cmd), proc.returncode, (proc.stderr or proc.stdout).strip()
            )
            return False
        self.requeued = True
        log.warning("preemption: got %s; requeued Slurm job %s (%s)", sig.name, job_id, " ".join(cmd))
        return True


_SHARED: PreemptionHandler | None = None


def shared_handler(requeue_enabled: bool | None = None) -> PreemptionHandler:
    """The process-wide handler, installed on the first call (main thread) and reused after.

    Install it first thing in a Slurm task (before imports that take long and in stages that do
    not checkpoint): SIGUSR1's default action is to terminate the process, so a warning that
    arrives before a handler exists kills the task instead of asking it to checkpoint. Later
    callers, e.g. the trainer, get the same instance, including a signal already received.
    ``requeue_enabled`` updates the setting when given.
    """
    global _SHARED
    if _SHARED is None:
        _SHARED = PreemptionHandler(requeue_enabled=True if requeue_enabled is None else requeue_enabled)
    elif requeue_enabled is not None:
        _SHARED.requeue_enabled = bool(requeue_enabled)
    return _SHARED.install()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if ``flag`` is True on any rank (a collective: call it on all ranks).

    Uses an all-reduce (MAX) when ``torch.distributed`` is initialized with more than one rank;
    otherwise returns ``flag``. The tensor lives on the current CUDA device for NCCL, else on CPU.
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency of the project
        return bool(flag)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
        return bool(flag)
    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
