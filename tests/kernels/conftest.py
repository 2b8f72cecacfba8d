"""Make ``orthrus_kernels`` importable from the source tree and run Triton in its interpreter.

``TRITON_INTERPRET`` must be set before triton decorates the kernels (at import of
``orthrus_kernels``), hence at conftest import time. Set ``TRITON_INTERPRET=0`` in the
environment to test the torch-only fallback instead (Triton tests then skip on CPU).
"""

import importlib.util
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

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
