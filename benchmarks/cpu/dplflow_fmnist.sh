#!/usr/bin/env bash
# DP-LFlow on Fashion-MNIST on a CPU: the paper's step counts (100 steps at epsilon 1,
# 300 at epsilon 10, expected batch 5,000), then bits/dim on the real test split and
# downstream accuracy on 10k samples (see common.sh). Writes runs under workdirs/.
# Usage: bash benchmarks/cpu/dplflow_fmnist.sh [EPS ...]   (default: 1 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/cpu/common.sh
for E in ${@:-1 10}; do
  train_and_eval "eps=$E" "workdirs/dplflow_fmnist_eps$E" "experiments/dplflow_fmnist.py:eps=$E"
done
