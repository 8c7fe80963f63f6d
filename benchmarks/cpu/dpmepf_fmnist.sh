#!/usr/bin/env bash
# DP-MEPF on Fashion-MNIST on a CPU: the public MNIST feature network, then one release
# and a CPU-sized generator per epsilon, then downstream accuracy on 10k samples (no FID:
# Inception on 60k images needs a GPU). Writes runs under workdirs/ and prints times.
# Usage: bash benchmarks/cpu/dpmepf_fmnist.sh [EPS ...]   (default: 10 1 0.2)
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/cpu/common.sh
FEATURES=workdirs/features_mnist
if [ ! -f "$FEATURES/privacy_report.json" ]; then
  /usr/bin/time -f "features_mnist: %e s" $PY -m dpjax.main \
    --config=experiments/features_mnist.py --workdir=$FEATURES
fi
for E in ${@:-10 1 0.2}; do
  train_and_eval "eps=$E" "workdirs/dpmepf_fmnist_quick_eps$E" \
    "experiments/dpmepf_fmnist.py:quick,eps=$E,features=$FEATURES"
done
