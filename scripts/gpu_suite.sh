#!/usr/bin/env bash
# Run the GPU test subset and the GPU benchmarks in one go; results (JSON + logs) go to OUTDIR.
#   bash scripts/gpu_suite.sh OUTDIR [quick|full]
# Needs the project's Python dependencies (see scripts/build_wheelhouse.py for air-gapped machines).
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR [quick|full]}
MODE=${2:-quick}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 ORTHRUS_NO_PROGRESS=1 WANDB_MODE=disabled
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" > "$OUT/versions.txt"
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
[ -f scripts/bench_kernels.py ] && python scripts/bench_kernels.py --out "$OUT/bench_kernels.json" > "$OUT/bench_kernels.log" 2>&1
python scripts/bench_decode.py --random-shape qwen3-0.6b --n 8 --batch-sizes 1 8 --max-new-tokens 128 \
  --out "$OUT/bench_decode.json" > "$OUT/bench_decode.log" 2>&1
for shape in qwen3-0.6b qwen3-1.7b; do
  python scripts/bench_train.py --shape $shape --steps 5 --out "$OUT/bench_train_$shape.json" > "$OUT/bench_train_$shape.log" 2>&1
done
if [ "$MODE" = full ]; then
  for shape in qwen3-4b qwen3-8b; do
    python scripts/bench_train.py --shape $shape --steps 5 --out "$OUT/bench_train_$shape.json" > "$OUT/bench_train_$shape.log" 2>&1
  done
fi
python - "$OUT" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
rows = {os.path.basename(f): json.load(open(f)) for f in sorted(glob.glob(f"{out}/*.json"))}
json.dump(rows, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps({k: {kk: v.get(kk) for kk in ("tokens_per_s", "mfu", "peak_mem_gb_rank0")} for k, v in rows.items() if isinstance(v, dict)}, indent=1))
PY
