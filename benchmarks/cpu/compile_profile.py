"""Where the DP step's compile time goes: the whole step per variant, then its parts.

Issue 5 asks for a DP step that compiles in under 30 s. This script measures, for the
steps ``benchmarks/dp_step.py`` times (the same builders, so the same programs):

* per variant ('plain', 'fast' = layerwise, 'ghost', 'reference' = vmap): the time to
  lower (trace to StableHLO) and to compile, and the number of instructions in the
  compiled (optimized) HLO, a count that does not depend on the machine's load;
* per part of the step, each jitted alone on the same parameters and batch: the loss's
  forward pass, the gradient of the summed loss (what a plain step differentiates),
  the clipped sum of each clipping path, the Gaussian noise on the parameter pytree,
  and Adam with the EMA.

Usage (CPU, from the repository root)::

    python benchmarks/cpu/compile_profile.py --batch 32 \\
        --out benchmarks/cpu_compile_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import dp_step as bench  # noqa: E402

from dpjax.privacy import clipping, noise  # noqa: E402
from dpjax.privacy.dp_step import example_keys, gather_examples  # noqa: E402
from dpjax.randomness import Streams  # noqa: E402

VARIANTS = ("plain", "fast", "ghost", "reference")


def hlo_instructions(compiled: Any) -> int:
    """Instructions in the compiled module's text (one ``name = ...`` line each)."""
    return sum(1 for line in compiled.as_text().splitlines() if " = " in line)


def lower_and_compile(fn: Callable[..., Any], *args: Any) -> dict[str, float | int]:
    """Seconds to lower and to compile ``fn`` (a jitted function) on ``args``."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        "hlo_instructions": hlo_instructions(compiled),
    }


def profile(
    model: str, batch: int, k: int, variants: tuple[str, ...] = VARIANTS, parts: bool = True
) -> dict[str, Any]:
    """The whole steps of ``variants`` and (with ``parts``) the parts (module docstring)
    at (batch, k), one micro-batch."""
    method = bench.make_method(model, k, tiny=False)
    streams = Streams.from_seed(0)
    optimizer = optax.adam(bench.LEARNING_RATE)
    trainable = bench.init_params(method, streams)
    plan = bench.make_plan_for(batch)
    data = bench.synthetic_batch(batch)
    args = bench._batch_args(data, streams)
    steps = {}
    for variant in variants:
        step = bench.make_step(variant, method, optimizer, plan, batch)
        steps[variant] = lower_and_compile(step, bench.fresh_state(trainable, optimizer), *args)
        print(json.dumps({"step": variant, **steps[variant]}), flush=True)

    examples = gather_examples(data["images"], data["labels"], data["indices"])
    keys = example_keys(streams.loss, data["indices"])

    def summed_loss(t):
        losses, _ = jax.vmap(method.loss_per_example, in_axes=(None, None, 0, 0))(
            t, {}, examples, keys
        )
        return jnp.sum(losses)

    def clipped(impl):
        def fn(t):
            return clipping.clipped_grad_sum(
                method.loss_per_example, t, {}, examples, data["mask"], keys,
                clip_norm=1.0, microbatch_size=batch, impl=impl,
            ).grad_sum  # fmt: skip

        return fn

    def adam_and_ema(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: 0.999 * e + 0.001 * p, params, new)
        return new, opt_state, ema

    parts_fns = {
        "forward": (summed_loss, (trainable,)),
        "grad_of_summed_loss": (jax.grad(summed_loss), (trainable,)),
        **{f"clipped_sum_{i}": (clipped(i), (trainable,)) for i in clipping.MICROBATCH_IMPLS},
        "noise": (lambda g, key: noise.add_gaussian_noise(g, key, 1.0), (trainable, streams.noise)),
        "adam_and_ema": (adam_and_ema, (trainable, optimizer.init(trainable), trainable)),
    }
    timed = {}
    for name, (fn, fn_args) in parts_fns.items() if parts else ():
        timed[name] = lower_and_compile(jax.jit(fn), *fn_args)
        print(json.dumps({"part": name, **timed[name]}), flush=True)
    return {
        "model": model,
        "batch": batch,
        "k": k,
        "leaves": len(jax.tree_util.tree_leaves(trainable)),
        "steps": steps,
        "parts": timed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dpdm", choices=("dpdm", "anchor"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-parts", action="store_true", help="Whole steps only.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = tuple(v for v in args.variants.split(",") if v)
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; use {VARIANTS}")
    record = {
        "command": "python " + " ".join(sys.argv),
        "host": platform.node(),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        **profile(args.model, args.batch, args.k, variants, not args.no_parts),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
