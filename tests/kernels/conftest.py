"""Make ``orthrus_kernels`` importable from the source tree; on CPU, build its kernels for the
Triton interpreter so ``backend="triton"`` tests run the real kernel code.

Triton decides interpreter vs GPU when a kernel is decorated (at ``import orthrus_kernels``) and
checks the variable again while interpreting, so it is set for that import and, through an
autouse fixture, for each test in this folder only: the rest of a full test session runs with it
unset, so ``backend="auto"`` keeps CPU tensors on torch there (other suites' decode loops stay
fast). With CUDA present, the kernels are compiled for the GPU and the Triton tests move their
inputs there. ``TRITON_INTERPRET=0`` in the environment tests the torch-only fallback (Triton
tests then skip on CPU).
"""

import importlib.util
import os
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_user_value = os.environ.get("TRITON_INTERPRET")
_INTERPRET = _user_value is None and not torch.cuda.is_available()
if _INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    _found = importlib.util.find_spec("orthrus_kernels")
    # A stale editable install (made before kernels/__init__.py existed) resolves the name to an
    # empty namespace package; load the source tree's package explicitly in that case too.
    if _found is None or _found.origin is None:
        _pkg_dir = os.path.join(_ROOT, "kernels")
        _spec = importlib.util.spec_from_file_location(
            "orthrus_kernels", os.path.join(_pkg_dir, "__init__.py"), submodule_search_locations=[_pkg_dir]
        )
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules["orthrus_kernels"] = _mod
        _spec.loader.exec_module(_mod)
    import orthrus_kernels  # noqa: F401
finally:
    if _user_value is None:
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(autouse=True)
def _triton_interpreter_for_this_folder(monkeypatch):
    if _INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
