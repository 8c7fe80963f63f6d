"""A membership attack by replay: does knowing config.seed give the noise away?

The victim trains the toy method with DP-SGD on an npz dataset D (sigma 2, 30 steps)
and releases its EMA weights. The attacker knows everything but whether D or its
neighbour D' (one image replaced) was used, and knows the seed (0, the default; it is in
config.json and checkable against exported samples). It replays the training with
dp.secret_noise=False and that seed on both candidates and picks the one whose weights
match. With seed-derived noise (the victim ran dp.secret_noise=False, dpjax's only mode
before 2026-12-07) the right candidate matches exactly; with the default secret noise
neither does. ::

    PYTHONPATH=. .venv/bin/python benchmarks/cpu/seed_replay_attack.py \\
        --out=benchmarks/cpu_seed_replay_attack.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import jax
import numpy as np

from dpjax import sample, train
from experiments import toy_fake
from tests.config_overrides import with_overrides


def _config(data_path: str, secret: bool):
    c = toy_fake.get_config("steps=30")
    return with_overrides(c, {
        "data.source": "npz", "data.path": data_path, "data.name": "victim_data",
        "data.num_classes": 2, "dp.noise_multiplier": 2.0, "dp.epsilon": None,
        "dp.batch_size": 32, "dp.microbatch_size": 16, "dp.secret_noise": secret,
        "train.progress": False, "train.grid_samples": 0, "seed": 0,
    })


def _train(root: str, name: str, data_path: str, secret: bool) -> np.ndarray:
    wd = os.path.join(root, name)
    train.train(_config(data_path, secret), wd, log=lambda *_: None)
    _, state, _, _ = sample.restore_state(wd)
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(state.ema)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, 256).astype(np.int64)
    neighbour = images.copy()
    neighbour[17] = 255 - neighbour[17]  # Replace one example.
    result = {"jax": jax.__version__, "machine": platform.platform(), "victims": {}}
    with tempfile.TemporaryDirectory(prefix="dpjax_replay.") as root:
        paths = {}
        for name, imgs in (("D", images), ("D_prime", neighbour)):
            paths[name] = os.path.join(root, f"{name}.npz")
            np.savez(paths[name], images=imgs, labels=labels)
        replays = {name: _train(root, f"replay_{name}", path, secret=False)
                   for name, path in paths.items()}
        for mode, secret in (("seed-derived noise (dp.secret_noise=False)", False),
                             ("secret noise (the default)", True)):
            released = _train(root, f"victim_{secret}", paths["D"], secret)
            gaps = {name: float(np.abs(r - released).max()) for name, r in replays.items()}
            guess = min(gaps, key=gaps.get)
            result["victims"][mode] = {
                "max_abs_gap_to_the_replay_on": gaps,
                "attacker_guess": guess if min(gaps.values()) == 0.0 else "undecided",
            }
            print(mode, gaps, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
