#!/usr/bin/env bash
# DP-SAD on Fashion-MNIST on a CPU, at the CPU size of experiments/dpsad_fmnist.py:quick:
# per total epsilon, a DP teacher (DPDM quick) at 80% of the budget, then the student and
# discriminator distilled with DP-SGD at the share that the composition leaves (the
# student's report composes the teacher's training), then downstream accuracy on 5k
# samples (see common.sh; no FID on a CPU). DPDM from scratch at the same total epsilon
# is benchmarks/cpu/ldm_fmnist.sh's dpdm_fmnist_quick_eps* runs.
# Usage: bash benchmarks/cpu/dpsad_fmnist.sh [EPS:TEACHER_EPS ...]   (default: 10:8 1:0.8)
set -euo pipefail
cd "$(dirname "$0")/../.."
# 5k evaluation samples, not 10k: diffusion sampling is the slowest part of a CPU eval.
EVAL_SAMPLES=${EVAL_SAMPLES:-5000}
source benchmarks/cpu/common.sh
for PAIR in ${@:-10:8 1:0.8}; do
  E=${PAIR%%:*} TE=${PAIR##*:}
  TEACHER=workdirs/dpsad_fmnist_quick_teacher_eps$TE
  if [ ! -f "$TEACHER/privacy_report.json" ]; then
    /usr/bin/time -f "teacher eps=$TE: %e s" $PY -m dpjax.main --workdir=$TEACHER \
      --config="experiments/dpsad_fmnist.py:quick,stage=teacher,teacher_eps=$TE" \
      --config.train.progress=False
  fi
  train_and_eval "dpsad eps=$E (teacher $TE)" "workdirs/dpsad_fmnist_quick_eps$E" \
    "experiments/dpsad_fmnist.py:quick,eps=$E,teacher_eps=$TE,teacher=$TEACHER"
done
