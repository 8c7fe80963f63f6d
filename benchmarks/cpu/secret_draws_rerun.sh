#!/usr/bin/env bash
# The re-runs of benchmarks/secret_draws/ (twenty-seventh session): the CPU-sized private
# rows whose per-example loss draws came from config.seed, trained again now that they
# come from the run's secret (results.md, "Per-example loss draws and add/remove
# neighbours"). Reuses the public stages of benchmarks/cpu/ldm_fmnist.sh (workdirs/
# ae_mnist_quick and workdirs/ldm_fmnist_quick_public: public data, no loss draws of
# private examples) and trains them first if they are missing; 5k evaluation samples.
# The runs of 2026-12-07 ran this from a clone at bcf9fe2 with PY pointing at the
# checkout's .venv and the public stages linked in; times in benchmarks/secret_draws/times.txt.
# The twenty-eighth session (2026-12-07, at 73458c9, the same way) added DP-LDM at epsilon 1
# and DP-SAD at epsilon 1 (teacher 0.8), the last two such rows.
set -euo pipefail
cd "$(dirname "$0")/../.."
export EVAL_SAMPLES=${EVAL_SAMPLES:-5000}
source benchmarks/cpu/common.sh
PUBLIC=workdirs/ldm_fmnist_quick_public
AE=workdirs/ae_mnist_quick
for STAGE in "$AE experiments/ae_mnist.py:quick" \
             "$PUBLIC experiments/ldm_fmnist.py:quick,stage=public,ae=$AE"; do
  set -- $STAGE  # WORKDIR CONFIG, as benchmarks/cpu/ldm_fmnist.sh trains them.
  if [ ! -f "$1/privacy_report.json" ]; then
    $PY -m dpjax.main --config="$2" --workdir="$1" --config.train.progress=False
  fi
done
for V_E in ldm:10 lora:10 lora:1 ldm:1; do
  V=${V_E%%:*} E=${V_E##*:}
  train_and_eval "dp$V eps=$E" "workdirs/dp${V}_fmnist_quick_eps$E" \
    "experiments/ldm_fmnist.py:quick,variant=$V,eps=$E,public=$PUBLIC"
done
bash benchmarks/cpu/dpsad_fmnist.sh 10:8 1:0.8
train_and_eval "dpdm eps=10" workdirs/dpdm_fmnist_quick_eps10 "experiments/dpdm_fmnist.py:quick,eps=10"
