"""Trains an old run again with today's code, its noise secret and its seed loss draws.

An experiment, not a way to train: it answers whether the training code changed in
effect since ``OLD`` ran. ``OLD`` was trained before per-example loss draws came from
the run's secret (results.md, "Per-example loss draws and add/remove neighbours"): its
noise and batches came from its ``noise_secret.json``, its loss draws from
``config.seed``. This script trains ``EXPERIMENT`` into ``NEW`` with that same secret
and the seed's loss key, then compares ``NEW``'s last checkpoint and metrics with
``OLD``'s. Identical arrays mean the code trains the same run as then, so a re-run with
secret draws differs from ``OLD`` by its draws alone.

``NEW`` records its loss draws as 'seed' (they are): its report says it has no
guarantee and export refuses it. It reuses ``OLD``'s noise on the same data: never
release anything from it. For the same reason the script lets a run compose a replayed
source (a DP-SAD student on its replayed teacher), which a real run refuses.

Usage (from the repository root, with ``OLD``'s relative source paths valid here):
  CFG=experiments/ldm_fmnist.py:quick,variant=lora,eps=10,public=workdirs/ldm_fmnist_quick_public
  PYTHONPATH=. .venv/bin/python benchmarks/cpu/replay_seed_loss_draws.py \\
      workdirs/dplora_fmnist_quick_eps10 /tmp/replay_dplora10 "$CFG" [--out result.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpjax import experiment_file, run_noise, train
from dpjax.privacy import noise_secret, provenance


def _metrics(workdir: str) -> list[dict]:
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            row.pop("steps_per_s", None)  # Wall time: the one field that may differ.
            rows.append(row)
    return rows


def _leaves(workdir: str, step: int) -> list[np.ndarray]:
    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.PyTreeCheckpointer().restore(path)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("experiment", help="PATH[:ARGS], as --config= of dpjax.main")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if os.path.exists(args.new):
        raise SystemExit(f"{args.new} exists: give a new workdir.")
    with open(os.path.join(args.old, noise_secret.SECRET_FILE)) as f:
        old_secret = json.load(f)
    if old_secret.get(noise_secret.LOSS_DRAWS_FIELD) == noise_secret.LOSS_DRAWS_SECRET:
        raise SystemExit(f"{args.old} drew its loss draws from its secret: nothing to replay.")

    # The old run's noise and batches: its secret, as a placed secret would give them.
    noise_secret.load_or_create = lambda *a, **k: (old_secret["noise"], old_secret["batches"])
    secret_streams = run_noise.noise_randomness

    def seed_loss_draws(cfg, workdir, streams, meta, *rest, **kw):
        new, batches, source, _ = secret_streams(cfg, workdir, streams, meta, *rest, **kw)
        return dataclasses.replace(new, loss=streams.loss), batches, source, noise_secret.SEED

    run_noise.noise_randomness = seed_loss_draws
    # A replayed source (a DP-SAD teacher replayed first) records its loss draws as
    # 'seed', and a run refuses to compose such a source: the replay of its student lets
    # it through, as the earlier student composed the earlier teacher (nothing of either
    # replay is released).
    provenance.check_composed_randomness = lambda *a, **k: None
    path, _, config_args = args.experiment.partition(":")
    config = experiment_file.load(path, "replayed_experiment").get_config(config_args)
    config.train.progress = False
    start = time.perf_counter()
    train.train(config, args.new)
    seconds = time.perf_counter() - start

    step = max(int(s) for s in os.listdir(os.path.join(args.old, "checkpoints")) if s.isdigit())
    new_leaves, old_leaves = _leaves(args.new, step), _leaves(args.old, step)
    same = sum(a.shape == b.shape and np.array_equal(a, b)
               for a, b in zip(new_leaves, old_leaves, strict=False))
    result = {
        "old": args.old, "new": args.new, "experiment": args.experiment, "step": step,
        "leaves": len(old_leaves), "leaves_identical": int(same),
        "same_leaf_count": len(new_leaves) == len(old_leaves),
        "metrics_identical_but_wall_time": _metrics(args.new) == _metrics(args.old),
        "train_seconds": round(seconds, 1),
    }
    print("REPLAY", json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
