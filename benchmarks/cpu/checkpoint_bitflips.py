"""What a flipped byte in a checkpoint file does to a restore: refused, or silent.

Saves one small TrainState with ``dpjax.checkpoint.Checkpointer``, then for every file of
the checkpoint flips one bit (0x10) at ``--per-file`` evenly spaced offsets, one at a
time, restores onto the same template and records the outcome:

* ``refused``: ``CheckpointError`` (unreadable, non-finite values);
* ``identical``: restored exactly the saved arrays (the byte was not read, e.g. a
  commit marker or an unused copy of the data);
* ``SILENT``: restored arrays that differ from the saved ones, without an error.

The question behind it: does dpjax need checksums of its own on top of orbax's
(``dpjax/checkpoint.py``'s docstring)? ::

    PYTHONPATH=. .venv/bin/python benchmarks/cpu/checkpoint_bitflips.py \\
        --out=benchmarks/cpu_checkpoint_bitflips.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dpjax import checkpoint as ckpt_lib
from dpjax.state import TrainState


def _state() -> TrainState:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(256,)).astype(np.float32))
    return TrainState(jnp.asarray(2, jnp.int32), {"w": w}, {"f": jnp.zeros((2,))},
                      {"mu": jnp.asarray(rng.normal(size=(256,)).astype(np.float32))}, {"w": w})


def _outcome(directory: str, template: TrainState) -> str:
    checkpointer = ckpt_lib.Checkpointer(directory, read_only=True)
    try:
        state, _ = checkpointer.restore(template)
    except ckpt_lib.CheckpointError:
        return "refused"
    finally:
        checkpointer.close()
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(template),
                   strict=True))
    return "identical" if same else "SILENT"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-file", type=int, default=25)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # orbax logs every failed read.
    root = tempfile.mkdtemp(prefix="dpjax_bitflips.")
    try:
        template = _state()
        checkpointer = ckpt_lib.Checkpointer(root)
        checkpointer.save(2, template, {"plan": {}})
        checkpointer.close()
        step_dir = os.path.join(root, "2")
        rows, totals = [], collections.Counter()
        for folder, _, names in sorted(os.walk(step_dir)):
            for name in sorted(names):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    original = f.read()
                counts = collections.Counter()
                for offset in range(0, len(original), max(1, len(original) // args.per_file)):
                    damaged = bytearray(original)
                    damaged[offset] ^= 0x10
                    with open(path, "wb") as f:
                        f.write(bytes(damaged))
                    counts[_outcome(root, template)] += 1
                with open(path, "wb") as f:
                    f.write(original)
                rows.append({"file": os.path.relpath(path, step_dir), "bytes": len(original),
                             **counts})
                totals.update(counts)
                print(rows[-1], flush=True)
        result = {
            "orbax_checkpoint": ocp.__version__ if hasattr(ocp, "__version__") else "?",
            "jax": jax.__version__,
            "machine": platform.platform(),
            "per_file": args.per_file,
            "files": rows,
            "totals": dict(totals),
        }
        print("totals:", dict(totals))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
