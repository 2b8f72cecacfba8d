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


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` when a kernel is *decorated*, i.e. when this package is
    imported, so the flag must be set before the first ``import orthrus_kernels``.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor, triton_dtypes=None) -> str:
    """Map ``auto`` to a concrete backend; refuse ``triton`` where it cannot run.

    ``auto`` picks Triton only where its output is trustworthy and fast: CUDA tensors (or the
    interpreter, for tests) in a dtype the kernels were written for. float64 inputs go to torch
    because the kernels accumulate in float32 and float64 is only used for reference checks.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_device = all(t.is_cuda for t in tensors) or interpreting()
    dtype_ok = triton_dtypes is None or all(t.dtype in triton_dtypes for t in tensors)
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not importable")
        if not on_device:
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "orthrus_kernels is imported"
            )
        if not dtype_ok:
            raise TypeError(f"triton backend supports {triton_dtypes}, got {[t.dtype for t in tensors]}")
        return "triton"
    return "triton" if (HAS_TRITON and on_device and dtype_ok) else "torch"
