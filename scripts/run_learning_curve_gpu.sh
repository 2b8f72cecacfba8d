#!/usr/bin/env bash
# The learning curve on the real model (issue 16), one GPU, resumable phase by phase:
#   bash scripts/run_learning_curve_gpu.sh GGUF_PATH ROOT OUT [phase ...]
# phases (default all, in order):
#   data    regenerate the training responses with the project's decode engine (every prompt of the
#           shared mix, SAMPLES responses each), ROOT/main/data
#   train   main Orthrus run (STEPS optimizer steps, a checkpoint every SAVE steps, all kept), then, on
#           the same GPU at the same time, the Medusa baseline (same data, same steps) and the ablations
#           (ABL_STEPS steps each: the base settings and each variant, all with their own full schedule)
#   eval    each budget in BUDGETS (steps of the main run) evaluated as its own run folder
#           (ROOT/curve/step-N with links to the main run's tokenizer, data and checkpoint), then Medusa
#           and the ablations; the engine's numbers only (no lossless checks, no transformers reference)
#           FIXED_BATCH_COMPARE=1: the largest budget once more with eval.continuous_batching=false
#   final   the lossless checks on the largest budget (ROOT/final); HF_REF=true adds the transformers
#           `generate` reference speed (static cache, compiled) on HF_REF_PROMPTS prompts per cell
#   collect curve.json / curve.md / curve.png into ROOT/results, packed into OUT/results.tgz
#   profile issue 17's decode-step profiles (KERNEL_TESTS=1: first the opt-in Triton kernels' tests on that GPU) (scripts/profile_decode_step.py, one JSON per shape) started in the
#           background on the side GPU; the side runs of the train phase wait for them, the main run does not. PROFILE_COMPILE="ARGS"
#           adds a compiled SmolLM2 profile with those arguments (compile seconds and per-step saving);
#           PROFILE_NOFUSE=1 profiles each shape once more with --no-fuse (<shape>_nofuse.json)
# Results are packed after every phase; after `train`, OUT/heads holds the main run's last heads (see keep_heads). Environment knobs (defaults in brackets) below.
# Two GPUs (nvidia-h200-x2): SIDE_GPU=1 puts the profiles, the Medusa baseline and the ablations (training and
# evals) on GPU 1 while the main run's data, training and curve evals use MAIN_GPU (0). MAIN_NPROC=2: the data
# stage and the main training on both GPUs instead (see on_all below); with SIDE_GPU=1 too, the side GPU then
# takes the profiles (list `profile` after `train`), KERNEL_EVAL and SIDE_BUDGETS once training is done.
# MEDUSA_RUN=0 skips the Medusa baseline, ABLATIONS=none every ablation. Budgets are evaluated largest first.
# KERNEL_EVAL="ORTHRUS_DECODE_ATTN=live ...": the largest budget once more on the side GPU with those settings
# (ROOT/kernels-step-N). SIDE_BUDGETS="N ...": those budgets are evaluated on the side GPU, the rest on MAIN_GPU.
# SIDE_EVALS="NAME:KEY=V,KEY=V ...": the largest budget once more per entry, on the side GPU, with those eval
# overrides (ROOT/NAME-step-N, results/NAME_stepN_report.json), e.g. "argmax:eval.draft_temperature=0".
# SAMPLE_T=T: data.sample_temperature (the extra samples' temperature; unset: the generation_config's).
# DATA_SEED=N: data.seed (other samples than an earlier run's). INIT_FROM=PATH: heads.init_from for the main run
# (a checkpoint folder or a copy of its heads.safetensors: continue earlier heads on new data, optimizer fresh).
# HOLDOUT=N: data.holdout_count (prompts kept out of training; with a validation metric, what it is measured on)
# DATA_EXTRA="KEY=V ...": more data-stage overrides (MAIN_EXTRA: the main training run's; EVAL_EXTRA: the curve evals',
# e.g. "eval.prefill_graphs=false").
# SELF_PROMPTS=N: data.self_prompts.count (N more training prompts written by the backbone itself, then answered like
# the others; SELF_SEED_WORDS=W: each starts with the first W words of a source prompt, keeping the mix's domains)
# MB=N: micro batch per GPU [16].
set -uo pipefail
GGUF=${1:?gguf path}; ROOT=${2:?root}; FINAL=${3:?out dir}; shift 3
PHASES=${*:-data train eval final collect}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 ORTHRUS_NO_PROGRESS=1 WANDB_MODE=disabled
HERE=$(cd "$(dirname "$0")" && pwd)
SAMPLES=${SAMPLES:-3}; MAX_NEW=${MAX_NEW:-384}; REGEN_BS=${REGEN_BS:-512}; MB=${MB:-16}
STEPS=${STEPS:-960}; SAVE=${SAVE:-30}; GB=${GB:-32}; LR=${LR:-}  # LR unset: the recipe's (smollm2-135m: 3e-3)
BUDGETS=${BUDGETS:-30 120 360 960}
ABL_STEPS=${ABL_STEPS:-240}
EVAL_N=${EVAL_N:-100}; EVAL_NEW=${EVAL_NEW:-256}; EVAL_BS=${EVAL_BS:-16}
RES="$ROOT/results"; mkdir -p "$RES" "$FINAL"
# OUT/RUNNING exists while the driver runs (removed when it ends, also after a stopped phase): a poll from a later
# device call waits on it. Not `ps | grep` / `pgrep -f` (the poll's own command line names this script, so they
# always match) nor `kill -0 PID` (a later call did not see the job's processes; session 12 lost two polls to both).
echo "$$ $(date +%s)" > "$FINAL/RUNNING"
finish() { echo "[end] rc=$1 phases: $PHASES" >> "$RES/phases.txt"; pack; rm -f "$FINAL/RUNNING"; exit "$1"; }
pack() {  # atomic: the side GPU's subshell packs too, and a poll may copy the file at any moment
  local tmp; tmp=$(mktemp "$FINAL/.results.XXXXXX") && tar czf "$tmp" -C "$ROOT" results && mv -f "$tmp" "$FINAL/results.tgz"
  cp "$RES/phases.txt" "$FINAL/" 2>/dev/null; true; }
keep_heads() {  # the main run's last heads into OUT/heads: heads.safetensors in parts (a device call returns at
  # most 8 files of 16 MiB) and one heads-meta.tar with the checkpoint's small files (COMPLETE included),
  # SHA256SUMS, the run's config.yaml and SOURCE; OUT then holds at most 7 files. A poll copies them as soon as
  # training ends, so that a lost machine loses no trained heads (session 10 lost them between two calls; session
  # 11 got 10 loose files back in two calls). Here: tar xf heads-meta.tar && cat heads.safetensors.part* >
  # heads.safetensors && sha256sum -c SHA256SUMS
  local ck="$ROOT/main/checkpoints/$(cat "$ROOT/main/checkpoints/latest" 2>/dev/null)"
  [ -f "$ck/COMPLETE" ] && [ -f "$ck/heads.safetensors" ] || return 0
  local tmp="$FINAL/.heads.tmp"; rm -rf "$tmp" && mkdir -p "$tmp/meta" || return 0
  split -b ${HEADS_PART_BYTES:-14000000} "$ck/heads.safetensors" "$tmp/heads.safetensors.part" \
    && (cd "$ck" && sha256sum heads.safetensors) > "$tmp/meta/SHA256SUMS" \
    && for f in "$ck"/*; do case $(basename "$f") in heads.safetensors|optim*|*.pt) ;; *) [ -f "$f" ] && cp "$f" "$tmp/meta/";; esac; done \
    && { cp "$ROOT/main/config.yaml" "$tmp/meta/" 2>/dev/null || true; } && echo "$ck" > "$tmp/meta/SOURCE" \
    && tar cf "$tmp/heads-meta.tar" -C "$tmp/meta" . && rm -rf "$tmp/meta" \
    && rm -rf "$FINAL/heads" && mv "$tmp" "$FINAL/heads" \
    && echo "[heads] $(basename "$ck") -> $FINAL/heads ($(ls "$FINAL/heads" | wc -l) files)" >> "$RES/phases.txt" \
    || { rm -rf "$tmp"; echo "[heads] $(basename "$ck"): copy failed" >> "$RES/phases.txt"; }; }
BASE=(recipe=${RECIPE:-smollm2-135m} "model.path=$GGUF" train.wandb.mode=disabled)  # RECIPE=tiny: CPU smoke run
DATA=(data.num_samples=all data.samples_per_prompt=$SAMPLES data.max_new_tokens=$MAX_NEW data.batch_size=$REGEN_BS
      data.regen_backend=engine ${SAMPLE_T:+data.sample_temperature=$SAMPLE_T}  # SAMPLE_T: the extra samples' T
      ${REGEN_COMPILE:+data.compile_steps=$REGEN_COMPILE}  # REGEN_COMPILE=false: no compile attempt
      ${DATA_SEED:+data.seed=$DATA_SEED} ${HOLDOUT:+data.holdout_count=$HOLDOUT}  # HOLDOUT: prompts kept out of training
      ${SELF_PROMPTS:+data.self_prompts.count=$SELF_PROMPTS}  # SELF_PROMPTS: prompts the backbone writes itself
      ${SELF_SEED_WORDS:+data.self_prompts.seed_words=$SELF_SEED_WORDS}  # ... each opening with N words of a source prompt
      ${DATA_EXTRA:-})  # DATA_EXTRA: more data-stage overrides (e.g. data.temperature=0.5)
TRAIN=(train.micro_batch=$MB train.global_batch=$GB ${LR:+train.lr=$LR} train.min_lr_ratio=0.1 train.epochs=100)
# Medusa keeps the learning rate and uniform offsets it was measured with (sessions 5 and 6)
MEDUSA=(train.lr=${MEDUSA_LR:-1e-3} train.offset_decay=0)
EVAL=(eval.num_prompts=$EVAL_N eval.max_new_tokens=$EVAL_NEW eval.batch_size=$EVAL_BS eval.lossless.enabled=false
      eval.hf_generate_reference=false eval.plots=false ${EVAL_EXTRA:-})  # EVAL_EXTRA: more eval overrides
run() { local name=$1; shift; local t0=$(date +%s)
  ${LAUNCH:-python -m orthrus_train} "${BASE[@]}" "${DATA[@]}" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$RES/phases.txt"; tail -4 "$RES/$name.log"; return $rc; }
link_run() {  # a run folder that shares the main run's tokenizer and data (no copies)
  mkdir -p "$1"; for x in tokenizer data; do [ -e "$1/$x" ] || ln -s "$ROOT/main/$x" "$1/$x"; done; }
# name -> extra overrides of each ablation (each trains ABL_STEPS steps with its own schedule)
# (base = the recipe's settings; since session 6 the smollm2-135m recipe sets lr 3e-3 and offset decay 0.3, so
# "lr1e-3_uniform" is sessions 5 and 6's old base)
declare -A ABL=([base]="" [lr1e-3]="train.lr=1e-3" [uniform]="train.offset_decay=0" [k32]="heads.block_size=32"
                [lr1e-3_uniform]="train.lr=1e-3 train.offset_decay=0" [lr1e-2]="train.lr=1e-2")
MEDUSA_RUN=${MEDUSA_RUN:-1}; SIDE_RUNS=(); [ "$MEDUSA_RUN" = 0 ] || SIDE_RUNS=(medusa)
if [ -n "${ABLATIONS:-}" ]; then  # e.g. ABLATIONS="base k32": keep only these
  declare -A KEEP=(); for a in $ABLATIONS; do KEEP[$a]=1; done
  for a in "${!ABL[@]}"; do [ -n "${KEEP[$a]:-}" ] || unset "ABL[$a]"; done
fi
MAIN_GPU=${MAIN_GPU:-0}; SIDE_GPU=${SIDE_GPU:-}
on_main() { if [ -n "$SIDE_GPU" ]; then CUDA_VISIBLE_DEVICES=$MAIN_GPU "$@"; else "$@"; fi; }
on_side() { if [ -n "$SIDE_GPU" ]; then CUDA_VISIBLE_DEVICES=$SIDE_GPU "$@"; else "$@"; fi; }
# MAIN_NPROC=N (> 1): the data stage and the main run's training on N processes (torchrun, one GPU each:
# regeneration sharded over the ranks, data-parallel training); the evals stay on MAIN_GPU. Leave SIDE_GPU
# unset then (the side runs would share a training GPU) and set ABLATIONS to what fits.
MAIN_NPROC=${MAIN_NPROC:-1}
on_all() { if [ "$MAIN_NPROC" -gt 1 ]; then
    LAUNCH="torchrun --standalone --nproc_per_node $MAIN_NPROC -m orthrus_train" "$@"; else on_main "$@"; fi; }
SIDE_RUNS+=("${!ABL[@]}")
LARGEST=$(printf '%s\n' $BUDGETS | sort -n | tail -1)
PROFILE_PID=""; side_pids=()
stop() {  # a phase that every later one needs failed: pack what there is and end (a lease's minutes are few)
  echo "[stop] $1 failed: the later phases need it (see $RES/$1.log)" | tee -a "$RES/phases.txt"
  [ -z "$PROFILE_PID" ] || wait "$PROFILE_PID"; finish 1; }
PROFILE_SHAPES=${PROFILE_SHAPES:-smollm2-135m qwen3-4b qwen3-8b}

for ph in $PHASES; do case $ph in
  profile)
    mkdir -p "$RES/decode"
    ( if [ -n "${KERNEL_TESTS:-}" ]; then  # the opt-in decode kernels compiled for this GPU, against the reference
        t0=$(date +%s)
        ( cd "$HERE/.." && on_side python -m pytest -q -p no:cacheprovider tests/model/test_decode_attn.py \
            tests/model/test_decode_norm.py ) > "$RES/decode/kernel_tests.log" 2>&1
        echo "[kernel tests] rc=$? $(( $(date +%s) - t0 ))s" >> "$RES/phases.txt"
      fi
      for sh in $PROFILE_SHAPES; do
        t0=$(date +%s)
        on_side python "$HERE/profile_decode_step.py" --shape "$sh" ${PROFILE_ARGS:-} --out "$RES/decode/$sh.json" \
          > "$RES/decode/$sh.log" 2>&1
        echo "[profile $sh] rc=$? $(( $(date +%s) - t0 ))s" >> "$RES/phases.txt"
        if [ -n "${PROFILE_NOFUSE:-}" ]; then  # the same without fused projections: what the fusion earns
          t0=$(date +%s)
          on_side python "$HERE/profile_decode_step.py" --shape "$sh" ${PROFILE_ARGS:-} --no-fuse \
            --out "$RES/decode/${sh}_nofuse.json" > "$RES/decode/${sh}_nofuse.log" 2>&1
          echo "[profile $sh no-fuse] rc=$? $(( $(date +%s) - t0 ))s" >> "$RES/phases.txt"
        fi
      done
      if [ -n "${PROFILE_COMPILE:-}" ]; then  # compile cost and per-step saving: the compile_min_steps threshold
        t0=$(date +%s)
        on_side python "$HERE/profile_decode_step.py" --shape smollm2-135m --compile $PROFILE_COMPILE \
          --out "$RES/decode/smollm2-135m_compiled.json" > "$RES/decode/smollm2-135m_compiled.log" 2>&1
        echo "[profile smollm2-135m compiled] rc=$? $(( $(date +%s) - t0 ))s" >> "$RES/phases.txt"
      fi ) &
    PROFILE_PID=$! ;;
  data) on_all run data run_dir=$ROOT/main stage=data || stop data
    cp "$ROOT/main/data/report.json" "$RES/data_report.json"
    # with SELF_PROMPTS: the first 200 prompts the backbone wrote, to read what it trained on
    grep '"source": "self-written"' "$ROOT/main/data/prompts.jsonl" 2>/dev/null | head -n 200 > "$RES/self_prompts_sample.jsonl"
    [ -s "$RES/self_prompts_sample.jsonl" ] || rm -f "$RES/self_prompts_sample.jsonl" ;;
  train)
    link_run "$ROOT/medusa"; for a in "${!ABL[@]}"; do link_run "$ROOT/abl-$a"; done
    side_pids=()
    # the side runs wait for the profiles on the side GPU (timings alone there); the main run starts at once
    side_wait() { [ -n "$PROFILE_PID" ] && [ -n "$SIDE_GPU" ] || return 0
      while kill -0 "$PROFILE_PID" 2>/dev/null; do sleep 5; done; }
    [ "$MEDUSA_RUN" = 0 ] || ( side_wait; on_side run medusa_train run_dir=$ROOT/medusa stage=train heads=medusa heads.block_size=16 \
      "${TRAIN[@]}" "${MEDUSA[@]}" train.max_steps=$STEPS train.save_every=$STEPS ) & side_pids+=($!)
    for a in "${!ABL[@]}"; do
      ( side_wait; on_side run abl_${a}_train run_dir=$ROOT/abl-$a stage=train "${TRAIN[@]}" train.max_steps=$ABL_STEPS \
        train.save_every=$ABL_STEPS ${ABL[$a]} ) & side_pids+=($!)
    done
    on_all run main_train run_dir=$ROOT/main stage=train "${TRAIN[@]}" ${INIT_FROM:+heads.init_from=$INIT_FROM} \
      train.max_steps=$STEPS train.save_every=$SAVE \
      train.keep_checkpoints=1000 ${MAIN_EXTRA:-} || stop main_train  # MAIN_EXTRA: more main-run overrides
    [ -n "$SIDE_GPU" ] || wait "${side_pids[@]}"  # two GPUs: the side runs go on while the curve is evaluated
    cp "$ROOT/main/metrics.jsonl" "$RES/main_metrics.jsonl" 2>/dev/null; keep_heads ;;
  eval)
    eval_ckpt() {  # eval_ckpt NAME DIR STEP ON [overrides...]: DIR evaluates the main run's checkpoint STEP
      local name=$1 d=$2 n=$3 on=$4; shift 4; link_run "$d"; mkdir -p "$d/checkpoints"
      local src; src=$(printf "%s/main/checkpoints/step-%08d" "$ROOT" "$n")
      [ -e "$d/checkpoints/$(basename "$src")" ] || ln -s "$src" "$d/checkpoints/$(basename "$src")"
      [ -f "$d/eval/report.json" ] || $on run "$name" run_dir=$d stage=eval "${EVAL[@]}" "$@"; }
    curve_point() {  # one budget of the curve, then the partial curve packed (kept even if the lease ends)
      eval_ckpt eval_step$1 "$ROOT/curve/step-$1" "$1" "$2"
      cp "$ROOT/curve/step-$1/eval/report.json" "$RES/curve_step${1}_report.json" 2>/dev/null
      # per-prompt records: budgets compared prompt by prompt (scripts/compare_evals.py), about 1 MB gzipped
      gzip -c "$ROOT/curve/step-$1/eval/samples.jsonl" > "$RES/curve_step${1}_samples.jsonl.gz" 2>/dev/null \
        || rm -f "$RES/curve_step${1}_samples.jsonl.gz"
      python "$HERE/learning_curve.py" "$RES" "$ROOT/main:$ROOT/curve" > "$RES/collect_$1.log" 2>&1; pack; }
    # the side GPU: Medusa and each ablation evaluated as soon as its training ends; then (after the profiles)
    # KERNEL_EVAL and SIDE_BUDGETS
    ( for p in "${side_pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 5; done; done  # not this subshell's children
      for r in "${SIDE_RUNS[@]}"; do d=$ROOT/$r; [ "$r" = medusa ] || d=$ROOT/abl-$r
        cp "$d/metrics.jsonl" "$RES/$(basename "$d")_metrics.jsonl" 2>/dev/null; done
      if [ "$MEDUSA_RUN" != 0 ]; then
        [ -f "$ROOT/medusa/eval/report.json" ] || on_side run medusa_eval run_dir=$ROOT/medusa stage=eval heads=medusa \
          heads.block_size=16 "${EVAL[@]}"
        cp "$ROOT/medusa/eval/report.json" "$RES/medusa_report.json" 2>/dev/null; pack  # kept even if the lease ends
      fi
      for a in "${!ABL[@]}"; do
        [ -f "$ROOT/abl-$a/eval/report.json" ] || on_side run abl_${a}_eval run_dir=$ROOT/abl-$a stage=eval ${ABL[$a]} "${EVAL[@]}"
        cp "$ROOT/abl-$a/eval/report.json" "$RES/abl-${a}_report.json" 2>/dev/null; pack
      done
      if [ -n "${KERNEL_EVAL:-}${SIDE_BUDGETS:-}${SIDE_EVALS:-}" ]; then
        [ -z "$PROFILE_PID" ] || while kill -0 "$PROFILE_PID" 2>/dev/null; do sleep 5; done  # timings alone there
        if [ -n "${KERNEL_EVAL:-}" ]; then
          LAUNCH="env $KERNEL_EVAL ${LAUNCH:-python -m orthrus_train}" eval_ckpt kernels_step$LARGEST \
            "$ROOT/kernels-step-$LARGEST" "$LARGEST" on_side
          cp "$ROOT/kernels-step-$LARGEST/eval/report.json" "$RES/kernels_step${LARGEST}_report.json" 2>/dev/null; pack
        fi
        for spec in ${SIDE_EVALS:-}; do  # NAME:overrides (comma-separated)
          name=${spec%%:*}; ovr=${spec#*:}
          eval_ckpt "${name}_step$LARGEST" "$ROOT/$name-step-$LARGEST" "$LARGEST" on_side ${ovr//,/ }
          cp "$ROOT/$name-step-$LARGEST/eval/report.json" "$RES/${name}_step${LARGEST}_report.json" 2>/dev/null; pack
        done
        for n in ${SIDE_BUDGETS:-}; do curve_point "$n" on_side; done
      fi ) &
    side_eval=$!
    for n in $(printf '%s\n' $BUDGETS | sort -rn); do  # largest first: the headline number before the lease ends
      case " ${SIDE_BUDGETS:-} " in *" $n "*) continue ;; esac
      curve_point "$n" on_main
    done
    if [ -n "${FIXED_BATCH_COMPARE:-}" ]; then  # the largest budget again with fixed batches: what refills earn
      eval_ckpt eval_fixed_step$LARGEST "$ROOT/fixed-step-$LARGEST" "$LARGEST" on_main eval.continuous_batching=false
      cp "$ROOT/fixed-step-$LARGEST/eval/report.json" "$RES/fixed_step${LARGEST}_report.json" 2>/dev/null; pack
    fi ;;  # the side GPU's evals go on during `final`; `collect` waits for them
  final)
    n=$LARGEST; d=$ROOT/final; link_run "$d"; mkdir -p "$d/checkpoints"
    src=$(printf "%s/main/checkpoints/step-%08d" "$ROOT" "$n")
    [ -e "$d/checkpoints/$(basename "$src")" ] || ln -s "$src" "$d/checkpoints/$(basename "$src")"
    on_main run final_eval run_dir=$d stage=eval eval.num_prompts=$EVAL_N eval.max_new_tokens=$EVAL_NEW \
      eval.batch_size=$EVAL_BS eval.lossless.ks_min_tokens=${KS_TOKENS:-50000} eval.lossless.greedy_prompts=$EVAL_N \
      eval.hf_generate_reference=${HF_REF:-false} eval.hf_generate_prompts=${HF_REF_PROMPTS:-32}
    cp "$d/eval/report.json" "$RES/final_report.json" 2>/dev/null; cp "$d/eval/report.md" "$RES/final_report.md" 2>/dev/null ;;
  collect)
    [ -z "${side_eval:-}" ] || { wait "$side_eval"; side_eval=""; }
    extras=(); [ "$MEDUSA_RUN" = 0 ] || extras=(--extra "medusa=$ROOT/medusa:$ROOT/medusa/eval/report.json")
    for a in "${!ABL[@]}"; do extras+=(--extra "abl-$a=$ROOT/abl-$a:$ROOT/abl-$a/eval/report.json"); done
    python "$HERE/learning_curve.py" "$RES" "$ROOT/main:$ROOT/curve" "${extras[@]}" --budgets "${BUDGETS// /,}" \
      > "$RES/collect.log" 2>&1
    tail -40 "$RES/collect.log" ;;
  *) echo "unknown phase $ph" | tee -a "$RES/phases.txt" ;;
esac; pack; done
[ -z "$PROFILE_PID" ] || wait "$PROFILE_PID"
finish 0
