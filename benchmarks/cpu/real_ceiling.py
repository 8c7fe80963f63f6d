"""The downstream evaluation's ceiling on a CPU: its classifiers trained on real images.

``--mode=eval`` trains LogReg, MLP and CNN on N generated samples (10% held out to pick
the epoch) and scores them on the real test set. This trains the same classifiers, the
same way, on N random real Fashion-MNIST training images instead (numpy seed 0), so a
row of benchmarks/results.md can be read against what its N and epochs allow at best.
Writes benchmarks/dp_off/real_ceiling.json.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/cpu/real_ceiling.py
"""

import json
import os
import time

import numpy as np

from dpjax import data as data_lib
from dpjax.data.config import DataConfig
from dpjax.eval import downstream

SETTINGS = ((1000, 10), (5000, 10), (1000, 50))  # (N images, classifier epochs).
OUT = os.path.join(os.path.dirname(__file__), "..", "dp_off", "real_ceiling.json")


def main() -> None:
    def load(split):
        return data_lib.load(DataConfig(source="idx", name="fashion_mnist", num_classes=10,
                                        split=split))

    train, test = load("train"), load("test")
    out = {}
    for n, epochs in SETTINGS:
        idx = np.random.default_rng(0).permutation(len(train.images))[:n]
        start = time.time()
        result = downstream.evaluate_downstream(train.images[idx], train.labels[idx],
                                                test.images, test.labels, 10,
                                                epochs=epochs, seed=0)
        out[f"n={n},epochs={epochs}"] = {k: round(v["test_accuracy"], 4)
                                         for k, v in result.items()}
        print(n, epochs, out[f"n={n},epochs={epochs}"], f"{time.time() - start:.0f} s")
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
