#!/usr/bin/env bash
# The one prepared GPU check (DEVELOPERS.md, "The machines"): the kernel tests on CUDA tensors
# with the compiled Triton path, then the GPU benchmarks. Ends inside 8 minutes.
#
# Prepare here (no GPU needed), once:
#   bash ../shared/tools/device-wheels.sh       # nnU-Net's wheels the GPU machine lacks -> .whl/
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl nibabel   # nnU-Net's imageio imports it
# Run with the device tool: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540.
# The project itself is installed from the working tree there (no stale wheel). SimpleITK and
# imagecodecs are too large to carry: benchmarks/device_stubs/ stands in for SimpleITK so that
# nnU-Net's trainer and postprocessing modules import (nothing here reads or writes images).
# Results land in $OUT (what the device tool brings back, 8 files at most): copy them to
# benchmarks/results/gpu/. Sections: GPU_CHECK_ONLY="tests,augment,loss,cc,predict" (default:
# tests,augment,loss,cc). The inference check alone (issue 20, <= 8 minutes):
#   GPU_CHECK_ONLY=tests_predict,predict bash benchmarks/gpu_check.sh
# The network's CUDA options (issue 32 item 4, <= 7 minutes; bench_network.py's docstring):
#   GPU_CHECK_ONLY=network bash benchmarks/gpu_check.sh
# predict: one full-size case (340 x 467 x 467 at HeartPlans' spacing), ResEnc M, patch 96 x 160 x 160,
# 5 random-weight folds with mirroring: nnU-Net's nnUNetPredictor against HeartPredictor, then the
# export's computation (nnU-Net's CPU default and torchres against the extension on the GPU).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
ONLY=${GPU_CHECK_ONLY:-tests,augment,loss,cc}
log() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }
want() { [[ ",$ONLY," == *",$1,"* ]]; }

ls .whl/nibabel-*.whl >/dev/null 2>&1 || { echo "no .whl/nibabel-*.whl: prepare first (see the header)"; exit 2; }
log "install carried wheels and the project"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | grep -v nnunet_heart_ext) 2>&1 | tail -3 | tee -a "$LOG"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . 2>&1 \
  | tail -3 | tee -a "$LOG"
# python3 -P, /tmp/site first: the installed copy is what runs, not the working tree's nnunet_heart_ext/
# (the same files since kernels/ and trainers/ live inside it); PYTHONPATH gives tests/ and benchmarks/.
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks/device_stubs TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
# --target installs skip the .pth that registers the extension with nnU-Net (site-packages only):
# put it into this machine's interpreter (a lent machine, discarded after the session), or nnU-Net
# cannot find HeartPreprocessor & co. by name (seen on the first run of bench_augment).
echo "import nnunet_heart_ext._hook" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_nnunet_heart_ext.pth"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -P -c "import torch, triton, nnunetv2, nnunet_heart_ext.kernels.fused_dice_ce as f; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'cpus', __import__('os').cpu_count())" 2>&1 | tee -a "$LOG"

status=0
run() {  # run SECONDS NAME COMMAND...: log its output, remember a failure, go on
  local limit=$1 name=$2; shift 2
  log "$name"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "$name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
if want tests; then
  # xdist: the Triton compiles of the many test specialisations run side by side (16 cores)
  run 130 "kernel tests, compiled Triton path on CUDA tensors" python3 -P -m pytest -q -p no:cacheprovider -rfE \
    -n 8 -m "not slow" -k "not cpu-torch" tests/test_fused_dice_ce.py tests/test_connected_components.py \
    tests/test_augment.py
fi
want tests_predict && run 120 "inference tests on CUDA (HeartPredictor, device export)" python3 -P -m pytest -q \
  -p no:cacheprovider -rfE -m gpu tests/test_predictor.py
want predict && run 330 "inference benchmark (sliding window + folds, export)" python3 -P -m benchmarks --only predict \
  --predict-device cuda --predict-folds 5 --out "$OUT"
want network && run 420 "network options on CUDA (tests, then sliding window at step 0.5 and 0.15, training step)" \
  bash -c "python3 -P -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_network_runtime.py && \
  python3 -P -m benchmarks --only network --network-device cuda --out '$OUT'"
want augment && run 200 "augmentation benchmark" python3 -P -m benchmarks --only augment --augment-data /tmp/bench_augment \
  --augment-budget-s 90 --out "$OUT"
want loss && run 100 "loss benchmark" python3 -P -m benchmarks --only loss --loss-devices cuda --budget-s 60 --out "$OUT"
want cc && run 120 "connected-components benchmark" python3 -P -m benchmarks --only cc --out "$OUT"
log "done, status $status"
exit $status
