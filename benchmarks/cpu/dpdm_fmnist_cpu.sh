#!/usr/bin/env bash
# DPDM on Fashion-MNIST at the CPU size of experiments/dpdm_fmnist.py:cpu (the demo's
# UNet, one epoch of the 60k private images as 120 Poisson steps of 512, K=1): both
# privacy levels trained side by side (one core each), then downstream accuracy on 10k
# samples (common.sh), then FID of 1,000 samples against 1,000 test and 1,000 train
# images (fid_small.py). Writes runs under workdirs/ and benchmarks/cpu_fid_1k_dpdm_cpu.json.
# Usage: bash benchmarks/cpu/dpdm_fmnist_cpu.sh [EPS ...]   (default: 10 1)
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/cpu/common.sh
EPSILONS=${@:-10 1}
for E in $EPSILONS; do
  train_and_eval "dpdm cpu eps=$E" "workdirs/dpdm_fmnist_cpu_eps$E" \
    "experiments/dpdm_fmnist.py:cpu,eps=$E" > "workdirs/dpdm_fmnist_cpu_eps$E.log" 2>&1 &
done
wait
for E in $EPSILONS; do tail -n 3 "workdirs/dpdm_fmnist_cpu_eps$E.log"; done
$PY benchmarks/cpu/fid_small.py --n=1000 --out=benchmarks/cpu_fid_1k_dpdm_cpu.json \
  $(for E in $EPSILONS; do echo "workdirs/dpdm_fmnist_cpu_eps$E"; done)
