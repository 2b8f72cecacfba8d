"""Backend selection shared by every front door in ``orthrus_kernels``.

Why this exists: the same call site must run on a CUDA box (Triton), on a CPU test box under
``TRITON_INTERPRET=1`` (Triton interpreter, slow but exercising the real kernel code) and on a
plain CPU box without Triton (pure torch). Callers say ``backend="auto"`` and never branch.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU-only installs fall back to torch.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton reads TRITON_INTERPRET when a kernel is *decorated*, i.e. when orthrus_kernels is
# imported (its __init__ imports every kernel module right after this one), so the mode the
# kernels were built in is frozen here; later changes of the variable cannot change it.
KERNELS_INTERPRETED = HAS_TRITON and _env_interpret()


def interpreting() -> bool:
    """True when this process's kernels were built for the Triton CPU interpreter."""
    return KERNELS_INTERPRETED


def triton_unusable_reason(*tensors: torch.Tensor) -> str | None:
    """Why a kernel requested explicitly (not through ``backend="auto"``) cannot run on these tensors here (None:
    it can): Triton on CUDA tensors, or kernels built for the interpreter while ``TRITON_INTERPRET`` is still set
    (the interpreter checks it again at every launch)."""
    if not HAS_TRITON:
        return "triton is not importable"
    if KERNELS_INTERPRETED:
        if not _env_interpret():
            return "the kernels were built for the Triton interpreter but TRITON_INTERPRET is not set now"
        return None
    if not all(t.is_cuda for t in tensors):
        return "the tensors are not on a CUDA device"
    return None


def triton_usable(*tensors: torch.Tensor) -> bool:
    """Whether backend="triton" can run on these tensors (CUDA, or interpreter-built kernels)."""
    return HAS_TRITON and (KERNELS_INTERPRETED or all(t.is_cuda for t in tensors))


def resolve_backend(backend: str, *tensors: torch.Tensor, triton_dtypes=None) -> str:
    """Map ``auto`` to a concrete backend; refuse ``triton`` where it cannot run.

    ``auto`` picks Triton for CUDA tensors in a dtype the kernels were written for, and for CPU
    tensors only while ``TRITON_INTERPRET`` is set (then the interpreter runs the real kernel
    code, slowly: a test tool, never a silent CPU default). float64 goes to torch because the
    kernels accumulate in float32 and float64 is only used for reference checks.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    dtype_ok = triton_dtypes is None or all(t.dtype in triton_dtypes for t in tensors)
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not importable")
        if not triton_usable(*tensors):
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "orthrus_kernels is first imported"
            )
        if not dtype_ok:
            raise TypeError(f"triton backend supports {triton_dtypes}, got {[t.dtype for t in tensors]}")
        return "triton"
    if KERNELS_INTERPRETED:
        ok = _env_interpret()
    else:
        ok = HAS_TRITON and all(t.is_cuda for t in tensors)
    return "triton" if (ok and dtype_ok) else "torch"


_SM_COUNTS: dict[torch.device, int] = {}  # a plain dict, not lru_cache: compiled steps trace the lookup


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the grid-size heuristics' unit); 4 elsewhere (the CPU
    interpreter), so that the heuristics still take their multi-program paths in tests."""
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                              if device.type == "cuda" else 4)
    return _SM_COUNTS[device]
