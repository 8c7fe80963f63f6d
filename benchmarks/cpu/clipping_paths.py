"""The three clipping paths side by side on one micro-batch: time, memory, agreement.

For each model, ``clipping.clipped_grad_sum`` with impl 'vmap' (the reference),
'layerwise' and 'ghost' on the same batch (C below the typical norm, so clipping acts):
compile time, mean time of ``--repeats`` calls after one warm-up, the compiled
executable's temporary memory (``memory_analysis``), the largest relative difference of
the per-example norms and of the clipped sum from the reference's, and the fraction of
trainable parameters the ghost path never forms per-example gradients for. Models:

* ``dpldm_fmnist``: DP-LDM's private stage at the ``quick`` size of
  ``experiments/ldm_fmnist.py`` (28x28 -> 7x7x3 latents of an f=4 autoencoder, UNet width
  32, self- and cross-attention at 7x7), only its attention and class-embedding layers
  trainable, K = 1.
* ``dpldm_cifar10``: DP-LDM's private stage of ``experiments/ldm_cifar10.py`` at its full
  size (32x32x3 -> 16x16x3 latents of an f=2 autoencoder, UNet width 128, ch_mult
  (1, 2, 2, 4), attention at 16, 8 and 4 with 512-d context, the public 1000-class
  embedder), attention and class embedding trainable, K = 1.
* ``dplora_fmnist``: DP-LoRA's private stage at the same ``quick`` size: rank-8 adapters
  on the attention projections and the class embedding trainable, K = 12 (the settings
  of ``experiments/ldm_fmnist.py``).
* ``dpdm``: DPDM's Fashion-MNIST UNet (1.75M parameters) at K = 1.

Autoencoders and frozen weights are untrained and the trainable ones randomly perturbed
(timing only: the values do not change the work). C is the reference path's median
per-example norm, so half the examples are clipped.

Usage (CPU, from the repository root)::

    python benchmarks/cpu/clipping_paths.py --models dpldm_fmnist,dpldm_cifar10,dpdm \
        --batch 32 \\
        --out benchmarks/cpu_clipping_paths.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dpjax.methods import autoencoder, base, dpdm, ldm  # noqa: E402
from dpjax.methods.base import count_params  # noqa: E402
from dpjax.privacy import clipping, ghost  # noqa: E402

MODELS = ("dpldm_fmnist", "dplora_fmnist", "dpldm_cifar10", "dpdm")
IMPLS = ("vmap", "layerwise", "ghost")


def make_method(model: str) -> tuple[base.Method, base.DataSpec]:
    """The method of ``model`` (module docstring) and its data spec."""
    common = {"scale_factor": 1.0, "noise_multiplicity": 1, "dropout": 0.0}
    if model in ("dpldm_fmnist", "dplora_fmnist"):
        spec = base.DataSpec((28, 28, 1), 10)
        if model == "dpldm_fmnist":
            tuning = {"trainable": ("attn", "class_embed")}
        else:
            common["noise_multiplicity"] = 12
            tuning = {"trainable": ("class_embed",), "lora_rank": 8, "lora_targets": ("attn",)}
        cfg = ldm.Config(
            untrained_autoencoder=autoencoder.Config(
                downsample=4, z_channels=3, ch=16, ch_mult=(1, 2, 2)
            ),
            nf=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(7,),
            cross_attention_heads=4, **tuning, **common,
        )  # fmt: skip
        return ldm.make(cfg, spec), spec
    if model == "dpldm_cifar10":
        spec = base.DataSpec((32, 32, 3), 10)
        cfg = ldm.Config(
            untrained_autoencoder=autoencoder.Config(
                downsample=2, z_channels=3, ch=128, ch_mult=(1, 2)
            ),
            nf=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16, 8, 4),
            cross_attention_heads=8, context_dim=512, unet_classes=1000,
            trainable=("attn", "class_embed"), **common,
        )  # fmt: skip
        return ldm.make(cfg, spec), spec
    if model == "dpdm":
        spec = base.DataSpec((28, 28, 1), 10)
        return dpdm.make(dpdm.Config(noise_multiplicity=1, dropout=0.0), spec), spec
    raise ValueError(f"Unknown model '{model}': use one of {MODELS}.")


def _random_like(tree: Any, seed: int) -> Any:
    """Random values (a fresh UNet's zero output layers would block some gradients)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(x + rng.normal(0, 0.05, x.shape).astype(np.float32)), tree
    )


def _rel(a: Any, b: Any) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = np.sqrt(sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(la, lb)))
    den = np.sqrt(sum(float(np.sum(np.asarray(y) ** 2)) for y in lb))
    return num / max(den, 1e-30)


def run_model(model: str, batch: int, repeats: int) -> list[dict[str, Any]]:
    """One entry per clipping path for ``model`` (module docstring)."""
    method, spec = make_method(model)
    params = jax.jit(method.init, static_argnums=1)(jax.random.key(0), spec)
    trainable = _random_like(params.trainable, 1)
    frozen = params.frozen
    rng = np.random.default_rng(2)
    ex = {
        "image": jnp.asarray(rng.uniform(-1, 1, (batch, *spec.image_shape)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, spec.num_classes, batch), jnp.int32),
    }
    mask = jnp.ones(batch, bool)
    keys = jax.random.split(jax.random.key(3), batch)
    entries, ref = [], None
    clip = None
    for impl in IMPLS:
        # C is an argument (traced): the first call measures the norms, no recompile.
        fn = jax.jit(
            lambda t, f, e, m, k, c, impl=impl: clipping.clipped_grad_sum(
                method.loss_per_example, t, f, e, m, k, clip_norm=c,
                microbatch_size=batch, impl=impl,
            )
        )  # fmt: skip
        args = (trainable, frozen, ex, mask, keys, jnp.float32(1e30 if clip is None else clip))
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        out = jax.block_until_ready(compiled(*args))
        if clip is None:
            clip = float(np.median(np.asarray(out.norms)))
            args = (*args[:-1], jnp.float32(clip))
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = jax.block_until_ready(compiled(*args))
        step_s = (time.perf_counter() - t0) / repeats
        analysis = compiled.memory_analysis()
        entry = {
            "model": model,
            "trainable_params": count_params(trainable),
            "batch": batch,
            "impl": impl,
            "clip_norm": clip,
            "compile_s": compile_s,
            "step_s": step_s,
            "temp_bytes": None if analysis is None else int(analysis.temp_size_in_bytes),
            "frac_clipped": float(out.num_clipped) / batch,
        }
        if impl == "vmap":
            ref = out
        else:
            err = np.abs(np.asarray(out.norms) - np.asarray(ref.norms)) / np.asarray(ref.norms)
            entry["norms_max_rel_err"] = float(np.max(err))
            entry["sum_rel_err"] = _rel(out.grad_sum, ref.grad_sum)
            entry["time_vs_vmap"] = step_s / entries[0]["step_s"]
        if impl == "ghost":
            entry["ghosted_fraction"] = ghost.ghosted_fraction(
                method.loss_per_example, trainable, frozen, ex, mask, keys
            )
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    payload = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "entries": [],
    }
    for model in args.models.split(","):
        payload["entries"] += run_model(model.strip(), args.batch, args.repeats)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
