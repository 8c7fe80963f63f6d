#!/usr/bin/env bash
# One DPDM Fashion-MNIST run on a lent GPU machine (no internet), then its evaluation:
# 60k samples, FID against the train and test statistics, LogReg/MLP/CNN accuracy.
# benchmarks/results.md quotes what this printed; the exact command is recorded there.
#
# Carried to the machine (made by benchmarks/gpu/prepare_carry.sh, git-ignored):
#   .gpu/whl_min/   dp-accounting and ml-collections wheels (the image lacks them)
#   .gpu/fmnist/    the four Fashion-MNIST IDX files, xz-compressed
#   .gpu/inception16.npz.xz   the FID Inception weights converted by
#                   dpjax.eval.inception_weights and rounded to float16 (39 MB)
# Data and weights together are over one call's 64 MiB with the tree: a call may carry
# the weights alone when .cache_gpu/data already holds the data (benchmarks/gpu/PLAN.md).
# Environment: EPS, BATCH, K, EPOCHS, MB (micro-batch), LR, TAG, TRAIN_LIMIT, EVAL_LIMIT
# (seconds), EXTRA (more --config overrides). Results go to $OUT/$TAG.tgz (eval.json, reports, grids, metrics, export).
# Two runs sharing one GPU: export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 for each (by
# default each JAX process takes 75% of the memory and the second one fails).
set -uo pipefail
: "${EPS:?}" "${BATCH:?}" "${K:?}" "${EPOCHS:?}" "${MB:=256}" "${LR:=3e-4}" "${TAG:=run}"
: "${TRAIN_LIMIT:=300}" "${EVAL_LIMIT:=240}" "${OUT:=/tmp/out}"
C=$PWD/.cache_gpu  # kept between calls while the machine stays warm
mkdir -p "$C/site" "$C/data" "$C/jax" "$C/dpjax" "$OUT"
if [ ! -f "$C/site/.ok" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$C/site" .gpu/whl_min/*.whl \
    && touch "$C/site/.ok" || exit 1
fi
export PYTHONPATH="$C/site:$PWD" PYTHONUNBUFFERED=1 DPJAX_CACHE="$C/dpjax"
export JAX_COMPILATION_CACHE_DIR="$C/jax"
for f in .gpu/fmnist/*.xz; do
  [ -e "$f" ] || continue; b=$(basename "$f" .xz); [ -s "$C/data/$b" ] || xz -dc "$f" > "$C/data/$b"
done
W16="$C/dpjax/inception16.npz"
[ -s "$W16" ] || xz -dc .gpu/inception16.npz.xz > "$W16"
W="$C/runs/$TAG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
date -u
T0=$(date +%s)
# The loop stops itself with a checkpoint at TRAIN_LIMIT (max_seconds_per_run, counted
# from the first step, its compilation included); the outer timeout is only a safety net.
timeout "$((TRAIN_LIMIT + 180))" python3 -m dpjax.main \
  --config="experiments/dpdm_fmnist.py:eps=$EPS,K=$K,batch=$BATCH,epochs=$EPOCHS,microbatch=$MB" \
  --config.dp.clipping=layerwise --config.data.path="$C/data" \
  --config.optim.learning_rate="$LR" --config.train.ckpt_every=100 \
  --config.train.max_seconds_per_run="$TRAIN_LIMIT" \
  --config.train.log_every=25 --config.eval.inception_weights="$W16" \
  --config.eval.sample_batch=6000 --config.eval.fid_batch=500 ${EXTRA:-} --workdir="$W" 2>&1 | grep -v Warning
T1=$(date +%s)
echo "train wall seconds: $((T1 - T0))"
timeout "$EVAL_LIMIT" python3 -m dpjax.main --mode=eval --workdir="$W" 2>&1 | grep -v Warning
T2=$(date +%s)
echo "eval wall seconds: $((T2 - T1))"
python3 -m dpjax.main --mode=export --workdir="$W" --out="$W/export" 2>&1 | tail -2
# The samples folders' grids come back (eval_report.md shows samples/step_N/samples_grid.png);
# their 60k samples and Inception features (hundreds of MB) stay.
cd "$W" && tar czf "$OUT/$TAG.tgz" --exclude=checkpoints --exclude=xla_cache \
  --exclude='samples/*/*.np[yz]' --exclude='samples/*/*.json' --exclude='samples/*/*.lock' \
  --exclude='events*' . \
  && ls -la "$OUT"
