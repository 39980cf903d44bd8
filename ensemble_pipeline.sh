#!/usr/bin/env bash
# ensemble_pipeline.sh: AICUP 2025 heart CT organizer files -> submission-ready predict.zip,
# with the official nnUNetv2 commands and the extension's `nnunet-heart` commands.
# Resumable: every step decides from its own outputs whether it is finished. Run --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash ensemble_pipeline.sh --src DIR [options]
       bash ensemble_pipeline.sh --demo [options]

Runs, each step only when its outputs are missing or incomplete:
  prepare      nnunet-heart prepare: organizer folders -> $nnUNet_raw/Dataset100_Heart
  plan         nnUNetv2_plan_and_preprocess -pl PLANNER -c CONFIGS (after a disk-space estimate)
  train        nnUNetv2_train per configuration and fold, --npz; one fold per GPU in parallel;
               a fold with checkpoint_final.pth is finished, one with checkpoint_latest.pth
               continues from it (--c)
  validate     nnUNetv2_train --val --npz, only for folds whose validation outputs are missing
  best         nnUNetv2_find_best_configuration over CONFIGS and FOLDS
  predict      nnUNetv2_predict with the chosen configuration(s) and all FOLDS (parts split
               over the GPUs; --save_probabilities and nnUNetv2_ensemble only when the best
               is an ensemble of configurations)
  postprocess  nnUNetv2_apply_postprocessing with the chosen postprocessing.pkl
  export       nnunet-heart export -> predict.zip (flat, CASE_predict.nii.gz)
  score        (--demo only) Dice per class of predict.zip against the synthetic ground truth

Options (environment variable in brackets; flags win):
  --src DIR          organizer folder: training_image1..3/, training_label/, testing_image/ [HEART_SRC]
  --test-dir DIR     test images (default: SRC/testing_image) [HEART_TEST_DIR]
  --work DIR         working folder (default: ./nnunet_data, ./nnunet_demo with --demo) [HEART_WORK]
                     nnUNet_raw, nnUNet_preprocessed, nnUNet_results are respected when set
                     (not with --demo); otherwise WORK/nnUNet_raw, ... are used
  --raw DIR, --preprocessed DIR, --results DIR   override the three nnU-Net folders
  --out FILE         the submission zip (default: WORK/predict.zip) [HEART_OUT]
  --configs LIST     comma-separated configurations (default: 3d_fullres) [HEART_CONFIGS]
  --folds LIST       comma-separated folds (default: 0,1,2,3,4) [HEART_FOLDS]
  --trainer NAME     (default: HeartTrainer) [HEART_TRAINER]
  --planner NAME     (default: HeartPlanner) [HEART_PLANNER]
  --plans NAME       plans identifier the planner writes (default: HeartPlans) [HEART_PLANS]
  --device cuda|cpu  (default: cuda; cpu with --demo) [HEART_DEVICE]
  --gpus LIST        GPU ids, one fold per GPU at a time (default: every visible GPU) [HEART_GPUS]
  --parallel N       with --device cpu: folds trained at once (default: 1; 2 with --demo) [HEART_PARALLEL]
  --checkpoint NAME  checkpoint used for prediction (default: checkpoint_final.pth) [HEART_CHECKPOINT]
  --no-tta           predict without mirroring (8x fewer network passes; on with --demo) [HEART_NO_TTA=1]
  --only STEP[,..]   run just these steps (e.g. --only train --folds 3 for one cluster job)
  --force STEP       redo STEP and every step after it (repeatable; --only limits it to STEP)
  --skip-disk-check  do not stop when the disk estimate says preprocessing will not fit
  --demo             synthetic phantom (8 train, 4 test), CPU, HeartDemoPlanner/HeartDemoPlans,
                     HeartTrainer_demo, folds 0,1 side by side (--parallel 2), --no-tta, then
                     Dice per class on the test cases
  -h, --help         this text

Environment: nnUNet_n_proc_DA and nnUNet_def_n_proc default to 1 and 2 on CPU (unset on GPU);
your values are kept. Logs: WORK/logs/. Commands come from PATH (nnUNetv2_*, nnunet-heart).
EOF
}

die() { echo "error: $*" >&2; exit 1; }
note() { echo "[pipeline $(date +%H:%M:%S)] $*"; }

STEPS=(prepare plan train validate best predict postprocess export score)
DATASET_ID=100
DATASET=Dataset100_Heart

# ------------------------------------------------------------------------------ arguments
SRC="${HEART_SRC:-}"; TEST_DIR="${HEART_TEST_DIR:-}"; WORK="${HEART_WORK:-}"; OUT="${HEART_OUT:-}"
CONFIGS="${HEART_CONFIGS:-}"; FOLDS="${HEART_FOLDS:-}"; TRAINER="${HEART_TRAINER:-}"
PLANNER="${HEART_PLANNER:-}"; PLANS="${HEART_PLANS:-}"; DEVICE="${HEART_DEVICE:-}"
GPUS="${HEART_GPUS:-}"; PARALLEL=""; CHECKPOINT="${HEART_CHECKPOINT:-checkpoint_final.pth}"
RAW=""; PRE=""; RES=""; ONLY=""; FORCE=(); DEMO=0; SKIP_DISK=0; NO_TTA="${HEART_NO_TTA:-0}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --demo) DEMO=1; shift; continue ;;
    --skip-disk-check) SKIP_DISK=1; shift; continue ;;
    --no-tta) NO_TTA=1; shift; continue ;;
  esac
  [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
  case "$1" in
    --src) SRC="$2" ;; --test-dir) TEST_DIR="$2" ;; --work) WORK="$2" ;; --out) OUT="$2" ;;
    --raw) RAW="$2" ;; --preprocessed) PRE="$2" ;; --results) RES="$2" ;;
    --configs) CONFIGS="$2" ;; --folds) FOLDS="$2" ;; --trainer) TRAINER="$2" ;;
    --planner) PLANNER="$2" ;; --plans) PLANS="$2" ;; --device) DEVICE="$2" ;;
    --gpus) GPUS="$2" ;; --parallel) PARALLEL="$2" ;; --checkpoint) CHECKPOINT="$2" ;;
    --only) ONLY="$2" ;; --force) FORCE+=("$2") ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift 2
done

if [[ $DEMO == 1 ]]; then
  WORK="${WORK:-$PWD/nnunet_demo}"; DEVICE="${DEVICE:-cpu}"; FOLDS="${FOLDS:-0,1}"; NO_TTA=1
  PARALLEL="${PARALLEL:-${HEART_PARALLEL:-2}}"
  PLANNER="${PLANNER:-HeartDemoPlanner}"; PLANS="${PLANS:-HeartDemoPlans}"; TRAINER="${TRAINER:-HeartTrainer_demo}"
  SRC="${SRC:-$WORK/phantom}"
  # The demo's synthetic Dataset100_Heart must never land in a real nnUNet_raw.
  RAW="${RAW:-$WORK/nnUNet_raw}"; PRE="${PRE:-$WORK/nnUNet_preprocessed}"; RES="${RES:-$WORK/nnUNet_results}"
fi
WORK="$(mkdir -p "${WORK:-$PWD/nnunet_data}" && cd "${WORK:-$PWD/nnunet_data}" && pwd)"
CONFIGS="${CONFIGS:-3d_fullres}"; FOLDS="${FOLDS:-0,1,2,3,4}"; TRAINER="${TRAINER:-HeartTrainer}"
PLANNER="${PLANNER:-HeartPlanner}"; PLANS="${PLANS:-HeartPlans}"; DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$WORK/predict.zip}"
export nnUNet_raw="${RAW:-${nnUNet_raw:-$WORK/nnUNet_raw}}"
export nnUNet_preprocessed="${PRE:-${nnUNet_preprocessed:-$WORK/nnUNet_preprocessed}}"
export nnUNet_results="${RES:-${nnUNet_results:-$WORK/nnUNet_results}}"
[[ -z "$SRC" ]] && [[ -z "$ONLY" || ",$ONLY," == *,prepare,* ]] && [[ ! -f "$nnUNet_raw/$DATASET/dataset.json" ]] \
  && die "--src DIR is required (the organizer folder with training_image1..3/ and training_label/), or --demo"
[[ -n "$SRC" ]] && TEST_DIR="${TEST_DIR:-$SRC/testing_image}"

IFS=',' read -r -a CONFIG_LIST <<<"$CONFIGS"
IFS=',' read -r -a FOLD_LIST <<<"$FOLDS"
for f in "${FOLD_LIST[@]}"; do [[ "$f" =~ ^[0-9]+$ ]] || die "--folds: '$f' is not a fold number"; done
PARALLEL="${PARALLEL:-${HEART_PARALLEL:-1}}"
[[ "$PARALLEL" =~ ^[1-9][0-9]*$ ]] || die "--parallel: '$PARALLEL' is not a positive number"
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || die "--device must be cuda or cpu, not '$DEVICE'"
step_index() { local i; for i in "${!STEPS[@]}"; do [[ "${STEPS[$i]}" == "$1" ]] && { echo "$i"; return; }; done; return 1; }
IFS=',' read -r -a ONLY_LIST <<<"$ONLY"
for s in "${ONLY_LIST[@]+"${ONLY_LIST[@]}"}"; do
  step_index "$s" >/dev/null || die "--only: unknown step '$s' (steps: ${STEPS[*]})"
done
FORCE_FROM=${#STEPS[@]}
for s in "${FORCE[@]+"${FORCE[@]}"}"; do
  i=$(step_index "$s") || die "--force: unknown step '$s' (steps: ${STEPS[*]})"
  (( i < FORCE_FROM )) && FORCE_FROM=$i
done

# Small process counts on CPU: a few cores shared by training, augmentation and I/O.
if [[ $DEVICE == cpu ]]; then
  export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}" nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
fi
NPROC="${nnUNet_def_n_proc:-8}"
# Process counts are passed only where the user (or the CPU default) set them; otherwise
# nnU-Net keeps its own per-command defaults (e.g. 4 for 3d_fullres preprocessing: RAM).
PLAN_NP=(); PREDICT_NP=""
if [[ -n "${nnUNet_def_n_proc:-}" ]]; then
  PLAN_NP=(-np "$nnUNet_def_n_proc" -npfp "$nnUNet_def_n_proc")
  PREDICT_NP="-npp $nnUNet_def_n_proc -nps $nnUNet_def_n_proc"
fi
export PYTHONUNBUFFERED=1   # fold logs show progress as it happens
LOGS="$WORK/logs"; mkdir -p "$LOGS"
RAW_DS="$nnUNet_raw/$DATASET"; PRE_DS="$nnUNet_preprocessed/$DATASET"; RES_DS="$nnUNet_results/$DATASET"
PRED="$WORK/predictions"
model_dir() { echo "$RES_DS/${TRAINER}__${PLANS}__$1"; }
MODEL_DIRS=$(for c in "${CONFIG_LIST[@]}"; do model_dir "$c"; done | paste -sd,)

# ------------------------------------------------------------------------------ checks before work
for cmd in nnUNetv2_plan_and_preprocess nnUNetv2_train nnUNetv2_find_best_configuration nnUNetv2_predict \
           nnUNetv2_ensemble nnUNetv2_apply_postprocessing nnunet-heart; do
  command -v "$cmd" >/dev/null || die "$cmd not found on PATH: install nnU-Net v2 and this extension (pip install -e .) and activate that environment"
done
PYTHON="${HEART_PYTHON:-$(dirname "$(command -v nnUNetv2_train)")/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
"$PYTHON" -c 'import nnunetv2, nnunet_heart_ext' 2>/dev/null || die "$PYTHON cannot import nnunetv2 and nnunet_heart_ext"
utils() { "$PYTHON" -m nnunet_heart_ext.pipeline_utils "$@"; }

SLOTS=()
if [[ $DEVICE == cuda ]]; then
  n_gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  (( n_gpu > 0 )) || die "no CUDA GPU visible (torch.cuda.device_count() is 0); use --device cpu (slow) or --demo"
  if [[ -z "$GPUS" ]]; then
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then GPUS="$CUDA_VISIBLE_DEVICES"; else GPUS=$(seq -s, 0 $((n_gpu - 1))); fi
  elif [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=',' read -r -a gl <<<"$GPUS"
    for g in "${gl[@]}"; do
      [[ "$g" =~ ^[0-9]+$ ]] && (( g < n_gpu )) || die "--gpus: GPU '$g' does not exist (torch sees $n_gpu)"
    done
  fi
  IFS=',' read -r -a SLOTS <<<"$GPUS"
else
  for ((i = 0; i < PARALLEL; i++)); do SLOTS+=("cpu$i"); done
fi

# ------------------------------------------------------------------------------ step machinery
declare -A STEP_TIME=() STEP_STATE=()
wanted() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }
forced() { (( $(step_index "$1") >= FORCE_FROM )); }

# Background jobs of this run; killed (with their children) when the run stops for any reason.
declare -A JOB_PID=() JOB_LOG=()
kill_tree() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$child"; done
  kill -TERM "$1" 2>/dev/null || true
}
cleanup() { local j; for j in "${!JOB_PID[@]}"; do kill_tree "${JOB_PID[$j]}"; done; }
trap cleanup EXIT
trap 'echo; note "interrupted; rerun the same command to continue"; exit 130' INT TERM

# run_jobs NAME... : runs the commands in JOB_CMD[NAME] on the free SLOTS (at most one job per
# slot), logs to JOB_LOG[NAME]; the first failure stops all and shows that job's log tail.
declare -A JOB_CMD=()
GATE=""
run_jobs() {
  local queue=("$@") free=("${SLOTS[@]}") name slot rc
  declare -A slot_of=()
  while (( ${#queue[@]} > 0 || ${#JOB_PID[@]} > 0 )); do
    while (( ${#queue[@]} > 0 && ${#free[@]} > 0 )); do
      # The first training writes splits_final.json; parallel folds wait for it rather than race.
      if [[ -n "$GATE" && ! -f "$GATE" ]] && (( ${#JOB_PID[@]} > 0 )); then break; fi
      name="${queue[0]}"; queue=("${queue[@]:1}"); slot="${free[0]}"; free=("${free[@]:1}")
      { echo "=== $(date '+%F %T') on $slot: ${JOB_CMD[$name]}"; } >>"${JOB_LOG[$name]}"
      if [[ $DEVICE == cuda ]]; then
        CUDA_VISIBLE_DEVICES="$slot" bash -c "${JOB_CMD[$name]}" >>"${JOB_LOG[$name]}" 2>&1 &
      else
        bash -c "${JOB_CMD[$name]}" >>"${JOB_LOG[$name]}" 2>&1 &
      fi
      JOB_PID[$name]=$!; slot_of[$name]="$slot"
      note "  $name started on $slot (log: ${JOB_LOG[$name]})"
    done
    sleep 1
    for name in "${!JOB_PID[@]}"; do
      kill -0 "${JOB_PID[$name]}" 2>/dev/null && continue
      rc=0; wait "${JOB_PID[$name]}" || rc=$?
      unset "JOB_PID[$name]"; free+=("${slot_of[$name]}")
      if (( rc != 0 )); then
        cleanup
        echo "---- last lines of ${JOB_LOG[$name]} ----" >&2
        tail -n 40 "${JOB_LOG[$name]}" >&2
        die "$name failed (exit $rc); full log: ${JOB_LOG[$name]}; rerun to continue"
      fi
      note "  $name finished"
    done
  done
}

# run_step NAME: times step_NAME unless the step is not wanted. Steps call `already_done`
# (and return) when their outputs are complete. Called plainly, not in an `||` list, so that
# `set -e` stays in force inside the step.
run_step() {
  local name=$1 start=$SECONDS
  wanted "$name" || return 0
  note "step $name"
  CURRENT_STEP=$name
  STEP_STATE[$name]="done"
  "step_$name"
  STEP_TIME[$name]=$((SECONDS - start))
}
already_done() { STEP_STATE[$CURRENT_STEP]="already done"; note "  $CURRENT_STEP: already done"; }
log_cmd() { local log=$1; shift; echo "=== $(date '+%F %T'): $*" >>"$log"; "$@" >>"$log" 2>&1 || {
  local rc=$?; echo "---- last lines of $log ----" >&2; tail -n 40 "$log" >&2; die "$1 failed (exit $rc); full log: $log"; }; }

# ------------------------------------------------------------------------------ steps
step_phantom() {  # part of prepare in --demo: the synthetic organizer folders (deterministic)
  local n_train n_test
  n_train=$(find "$SRC/training_label" -name 'patient*_gt.nii.gz' 2>/dev/null | wc -l || true)
  n_test=$(find "$SRC/testing_label" -name 'patient*_gt.nii.gz' 2>/dev/null | wc -l || true)
  if (( n_train == 8 && n_test == 4 )) && ! forced prepare; then return 0; fi
  log_cmd "$LOGS/prepare.log" nnunet-heart phantom --out "$SRC" --train 8 --test 4 --seed 0
}

step_prepare() {
  if [[ $DEMO == 1 ]]; then step_phantom; fi
  if ! forced prepare && utils prepared "$RAW_DS" "$SRC" "$TEST_DIR" 2>/dev/null; then already_done; return 0; fi
  [[ -d "$SRC" ]] || die "--src $SRC is not a folder"
  log_cmd "$LOGS/prepare.log" nnunet-heart prepare --src "$SRC" --test-dir "$TEST_DIR" --raw "$nnUNet_raw"
  utils prepared "$RAW_DS" "$SRC" "$TEST_DIR"
}

step_plan() {
  [[ -f "$RAW_DS/dataset.json" ]] || die "$RAW_DS/dataset.json missing: run the prepare step first"
  if ! forced plan && utils preprocessed "$PRE_DS" "$PLANS" "$CONFIGS" "$RAW_DS" 2>/dev/null; then already_done; return 0; fi
  if [[ $SKIP_DISK == 0 ]]; then utils disk-check "$RAW_DS" "$nnUNet_preprocessed" "${#CONFIG_LIST[@]}"; fi
  log_cmd "$LOGS/plan.log" nnUNetv2_plan_and_preprocess -d "$DATASET_ID" -pl "$PLANNER" -c "${CONFIG_LIST[@]}" \
    "${PLAN_NP[@]+"${PLAN_NP[@]}"}" --verify_dataset_integrity
  utils preprocessed "$PRE_DS" "$PLANS" "$CONFIGS" "$RAW_DS"
}

need_plans() { [[ -f "$PRE_DS/$PLANS.json" ]] || die "$PRE_DS/$PLANS.json missing: run the plan step first"; }

step_train() {
  need_plans
  local c f dir jobs=()
  for c in "${CONFIG_LIST[@]}"; do
    for f in "${FOLD_LIST[@]}"; do
      dir="$(model_dir "$c")/fold_$f"
      if forced train; then rm -rf "$dir"; fi
      [[ -f "$dir/checkpoint_final.pth" ]] && continue
      local name="train_${c}_fold$f" cont=""
      if [[ -f "$dir/checkpoint_latest.pth" ]]; then
        if utils usable-checkpoint "$dir/checkpoint_latest.pth"; then
          cont="--c"; note "  $name: continuing from checkpoint_latest.pth"
        else  # cut short while saving: nnU-Net's --c then falls back to checkpoint_best.pth
          mv "$dir/checkpoint_latest.pth" "$dir/checkpoint_latest.pth.broken"; cont="--c"
        fi
      elif [[ -f "$dir/checkpoint_best.pth" ]]; then
        cont="--c"
      fi
      JOB_CMD[$name]="exec nnUNetv2_train $DATASET_ID $c $f -tr $TRAINER -p $PLANS --npz -device $DEVICE $cont"
      JOB_LOG[$name]="$LOGS/$name.log"
      jobs+=("$name")
    done
  done
  if (( ${#jobs[@]} == 0 )); then already_done; return 0; fi
  GATE="$PRE_DS/splits_final.json"
  run_jobs "${jobs[@]}"
  GATE=""
}

step_validate() {
  need_plans
  local c f dir jobs=()
  for c in "${CONFIG_LIST[@]}"; do
    for f in "${FOLD_LIST[@]}"; do
      dir="$(model_dir "$c")/fold_$f"
      [[ -f "$dir/checkpoint_final.pth" ]] || die "$dir/checkpoint_final.pth missing: fold $f of $c is not trained"
      if ! forced validate && utils validated "$dir" "$PRE_DS" "$f" 2>/dev/null; then continue; fi
      local name="validate_${c}_fold$f"
      JOB_CMD[$name]="exec nnUNetv2_train $DATASET_ID $c $f -tr $TRAINER -p $PLANS --val --npz -device $DEVICE"
      JOB_LOG[$name]="$LOGS/$name.log"
      jobs+=("$name")
    done
  done
  if (( ${#jobs[@]} == 0 )); then already_done; return 0; fi
  run_jobs "${jobs[@]}"
}

step_best() {
  if ! forced best && utils best-found "$RES_DS" "$MODEL_DIRS" "$FOLDS" 2>/dev/null; then already_done; return 0; fi
  log_cmd "$LOGS/best.log" nnUNetv2_find_best_configuration "$DATASET_ID" -c "${CONFIG_LIST[@]}" -tr "$TRAINER" \
    -p "$PLANS" -f "${FOLD_LIST[@]}" -np "$NPROC"
  utils best-found "$RES_DS" "$MODEL_DIRS" "$FOLDS"
  grep -A 3 '\*\*\*All results' "$LOGS/best.log" | tail -n +2 | sed 's/^/  /' || true
}

# What find_best_configuration chose: MODELS (trainer plans config lines), PP_PKL, PP_PLANS.
read_best() {
  [[ -f "$RES_DS/inference_information.json" ]] || die "$RES_DS/inference_information.json missing: run the best step first"
  local kind a b c
  MODELS=(); PP_PKL=""; PP_PLANS=""
  while read -r kind a b c; do
    case "$kind" in model) MODELS+=("$a $b $c") ;; postprocessing) PP_PKL="$a" ;; plans) PP_PLANS="$a" ;; esac
  done < <(utils best-models "$RES_DS")
  if (( ${#MODELS[@]} > 1 )); then FINAL_PRED="$PRED/ensemble"; else FINAL_PRED="$PRED/$(echo "${MODELS[0]}" | tr ' ' '_')"; fi
}

step_predict() {
  read_best
  local m tr pl c dir npz="" jobs=() newest="$RES_DS/inference_information.json" parts=${#SLOTS[@]} i
  (( ${#MODELS[@]} > 1 )) && npz="--npz"
  local todo=0 tta=""
  if [[ $NO_TTA == 1 ]]; then tta="--disable_tta"; fi
  for m in "${MODELS[@]}"; do
    read -r tr pl c <<<"$m"; dir="$PRED/${tr}_${pl}_${c}"
    if forced predict; then rm -rf "$dir"; fi
    if utils predicted "$dir" "$RAW_DS/imagesTs" $npz --newer-than "$newest" 2>/dev/null; then continue; fi
    todo=1
    for ((i = 0; i < parts; i++)); do
      local name="predict_${c}_part$i"
      JOB_CMD[$name]="exec nnUNetv2_predict -i '$RAW_DS/imagesTs' -o '$dir' -d $DATASET_ID -tr $tr -p $pl -c $c \
-f ${FOLD_LIST[*]} -chk $CHECKPOINT -device $DEVICE $PREDICT_NP --continue_prediction \
--disable_progress_bar -num_parts $parts -part_id $i ${npz:+--save_probabilities} $tta"
      JOB_LOG[$name]="$LOGS/$name.log"
      jobs+=("$name")
    done
  done
  if (( ${#jobs[@]} > 0 )); then run_jobs "${jobs[@]}"; fi
  for m in "${MODELS[@]}"; do
    read -r tr pl c <<<"$m"; utils predicted "$PRED/${tr}_${pl}_${c}" "$RAW_DS/imagesTs" $npz
  done
  if (( ${#MODELS[@]} > 1 )); then
    if (( todo )) || ! utils predicted "$PRED/ensemble" "$RAW_DS/imagesTs" 2>/dev/null; then
      todo=1
      local inputs=(); for m in "${MODELS[@]}"; do inputs+=("$PRED/$(echo "$m" | tr ' ' '_')"); done
      rm -rf "$PRED/ensemble"
      log_cmd "$LOGS/ensemble.log" nnUNetv2_ensemble -i "${inputs[@]}" -o "$PRED/ensemble" -np "$NPROC"
      utils predicted "$PRED/ensemble" "$RAW_DS/imagesTs"
    fi
  fi
  if (( todo == 0 )); then already_done; fi
}

step_postprocess() {
  read_best
  local out="$PRED/postprocessed"
  utils predicted "$FINAL_PRED" "$RAW_DS/imagesTs" || die "predictions incomplete in $FINAL_PRED: run the predict step first"
  if ! forced postprocess && utils predicted "$out" "$RAW_DS/imagesTs" --newer-than "$FINAL_PRED" 2>/dev/null; then already_done; return 0; fi
  rm -rf "$out"
  log_cmd "$LOGS/postprocess.log" nnUNetv2_apply_postprocessing -i "$FINAL_PRED" -o "$out" -pp_pkl_file "$PP_PKL" \
    -np "$NPROC" -plans_json "$PP_PLANS" -dataset_json "$(dirname "$PP_PLANS")/dataset.json"
  utils predicted "$out" "$RAW_DS/imagesTs"
}

step_export() {
  local pp="$PRED/postprocessed"
  utils predicted "$pp" "$RAW_DS/imagesTs" || die "postprocessed predictions incomplete in $pp: run the postprocess step first"
  if ! forced export && utils zipped "$OUT" "$pp" 2>/dev/null; then already_done; return 0; fi
  mkdir -p "$(dirname "$OUT")"
  log_cmd "$LOGS/export.log" nnunet-heart export --pred "$pp" --images "$RAW_DS/imagesTs" --out "$OUT"
  utils zipped "$OUT" "$pp"
}

step_score() {
  [[ -f "$OUT" ]] || die "$OUT missing: run the export step first"
  utils score "$OUT" "$SRC/testing_label" "$WORK/test_dice.json" -np "$NPROC"
}

# ------------------------------------------------------------------------------ run
note "work: $WORK   device: $DEVICE   slots: ${SLOTS[*]}   folds: $FOLDS   configs: $CONFIGS"
note "trainer: $TRAINER   planner: $PLANNER -> plans: $PLANS"
note "nnUNet_raw=$nnUNet_raw nnUNet_preprocessed=$nnUNet_preprocessed nnUNet_results=$nnUNet_results"
for s in "${STEPS[@]}"; do
  if [[ $s == score && $DEMO == 0 ]]; then continue; fi
  run_step "$s"
done

echo
echo "================ summary ================"
printf '%-12s %10s  %s\n' step seconds state
for s in "${STEPS[@]}"; do
  if [[ -n "${STEP_STATE[$s]:-}" ]]; then printf '%-12s %10s  %s\n' "$s" "${STEP_TIME[$s]}" "${STEP_STATE[$s]}"; fi
done
echo
utils summary "$MODEL_DIRS" "$FOLDS" || true
if [[ $DEMO == 1 && -f "$WORK/test_dice.json" ]]; then echo; utils dice-table "$WORK/test_dice.json"; fi
if [[ -f "$OUT" ]]; then echo; echo "submission: $OUT"; fi
exit 0
