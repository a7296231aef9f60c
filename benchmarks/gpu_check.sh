#!/usr/bin/env bash
# GPU check of the CREMA-D workload (see benchmarks/gpu_check.py) with the machine's own python3 and its
# CUDA build of torch: equimodal is imported from this checkout's src/ when it is not installed, so
# nothing is installed (GPU machines are often offline). It needs numpy, pyyaml and rich beside torch.
# Under 8 minutes on one GPU. Usage: bash benchmarks/gpu_check.sh [--steps 300 --rounds 20]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: python3 has no CUDA-enabled torch on this machine" >&2; exit 2; }
python3 -c "import numpy, yaml, rich" || {
  echo "gpu_check: python3 lacks numpy, pyyaml or rich: pip install numpy pyyaml rich" >&2; exit 2; }
python3 -c "import equimodal" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_check.py "$@"
