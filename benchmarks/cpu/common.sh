# Shared by benchmarks/cpu/*.sh (source it): one CPU-sized run and its evaluation.
# train_and_eval TAG WORKDIR CONFIG: trains (or resumes) the run, then evaluates it on
# EVAL_SAMPLES samples (default 10k; no FID: Inception on 60k images needs a GPU; 10
# classifier epochs) and prints the wall time of each part. EVAL_FLAGS adds eval flags:
# e.g. "--config.eval.downstream=False --config.eval.memorization=False" with
# EVAL_SAMPLES=1000 only caches samples for benchmarks/cpu/fid_small.py.
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-.}
EVAL_SAMPLES=${EVAL_SAMPLES:-10000}
EVAL_FLAGS=${EVAL_FLAGS:-}

train_and_eval() {
  local tag=$1 wd=$2 cfg=$3
  /usr/bin/time -f "train $tag: %e s" $PY -m dpjax.main --config="$cfg" --workdir="$wd" \
    --config.train.progress=False
  /usr/bin/time -f "eval $tag: %e s" $PY -m dpjax.main --mode=eval --workdir="$wd" \
    --config="$cfg" --config.eval.fid=False --config.eval.num_samples=$EVAL_SAMPLES \
    --config.eval.downstream_epochs=10 $EVAL_FLAGS
}
