#!/usr/bin/env bash
# The GPU checks in one run of about 10 minutes:
#   1. tests/test_cuda.py: CUDA equals CPU (float64 to 1e-10; float32 within 10x the plain backbone's
#      difference), a bf16 autocast + channels_last training step, float32 second-order maths under
#      autocast, no host synchronisation in forward or backward, the compiled block equal to eager;
#      the fused GSoP ops (Triton) against the eager ones, the gate kernel at odd sizes, the fused block compiled;
#   2. eager timings, batch 128, bf16 autocast, channels_last: GSoP-Net1/Net2 (ResNet-50) over their
#      backbones, with the eager and the fused GSoP ops, timm's resnet50 family and, with a checkout of the
#      official code, the official nets;
#   3. torch.compile'd timings of GSoP-Net1 (eager and fused GSoP ops) and its backbone;
#   4. a stop on a signal with timm's train.py on the GPUs (AMP, EMA; with 2 or more GPUs, 2 processes that agree
#      on the step), then the same command continuing the run (tests/test_resume.py -k cuda).
# Tables go to $OUT (default gpu-results/); each step has a time limit so that a slow one cannot take the rest.
#
# Optional inputs, in the repository root (both folders are git-ignored); prepare them where there is network
# access and copy them to the GPU machine with the repository if it has none:
#   .whl/       wheels to install first, e.g. the timm this package is tested with where the machine has another:
#               python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl timm==1.0.31
#   .timm-scripts/  timm's train.py (and validate.py) at the tested timm version, for step 4:
#               git -C pytorch-image-models show v1.0.31:train.py > .timm-scripts/train.py   (likewise validate.py)
#   .official/  a checkout of the official GSoP code, for the ours-against-official table:
#               git clone --depth 1 https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks .official
# Then run benchmarks/gpu_checks.sh on the GPU machine (about 10 minutes; give it 11).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo 'gpu_checks.sh: torch sees no CUDA GPU here; the CPU tables come from the scripts themselves.' >&2; exit 2; }
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo 'gpu_checks.sh: could not install the wheels in .whl/' >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-gpu-results}"
mkdir -p "$out"
official=()
[ -d .official ] && official=(--official .official)
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || status=1
python3 -c 'import torch, timm, timm_gsop; print("torch", torch.__version__, "timm", timm.__version__)' | tee -a "$out/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt" || status=1
[ -f .timm-scripts/train.py ] && export TIMM_TRAIN_PY="$PWD/.timm-scripts/train.py"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_resume.py -k cuda 2>&1 | tee "$out/test_resume_cuda.txt" \
  || status=1
timeout 140 python3 benchmarks/bench_models.py --no-compile --depths 50 --reps 8 --fused "${official[@]}" \
  --out "$out/models_eager.md" || status=1
timeout 210 python3 benchmarks/bench_models.py --compile --depths 50 --nets 1 --no-timm --no-memory --reps 8 --fused \
  --out "$out/models_compiled.md" || status=1
exit "$status"
