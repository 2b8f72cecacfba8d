"""Build a wheelhouse for an air-gapped GPU cluster (or the lent GPU machines, which reach no index).

Downloads binary wheels for a target Python version and platform of the dependencies a typical CUDA
image lacks, builds pure-Python wheels for the ones PyPI ships only as source (DeepSpeed with
DS_BUILD_OPS=0, antlr4-python3-runtime 4.9.3), and prints the offline install command.

    python scripts/build_wheelhouse.py --out wheelhouse --python 3.12 [--with wandb datasets]
    # then, on the cluster:
    pip install --no-index --find-links wheelhouse deepspeed hydra-core omegaconf ...

Torch, CUDA libraries and transformers are deliberately not included: the cluster's own CUDA build
of torch stays in charge.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# name==version (None: newest) -> what we need beyond torch/transformers/safetensors/numpy/pyarrow
BINARY = {
    "hydra-core": "1.3.2", "omegaconf": "2.3.0", "pyyaml": None, "hjson": None, "pydantic": None,
    "pydantic-core": None, "annotated-types": None, "typing-inspection": None, "gguf": None,
    "py-cpuinfo": None, "msgpack": None, "ninja": None,
}
SOURCE_ONLY = {"deepspeed": None, "antlr4-python3-runtime": "4.9.3"}
OPTIONAL = {
    "wandb": ["wandb", "sentry-sdk", "gitpython", "gitdb", "smmap", "docker-pycreds", "setproctitle", "platformdirs",
              "protobuf", "click"],
    "datasets": ["datasets", "dill", "multiprocess", "xxhash", "fsspec", "aiohttp", "huggingface-hub", "pandas"],
    # the GPU-only tests on the cluster (python -m pytest tests/model/test_decode_attn.py ...); packaging is in
    # every image that has transformers
    "test": ["pytest", "pluggy", "iniconfig", "pygments", "pytest-timeout"],
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64", "any"]


def spec(name: str, version: str | None) -> str:
    return f"{name}=={version}" if version else name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="wheelhouse")
    ap.add_argument("--python", default="3.12", help="target Python version, e.g. 3.12")
    ap.add_argument("--with", dest="extras", nargs="*", default=[], choices=sorted(OPTIONAL),
                    help="optional groups (wandb, datasets, test)")
    ap.add_argument("--skip", nargs="*", default=[], help="package names the target image already has")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pyver = args.python.replace(".", "")
    names = {k: v for k, v in BINARY.items() if k not in args.skip}
    for group in args.extras:
        names.update({n: None for n in OPTIONAL[group] if n not in args.skip})
    plat = sum((["--platform", p] for p in PLATFORMS), [])
    for name, ver in names.items():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               args.python, "--implementation", "cp", "--abi", f"cp{pyver}", "--abi", "abi3", "--abi", "none",
               *plat, "-d", str(out), spec(name, ver)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"[wheelhouse] could not download {spec(name, ver)}:\n{r.stderr[-800:]}", file=sys.stderr)
            return 1
        print(f"[wheelhouse] {spec(name, ver)}")
    env = dict(os.environ, DS_BUILD_OPS="0")  # DeepSpeed: pure Python; ops are JIT-built on the cluster if used
    for name, ver in SOURCE_ONLY.items():
        if name in args.skip:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), spec(name, ver)],
                               cwd=tmp, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"[wheelhouse] could not build {spec(name, ver)}:\n{r.stderr[-800:]}", file=sys.stderr)
            return 1
        print(f"[wheelhouse] built {spec(name, ver)} (pure Python)")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"\n{len(wheels)} wheels, {total / 2**20:.1f} MiB in {out}/")
    print("\nOffline install on the cluster (same Python version):")
    print(f"  python -m pip install --no-index --no-deps {out}/*.whl && python -m pip install --no-index --no-deps -e .")
    print("or, without touching the environment:")
    print(f"  python -m pip install --no-index --no-deps --target /tmp/site {out}/*.whl && export PYTHONPATH=/tmp/site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
