#!/usr/bin/env bash
# Prepares, on the development machine, what benchmarks/gpu/*.sh and benchmarks/dp_step.py
# need on a lent GPU machine that has no internet (see benchmarks/results.md):
#   .gpu/whl/       dp-accounting, ml-collections, dm-tree, opacus (the image lacks them;
#                   opacus ships a top-level 'benchmarks' package: put $PWD first on
#                   PYTHONPATH there)
#   .gpu/whl_min/   dp-accounting and ml-collections only
#   .gpu/fmnist/    Fashion-MNIST IDX files, xz-compressed (26 MB)
#   .gpu/inception16.npz.xz   the FID Inception weights as converted by
#                   dpjax.eval.inception_weights, rounded to float16 (39 MB); with the
#                   data and the tree that is over one call's 64 MiB: PLAN.md splits
#                   the carry between calls
#   .gpu/bench/     a copy of ../shared/bench (the anchor benchmarks)
# Usage, from the repository root after `make install fmnist`: bash benchmarks/gpu/prepare_carry.sh
set -euo pipefail
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
mkdir -p .gpu/whl .gpu/whl_min .gpu/fmnist .gpu/bench
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  dp-accounting ml-collections dm-tree opacus
cp .gpu/whl/dp_accounting-*.whl .gpu/whl/ml_collections-*.whl .gpu/whl_min/
for f in /usr/share/datasets/fashion-mnist/*.gz; do
  b=$(basename "$f" .gz); [ -s ".gpu/fmnist/$b.xz" ] || zcat "$f" | xz -9e -T2 > ".gpu/fmnist/$b.xz"
done
[ -d ../shared/bench ] && cp ../shared/bench/*.py .gpu/bench/
if [ ! -s .gpu/inception16.npz.xz ]; then
  .venv/bin/python - <<'PY'
import jax
import numpy as np

from dpjax.eval import inception_weights

params = inception_weights.load_inception_params()
flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v, np.float16)
    for path, v in jax.tree_util.tree_leaves_with_path(params)
}
np.savez(".gpu/inception16.npz", **flat)
PY
  xz -9e -T2 .gpu/inception16.npz
fi
du -sh .gpu/*
