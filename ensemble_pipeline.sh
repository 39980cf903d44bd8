#!/usr/bin/env bash
# ensemble_pipeline.sh: AICUP 2025 heart CT organizer files -> submission-ready predict.zip with
# nnU-Net's official commands; resumable; here (GPUs, or CPU slots) or on Slurm. Run --help.
# The program is `nnunet-heart pipeline` (nnunet_heart_ext/pipeline/); this file only finds it.
set -euo pipefail
if ! command -v nnunet-heart >/dev/null; then
  echo "error: nnunet-heart not found on PATH: install nnU-Net v2 and this extension (pip install -e .)" \
       "and activate that environment" >&2
  exit 1
fi
exec nnunet-heart pipeline "$@"
