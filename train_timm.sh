#!/usr/bin/env bash
# The launcher of a checkout: `timm-gsop` (python -m timm_gsop) with this checkout's package. It trains unless the
# first argument names another command (validate, benchmark, export, push); --validate / --benchmark anywhere stand
# for those two. `./train_timm.sh --help` lists the options; every other argument goes to train.py unchanged.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command=train
case "${1:-}" in train | validate | benchmark | export | push) command="$1" && shift ;; esac
args=()
for arg in "$@"; do
  case "$arg" in --validate | --benchmark) command="${arg#--}" ;; *) args+=("$arg") ;; esac
done
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, installed or not
export TIMM_GSOP_LAUNCHER="$here/train_timm.sh"       # the commands it prints name this script
exec "${PYTHON:-python3}" -m timm_gsop "$command" ${args[@]+"${args[@]}"}
