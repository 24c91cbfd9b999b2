#!/usr/bin/env bash
# Train GSoP-Net with timm's reference train.py (the models registered by `import timm_gsop`).
# Run `./train_timm.sh --help` for the options; every other argument goes to train.py unchanged.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Works from any cwd, with or without `pip install -e .`: the repo root comes first on the path.
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
# recipes.py and timm_scripts.py run as plain scripts where they can: stdlib only, no torch import.

usage() {
  cat <<EOF
Usage: ./train_timm.sh [options] [train.py arguments...]

Runs timm's reference train.py with the GSoP-Net models registered (python -m timm_gsop.train).
Every argument that is not an option below goes to train.py unchanged, after the recipe's, so
later arguments win (train.py keeps the last occurrence of an option).
--validate and --benchmark run validate.py / benchmark.py the same way; --validate --checkpoint
RUN/model_best.pth.tar takes the options you do not give from the run's RUN/args.yaml.

With no dataset (no --data-dir / --dataset / --config) and no recipe, trains a small GSoP-Net on a
generated 10-class shapes ImageFolder (no download; on CPU when there is no GPU) and prints where
the best checkpoint is and its validation top-1.

Options:
  --recipe NAME            put recipe NAME's train.py arguments first (see --list-recipes)
  --list-recipes           list the recipes and exit
  --nproc-per-node N       run under torchrun with N processes per node, one GPU each
  --nnodes N               number of nodes (with --node-rank and --rdzv-endpoint)
  --node-rank R            this node's rank, 0 .. N-1
  --rdzv-endpoint H:P      rendezvous host:port (node 0's address)
  --rdzv-backend NAME      torchrun rendezvous backend (default: torchrun's, static)
  --validate               run timm's validate.py instead (python -m timm_gsop.validate)
  --benchmark              run timm's benchmark.py instead (python -m timm_gsop.benchmark)
  --dry-run                print the command and exit (fetches and writes nothing)
  --help-train             show train.py's own --help
  -h, --help               show this help

Recipes:
$("$PYTHON" "$HERE/timm_gsop/recipes.py")

Environment:
  PYTHON                   interpreter to use (default: python3 on PATH)
  TIMM_TRAIN_PY            path to timm's train.py; else a checkout cached at the installed timm
  TIMM_VALIDATE_PY         version's tag under ~/.cache/timm_gsop (TIMM_GSOP_CACHE_DIR), else a
  TIMM_BENCHMARK_PY        shallow git clone there (validate.py, benchmark.py: beside train.py)
  TIMM_GSOP_DEMO_DIR       where the demo's shapes dataset is written (default: the cache dir)

Examples:
  ./train_timm.sh                                             # the CPU demo
  ./train_timm.sh --recipe paper-net1 --data-dir /data/imagenet --amp
  ./train_timm.sh --recipe paper-net2 --nproc-per-node 8 --batch-size 32 --data-dir /data/imagenet
  ./train_timm.sh --validate --checkpoint output/train/RUN/model_best.pth.tar
  ./train_timm.sh --benchmark --model gsop_resnet50 --device cpu --bench inference
EOF
}

die() { echo "train_timm: $*" >&2; exit 2; }

RECIPE=""; NPROC=""; NNODES=""; NODE_RANK=""; RDZV_ENDPOINT=""; RDZV_BACKEND=""
DRY_RUN=0; MODE=train
USER_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --help-train) MODE=help-train; shift ;;
    --list-recipes) "$PYTHON" "$HERE/timm_gsop/recipes.py"; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --validate|--benchmark) MODE="${1#--}"; shift ;;
    --recipe|--nproc-per-node|--nnodes|--node-rank|--rdzv-endpoint|--rdzv-backend)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      set -- "$1=$2" "${@:3}" ;;  # handled as --opt=value below
    --recipe=*|--nproc-per-node=*|--nnodes=*|--node-rank=*|--rdzv-endpoint=*|--rdzv-backend=*)
      # An empty value would read as "not given" below: refuse it.
      [[ -n "${1#*=}" ]] || die "${1%%=*} needs a value, got an empty one"
      case "$1" in
        --recipe=*) RECIPE="${1#*=}" ;;
        --nproc-per-node=*) NPROC="${1#*=}" ;;
        --nnodes=*) NNODES="${1#*=}" ;;
        --node-rank=*) NODE_RANK="${1#*=}" ;;
        --rdzv-endpoint=*) RDZV_ENDPOINT="${1#*=}" ;;
        --rdzv-backend=*) RDZV_BACKEND="${1#*=}" ;;
      esac
      shift ;;
    *) USER_ARGS+=("$1"); shift ;;
  esac
done

if [[ "$MODE" == help-train ]]; then
  exec "$PYTHON" -m timm_gsop.train --help
fi

# True when the user's arguments name a dataset (train.py also takes a positional DIR: deprecated,
# and not recognised here; use --data-dir).
has_arg() {
  local a
  for a in "${USER_ARGS[@]+"${USER_ARGS[@]}"}"; do
    for name in "$@"; do
      [[ "$a" == "$name" || "$a" == "$name="* ]] && return 0
    done
  done
  return 1
}
# Value of the last occurrence of option $1 in "${ALL_ARGS[@]}" (what argparse keeps).
last_value() {
  local i value="" n=${#ALL_ARGS[@]}
  for ((i = 0; i < n; i++)); do
    case "${ALL_ARGS[i]}" in
      "$1") ((i + 1 < n)) && value="${ALL_ARGS[i + 1]}" ;;
      "$1="*) value="${ALL_ARGS[i]#*=}" ;;
    esac
  done
  printf '%s' "$value"
}

[[ -z "$NPROC" || "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer, got '$NPROC'"
[[ -z "$NNODES" || "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$NNODES'"
[[ "$RDZV_BACKEND" =~ ^(|static|c10d|etcd|etcd-v2)$ ]] ||
  die "--rdzv-backend must be one of static, c10d, etcd, etcd-v2 (torchrun's), got '$RDZV_BACKEND'"
if [[ -n "$NODE_RANK" ]]; then
  [[ "$NODE_RANK" =~ ^[0-9]+$ && -n "$NNODES" ]] && ((10#$NODE_RANK < NNODES)) ||
    die "--node-rank must be 0 .. --nnodes - 1 (${NNODES:-no --nnodes given}), got '$NODE_RANK'"
fi

MODULE="timm_gsop.$MODE"
if [[ -n "$NPROC" ]]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC")
  if [[ -n "$NNODES" && "$NNODES" != 1 ]]; then
    [[ -n "$RDZV_ENDPOINT" ]] || die "--nnodes $NNODES needs --rdzv-endpoint HOST:PORT (node 0's address)"
    [[ -n "$NODE_RANK" || "$RDZV_BACKEND" == c10d ]] || die "--nnodes $NNODES needs --node-rank (0 .. $((NNODES - 1)))"
    LAUNCH+=(--nnodes "$NNODES")
    [[ -n "$NODE_RANK" ]] && LAUNCH+=(--node-rank "$NODE_RANK")
    [[ -n "$RDZV_BACKEND" ]] && LAUNCH+=(--rdzv-backend "$RDZV_BACKEND")
    LAUNCH+=(--rdzv-endpoint "$RDZV_ENDPOINT")
  else
    [[ -z "$NODE_RANK$RDZV_ENDPOINT" ]] || die "--node-rank / --rdzv-endpoint need --nnodes > 1"
    LAUNCH+=(--standalone)
  fi
  LAUNCH+=(-m "$MODULE")
else
  [[ -z "$NNODES$NODE_RANK$RDZV_ENDPOINT$RDZV_BACKEND" ]] || die "--nnodes / --node-rank / --rdzv-* need --nproc-per-node"
  LAUNCH=("$PYTHON" -m "$MODULE")
fi

PRE_ARGS=()
DEMO=0
if [[ "$MODE" != train ]]; then
  [[ -z "$RECIPE" ]] || die "--recipe is for training, not with --$MODE"
  [[ -z "$NPROC$NNODES" ]] || die "--$MODE runs one process ($MODE.py has no distributed mode)"
elif [[ -n "$RECIPE" ]]; then
  RECIPE_OUT="$("$PYTHON" "$HERE/timm_gsop/recipes.py" "$RECIPE")" || exit 2
  mapfile -t PRE_ARGS <<<"$RECIPE_OUT"
  if ! has_arg --data-dir --dataset -c --config; then
    die "recipe $RECIPE needs a dataset: add --data-dir DIR (and --dataset NAME for a non-folder dataset)"
  fi
elif ! has_arg --data-dir --dataset -c --config; then
  DEMO=1
fi

# Before any work: train.py's distributed mode runs one process per GPU (DDP on the CPU fails inside
# it), so refuse what this node cannot run; then find the script (fetching it if needed), so that
# torchrun's processes share the one path. A dry run checks and fetches nothing.
if [[ "$DRY_RUN" == 0 ]]; then
  if [[ -n "$NPROC" ]]; then
    GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" || exit 2
    ((GPUS >= NPROC)) || die "--nproc-per-node $NPROC needs $NPROC GPUs on this node, found $GPUS" \
      "(train.py's distributed mode runs one process per GPU): drop --nproc-per-node to train in one process"
  fi
  SCRIPT_PATH="$("$PYTHON" "$HERE/timm_gsop/timm_scripts.py" "$MODE.py")" || exit 2
  export "TIMM_$(tr a-z A-Z <<<"$MODE")_PY=$SCRIPT_PATH"
fi

if [[ "$DEMO" == 1 ]]; then
  DEMO_DIR="${TIMM_GSOP_DEMO_DIR:-$("$PYTHON" "$HERE/timm_gsop/timm_scripts.py" --cache-dir)/demo-shapes}"
  DEVICE=cpu
  if [[ -n "$NPROC" ]] || "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    DEVICE=cuda
  fi
  # A reduced-depth GSoP-Net1 (one bottleneck per stage, a GSoP block in each) at 64 px, 600
  # training images: about a minute on 2 CPU cores, far above chance (10%) on the 10 shapes.
  PRE_ARGS=(
    --data-dir "$DEMO_DIR" --model gsop_resnet50 --model-kwargs 'layers=(1,1,1,1)' --num-classes 10
    --img-size 64 --crop-pct 1.0 --scale 0.5 1 --color-jitter 0 --smoothing 0.1
    --opt adamw --lr 3e-3 --weight-decay 0.05 --sched cosine --sched-on-updates --epochs 5 --warmup-epochs 1
    --batch-size 32 --workers 1 --device "$DEVICE" --log-interval 5 --checkpoint-hist 1
    --output "$PWD/output/train" --experiment "gsop-demo-$(date +%Y%m%d-%H%M%S)"
  )
fi
ALL_ARGS=("${PRE_ARGS[@]+"${PRE_ARGS[@]}"}" "${USER_ARGS[@]+"${USER_ARGS[@]}"}")

CMD=("${LAUNCH[@]}" "${ALL_ARGS[@]+"${ALL_ARGS[@]}"}")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi

if [[ "$DEMO" == 1 ]]; then
  echo "train_timm: demo: writing/reusing the generated shapes dataset at $DEMO_DIR" >&2
  "$PYTHON" -m timm_gsop.demo_data "$DEMO_DIR" >/dev/null
fi

echo "train_timm: $(printf '%q ' "${CMD[@]}")" >&2
"${CMD[@]}"

# Where the run went, when its folder is known (train.py names it by --output and --experiment).
EXPERIMENT="$(last_value --experiment)"
if [[ "$MODE" == train && -n "$EXPERIMENT" ]]; then
  OUT_BASE="$(last_value --output)"
  OUT_DIR="${OUT_BASE:-./output/train}/$EXPERIMENT"  # as train.py names it
  "$PYTHON" - "$OUT_DIR" <<'EOF'
import csv, os, sys
out = sys.argv[1]
summary = os.path.join(out, 'summary.csv')
if not os.path.isfile(summary):
    sys.exit(f'train_timm: no {summary}: nothing to report')
with open(summary) as f:
    rows = [r for r in csv.DictReader(f) if r.get('eval_top1')]
ckpt = os.path.join(out, 'model_best.pth.tar')
print(f'\nCheckpoint: {os.path.abspath(ckpt) if os.path.isfile(ckpt) else "(none saved)"}')
if rows:
    best = max(rows, key=lambda r: float(r['eval_top1']))
    print(f'Validation top-1: {float(best["eval_top1"]):.2f}% (best, epoch {best["epoch"]}); '
          f'last epoch {rows[-1]["epoch"]}: {float(rows[-1]["eval_top1"]):.2f}%')
print(f'Summary: {os.path.abspath(summary)}')
if os.path.isfile(ckpt):
    print(f'Validate it: ./train_timm.sh --validate --checkpoint {os.path.abspath(ckpt)}')
    print(f'Export it:   timm-gsop export {os.path.abspath(ckpt)} {os.path.abspath(out)}/export')
EOF
fi
