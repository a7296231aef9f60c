#!/usr/bin/env bash
# GPU check of the CREMA-D workload (see benchmarks/gpu_check.py): a venv that sees the machine's own torch
# (a CUDA build is usually installed there), equimodal installed into it without dependencies, then the
# check. Under 8 minutes on one GPU. Usage: bash benchmarks/gpu_check.sh [--steps 300 --rounds 20]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: python3 has no CUDA-enabled torch on this machine" >&2; exit 2; }
python3 -m venv --system-site-packages .venv-gpu
.venv-gpu/bin/python -m pip install -q --no-deps -e .
.venv-gpu/bin/python -m pip install -q pyyaml rich numpy
exec .venv-gpu/bin/python benchmarks/gpu_check.py "$@"
