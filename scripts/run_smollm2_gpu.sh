#!/usr/bin/env bash
# The real-model run (issue 10) on one GPU: regenerate -> train Orthrus -> eval; then the Medusa
# baseline on the same data and budget -> eval. Reports, metrics and logs are collected in
# RUN_ROOT/results and packed into OUT/results.tgz after every phase (a device run returns at most
# 8 files, so everything travels as one archive); OUT/phases.txt and OUT/comparison.md sit beside it.
#   bash scripts/run_smollm2_gpu.sh GGUF_PATH RUN_ROOT OUT [phase ...]
# phases: data orthrus medusa (default: all three). Each phase resumes what an earlier call left.
set -uo pipefail
GGUF=${1:?gguf path}; ROOT=${2:?run root}; FINAL=${3:?out dir}; shift 3
PHASES=${*:-data orthrus medusa}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 ORTHRUS_NO_PROGRESS=1 WANDB_MODE=disabled
OUT="$ROOT/results"
mkdir -p "$OUT" "$ROOT" "$FINAL"
pack() { tar czf "$FINAL/results.tgz" -C "$ROOT" results; cp "$OUT/phases.txt" "$FINAL/" 2>/dev/null; }
COMMON=(recipe=smollm2-135m "model.path=$GGUF" train.wandb.mode=disabled
        data.num_samples=${NUM_SAMPLES:-3000} data.max_new_tokens=${MAX_NEW:-192} data.batch_size=256
        train.global_batch=16 train.micro_batch=16 train.epochs=${EPOCHS:-3} train.lr=5e-4 train.save_every=100
        eval.num_prompts=${EVAL_N:-100} eval.max_new_tokens=${EVAL_NEW:-128} eval.batch_size=${EVAL_BS:-16}
        eval.lossless.ks_min_tokens=${KS_TOKENS:-100000} eval.hf_generate_reference=true)
run() { local name=$1; shift; local t0=$(date +%s)
  python -m orthrus_train "${COMMON[@]}" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "[$name] rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/phases.txt"; tail -25 "$OUT/$name.log"; return $rc; }
for ph in $PHASES; do case $ph in
  data) run data "run_dir=$ROOT/orthrus" stage=data ;;
  orthrus) run orthrus "run_dir=$ROOT/orthrus" stage=train && run orthrus_eval "run_dir=$ROOT/orthrus" stage=eval
           cp "$ROOT/orthrus/eval/report.json" "$OUT/orthrus_report.json" 2>/dev/null
           cp "$ROOT/orthrus/eval/report.md" "$OUT/orthrus_report.md" 2>/dev/null
           cp "$ROOT/orthrus/metrics.jsonl" "$OUT/orthrus_metrics.jsonl" 2>/dev/null
           cp "$ROOT/orthrus/data/report.json" "$OUT/data_report.json" 2>/dev/null ;;
  medusa) mkdir -p "$ROOT/medusa"; [ -d "$ROOT/medusa/data" ] || cp -r "$ROOT/orthrus/data" "$ROOT/orthrus/tokenizer" "$ROOT/medusa/"
          run medusa "run_dir=$ROOT/medusa" heads=medusa heads.block_size=16 stage=train && run medusa_eval "run_dir=$ROOT/medusa" heads=medusa heads.block_size=16 stage=eval
          cp "$ROOT/medusa/eval/report.json" "$OUT/medusa_report.json" 2>/dev/null
          cp "$ROOT/medusa/eval/report.md" "$OUT/medusa_report.md" 2>/dev/null
          cp "$ROOT/medusa/metrics.jsonl" "$OUT/medusa_metrics.jsonl" 2>/dev/null ;;
esac; pack; done
if [ -f "$OUT/orthrus_report.json" ] && [ -f "$OUT/medusa_report.json" ]; then
  python "$(dirname "$0")/compare_reports.py" orthrus="$OUT/orthrus_report.json" medusa="$OUT/medusa_report.json" \
    | tee "$OUT/comparison.md"
  cp "$OUT/comparison.md" "$FINAL/"
fi
pack
