#!/usr/bin/env bash
# DP-MEPF on Fashion-MNIST on a CPU: the public MNIST feature network, then one release
# and a CPU-sized generator per epsilon, then downstream accuracy on 10k samples (no FID:
# Inception on 60k images needs a GPU). Writes runs under workdirs/ and prints times.
# Usage: bash benchmarks/cpu/dpmepf_fmnist.sh [EPS ...]   (default: 10 1 0.2)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-.}
FEATURES=workdirs/features_mnist
if [ ! -f "$FEATURES/privacy_report.json" ]; then
  /usr/bin/time -f "features_mnist: %e s" $PY -m dpjax.main \
    --config=experiments/features_mnist.py --workdir=$FEATURES
fi
for EPS in "${@:-10 1 0.2}"; do
  for E in $EPS; do
    WD=workdirs/dpmepf_fmnist_quick_eps$E
    CFG="experiments/dpmepf_fmnist.py:quick,eps=$E,features=$FEATURES"
    /usr/bin/time -f "train eps=$E: %e s" $PY -m dpjax.main --config="$CFG" --workdir=$WD \
      --config.train.progress=False
    /usr/bin/time -f "eval eps=$E: %e s" $PY -m dpjax.main --mode=eval --workdir=$WD \
      --config="$CFG" --config.eval.fid=False --config.eval.num_samples=10000 \
      --config.eval.downstream_epochs=10
  done
done
