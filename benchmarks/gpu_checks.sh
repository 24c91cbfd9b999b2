#!/usr/bin/env bash
# Issue 5's GPU checks as one prepared run: the CUDA tests (CUDA = CPU, bf16 autocast + channels_last,
# no host sync, compiled block = eager), then the ops and whole-model benchmarks at the GPU defaults
# (batch 128, bf16 autocast, channels_last). Eager timings by default, to fit one ~10-minute device
# call; --compile adds the torch.compile'd table of the ResNet-50 GSoP models (several minutes of
# compilation more). Not yet run: no GPU has been lent to this project so far.
#
#   benchmarks/gpu_checks.sh [--compile]        outputs in $OUT (default gpu-results/)
set -uo pipefail
cd "$(dirname "$0")/.."
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo 'gpu_checks.sh: torch sees no CUDA GPU here; the CPU tables come from the scripts themselves.' >&2; exit 2; }
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || status=1
python -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt" || status=1
python benchmarks/bench_gsop_ops.py --out "$out/ops.md" || status=1
python benchmarks/bench_models.py --no-compile --reps 10 --out "$out/models_eager.md" || status=1
if [[ "${1:-}" == --compile ]]; then
  python benchmarks/bench_models.py --depths 50 --no-timm --reps 10 --out "$out/models_compiled.md" || status=1
fi
exit "$status"
