#!/usr/bin/env bash
# The runs of benchmarks/dp_off/ (twenty-seventh session, a review helper, from a clone at
# 325d6e7): CPU-sized configs with DP switched off, to tell whether DP or the recipe limits
# the CPU rows of results.md. Each run: train, then eval on 1,000 samples (10 classifier
# epochs, no FID, no memorization); two DP-LDM runs also on 5,000. Public stages as in
# benchmarks/cpu/ldm_fmnist.sh. Times: times.txt (CPU shared with other jobs).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-.}
run() {  # run NAME CONFIG [OVERRIDES...]
  local name=$1 cfg=$2; shift 2
  $PY -m dpjax.main --config="$cfg" --workdir=workdirs/dp_off/$name --config.train.progress=False "$@"
  $PY -m dpjax.main --mode=eval --workdir=workdirs/dp_off/$name --config="$cfg" "$@" \
    --config.eval.fid=False --config.eval.num_samples=${N:-1000} \
    --config.eval.downstream_epochs=10 --config.eval.memorization=False
}
PUBLIC=workdirs/ldm_fmnist_quick_public
LDM="experiments/ldm_fmnist.py:quick,variant=ldm,public=$PUBLIC"
run dpdm_quick_nodp experiments/dpdm_fmnist.py:quick --config.dp.enabled=False
run dpdm_quick_nodp_300steps experiments/dpdm_fmnist.py:quick --config.dp.enabled=False --config.dp.steps=300
run dpdm_quick_dp_eps10_300steps experiments/dpdm_fmnist.py:quick --config.dp.steps=300
run dpldm_quick_nodp "$LDM" --config.dp.enabled=False
N=5000 run dpldm_quick_nodp_eval5k "$LDM" --config.dp.enabled=False  # (The helper re-evaluated a copy.)
run dpldm_quick_nodp_600steps "$LDM" --config.dp.enabled=False --config.dp.steps=600
run dpldm_quick_nodp_alltrainable_300steps "$LDM" --config.dp.enabled=False --config.dp.steps=300 \
  "--config.method_args.trainable=()"
# DP-SAD students with DP off, from a DPDM teacher trained with DP off (the helper relaxed
# the teacher check in its clone for these; since 2026-12-07 a student without DP may use
# any teacher): the 30-step teacher, and the 300-step run above.
run dpsad_teacher_nodp "experiments/dpsad_fmnist.py:quick,stage=teacher,teacher_eps=8" --config.dp.enabled=False
run dpsad_student_nodp "experiments/dpsad_fmnist.py:quick,eps=10,teacher_privacy=public,teacher=workdirs/dp_off/dpsad_teacher_nodp" --config.dp.enabled=False
run dpsad_student_nodp_teacher300 "experiments/dpsad_fmnist.py:quick,eps=10,teacher_privacy=public,teacher=workdirs/dp_off/dpdm_quick_nodp_300steps" --config.dp.enabled=False
