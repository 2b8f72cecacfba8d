"""The top-level kernels/ folder must not break transformers when the repo root is on sys.path."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_repo_root_kernels_folder_is_inert_for_transformers():
    code = ("import kernels, transformers.utils.import_utils as iu; "
            "assert kernels.__version__ == '0.0.0' and not hasattr(kernels, 'fused_linear_kl'); "
            "assert not iu.is_kernels_available(); "
            "from transformers import Qwen3ForCausalLM, LlamaForCausalLM; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]


def test_installed_name_exports_the_kernels():
    import orthrus_kernels
    assert callable(orthrus_kernels.fused_linear_kl) and callable(orthrus_kernels.fused_linear_ce)
