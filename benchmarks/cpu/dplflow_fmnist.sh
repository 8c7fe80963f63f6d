#!/usr/bin/env bash
# DP-LFlow on Fashion-MNIST on a CPU: the paper's step counts (100 steps at epsilon 1,
# 300 at epsilon 10, expected batch 5,000), then bits/dim on the real test split and
# downstream accuracy on 10k samples (see common.sh). Writes runs under workdirs/.
# Usage: bash benchmarks/cpu/dplflow_fmnist.sh [EPS ...]   (default: 1 10)
# PER_CLASS=1 trains the paper's layout, one model per class (workdirs/..._per_class).
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/cpu/common.sh
SUFFIX="" OPTS=""
if [[ "${PER_CLASS:-0}" == 1 ]]; then SUFFIX=_per_class OPTS=,per_class; fi
for E in ${@:-1 10}; do
  train_and_eval "eps=$E$OPTS" "workdirs/dplflow_fmnist_eps$E$SUFFIX" \
    "experiments/dplflow_fmnist.py:eps=$E$OPTS"
done
