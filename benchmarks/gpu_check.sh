#!/usr/bin/env bash
# The one prepared GPU check (DEVELOPERS.md, "The machines"): compiled Triton kernels against
# their references, then the GPU microbenchmarks. Ends inside 8 minutes.
#
# Prepare here (no GPU needed):
#   bash ../shared/tools/device-wheels.sh                 # nnU-Net's wheels the GPU machine lacks -> .whl/
#   .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl .   # this project, as a wheel
# Run with the device tool:  command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540.
# Results land in $OUT (the device tool brings them back): copy them to benchmarks/results/gpu/.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/gpu_check.log"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
# The project wheel maps kernels/ -> nnunet_heart_ext.kernels; PWD gives tests/ and benchmarks/.
export PYTHONPATH=/tmp/site:$PWD TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

status=0
log "kernel tests, compiled Triton path on CUDA tensors"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_fused_dice_ce.py tests/test_connected_components.py 2>&1 | tail -40 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "benchmarks"
timeout 240 python3 -m benchmarks --only loss,cc --out "$OUT" 2>&1 | tee "$OUT/benchmarks.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
log "done, status $status"
exit $status
