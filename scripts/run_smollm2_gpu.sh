#!/usr/bin/env bash
# The real-model run (issue 10) on one GPU: regenerate -> train Orthrus -> eval; then the Medusa
# baseline on the same data and budget -> eval. Reports, metrics and logs are collected in
# RUN_ROOT/results and packed into OUT/results.tgz after every phase (a device run returns at most
# 8 files, so everything travels as one archive); OUT/phases.txt and OUT/comparison.md sit beside it.
#   bash scripts/run_smollm2_gpu.sh GGUF_PATH RUN_ROOT OUT [phase ...]
# phases: data orthrus_train orthrus_eval medusa_train medusa_eval (default: all, in that order);
# "orthrus" / "medusa" = train then eval. Each phase resumes what an earlier call left. PHASE_TIMEOUT
# (seconds) stops a phase that runs too long and still packs what it wrote (the eval writes its engine
# numbers before the slow transformers reference).
set -uo pipefail
GGUF=${1:?gguf path}; ROOT=${2:?run root}; FINAL=${3:?out dir}; shift 3
PHASES=${*:-data orthrus_train orthrus_eval medusa_train medusa_eval}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 ORTHRUS_NO_PROGRESS=1 WANDB_MODE=disabled
OUT="$ROOT/results"
mkdir -p "$OUT" "$ROOT" "$FINAL"
pack() { tar czf "$FINAL/results.tgz" -C "$ROOT" results; cp "$OUT/phases.txt" "$FINAL/" 2>/dev/null; }
COMMON=(recipe=smollm2-135m "model.path=$GGUF" train.wandb.mode=disabled
        data.num_samples=${NUM_SAMPLES:-3000} data.max_new_tokens=${MAX_NEW:-192} data.batch_size=256
        train.global_batch=16 train.micro_batch=16 train.epochs=${EPOCHS:-3} train.lr=5e-4 train.save_every=100
        eval.num_prompts=${EVAL_N:-100} eval.max_new_tokens=${EVAL_NEW:-128} eval.batch_size=${EVAL_BS:-16}
        eval.lossless.ks_min_tokens=${KS_TOKENS:-100000} eval.lossless.greedy_prompts=${EVAL_N:-100}
        eval.hf_generate_prompts=${HF_N:-32})
run() { local name=$1; shift; local t0=$(date +%s)
  timeout -s INT -k 20 ${PHASE_TIMEOUT:-100000} python -m orthrus_train "${COMMON[@]}" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/phases.txt"; tail -25 "$OUT/$name.log"; return $rc; }
collect() { local h=$1; cp "$ROOT/$h/eval/report.json" "$OUT/${h}_report.json" 2>/dev/null
  cp "$ROOT/$h/eval/report.md" "$OUT/${h}_report.md" 2>/dev/null;
  for f in "$ROOT/$h/eval/"*.png; do [ -f "$f" ] && cp "$f" "$OUT/${h}_$(basename "$f")"; done
  cp "$ROOT/$h/metrics.jsonl" "$OUT/${h}_metrics.jsonl" 2>/dev/null
  cp "$ROOT/$h/train_summary.json" "$OUT/${h}_train_summary.json" 2>/dev/null
  cp "$ROOT/orthrus/data/report.json" "$OUT/data_report.json" 2>/dev/null; }
MEDUSA=(heads=medusa heads.block_size=16)
for ph in $PHASES; do case $ph in
  data) run data "run_dir=$ROOT/orthrus" stage=data ;;
  orthrus_train) run orthrus "run_dir=$ROOT/orthrus" stage=train ;;
  orthrus_eval) run orthrus_eval "run_dir=$ROOT/orthrus" stage=eval eval.hf_generate_reference=true ;;
  orthrus) run orthrus "run_dir=$ROOT/orthrus" stage=train && run orthrus_eval "run_dir=$ROOT/orthrus" stage=eval \
             eval.hf_generate_reference=true ;;
  medusa_train|medusa)
    mkdir -p "$ROOT/medusa"; [ -d "$ROOT/medusa/data" ] || cp -r "$ROOT/orthrus/data" "$ROOT/orthrus/tokenizer" "$ROOT/medusa/"
    run medusa "run_dir=$ROOT/medusa" "${MEDUSA[@]}" stage=train && [ "$ph" = medusa ] && \
      run medusa_eval "run_dir=$ROOT/medusa" "${MEDUSA[@]}" stage=eval ;;
  medusa_eval) run medusa_eval "run_dir=$ROOT/medusa" "${MEDUSA[@]}" stage=eval ;;
  *) echo "unknown phase $ph" | tee -a "$OUT/phases.txt" ;;
esac; collect orthrus; collect medusa; pack; done
if [ -f "$OUT/orthrus_report.json" ] && [ -f "$OUT/medusa_report.json" ]; then
  python "$(dirname "$0")/compare_reports.py" orthrus="$OUT/orthrus_report.json" medusa="$OUT/medusa_report.json" \
    | tee "$OUT/comparison.md"
  cp "$OUT/comparison.md" "$FINAL/"
fi
pack
