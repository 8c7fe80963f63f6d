#!/usr/bin/env bash
# The full --mode=eval protocol of issue 4 on the CPU: 60k samples, FID against the
# train and test statistics, LogReg/MLP/CNN on the 60k labelled samples (50 epochs),
# memorization in pixel and Inception space. Inception runs at about 6 images/s on
# the 2-core CPU, so this takes several sessions: every part resumes where it stopped
# (dpjax/eval/resumable_array.py); run the same command again to go on.
# A second process computes the real splits' features beside the eval (one core each).
# Usage: bash benchmarks/cpu/eval_60k.sh WORKDIR   (logs in workdirs/logs/)
# FID_BATCH=N overrides the run's eval.fid_batch in both processes (the cached features
# are keyed on it), SAMPLE_BATCH=N its eval.sample_batch: runs configured before these
# were 0 (auto: 8 and 50 on a CPU) stored 200 and 1000, 1.36x and 1.26x slower here.
set -euo pipefail
cd "$(dirname "$0")/../.."
WD=${1:?usage: eval_60k.sh WORKDIR}
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-.}
TAG=$(basename "$WD")
REF_ARGS=() EVAL_ARGS=()
if [ -n "${FID_BATCH:-}" ]; then
  REF_ARGS=(--batch "$FID_BATCH") EVAL_ARGS=(--fid_batch="$FID_BATCH")
fi
if [ -n "${SAMPLE_BATCH:-}" ]; then
  EVAL_ARGS+=(--sample_batch="$SAMPLE_BATCH")
fi
mkdir -p workdirs/logs
nice -n 10 $PY -u benchmarks/cpu/fid_reference.py --workdir "$WD" --splits test,train \
  "${REF_ARGS[@]}" >> workdirs/logs/fid_reference.log 2>&1 &
/usr/bin/time -f "eval $TAG: %e s" nice -n 10 $PY -u -m dpjax.main --mode=eval \
  --workdir="$WD" "${EVAL_ARGS[@]}" >> "workdirs/logs/eval60k_$TAG.log" 2>&1
wait
