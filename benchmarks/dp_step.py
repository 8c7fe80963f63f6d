"""Times dpjax's real DP-SGD step against a non-private step of the same model.

Variants of one training step, on the same method, optimizer (Adam, lr 3e-4), EMA
and synthetic batch:

* ``plain``: non-private. One jitted step taking ``jax.grad`` of the MEAN of
  ``method.loss_per_example`` over the batch (vmapped), the optax update and the same EMA
  update as the DP step: no clipping, no noise. Logical batches larger than one
  micro-batch sum the gradients over micro-batches in a ``fori_loop``, as the DP step does.
* ``fast``: ``dpjax.privacy.dp_step.make_train_step(..., clipping_impl='layerwise')``,
  exactly the step ``dpjax.train`` runs.
* ``ghost``: the same with ``clipping_impl='ghost'`` (per-example norms without
  per-example gradients where cheaper, and the clipped sum as one reweighted product per
  layer; ``dpjax/privacy/ghost.py``).
* ``reference``: the same with ``clipping_impl='vmap'`` (vmap of grad).
* ``bf16``: the reference path with ``compute_dtype='bfloat16'`` (autocast): the per-example
  forward and backward passes in bfloat16, gradients, clipping, sum and noise in float32.
  Not part of the default ``--variants``.
* ``fast_bf16``: the ``fast`` path with ``compute_dtype='bfloat16'``: the model's forward
  and backward in bfloat16, the per-example products, clipping and sum in float32. Not
  part of the default ``--variants``.

All variants donate the training state. Each (B, K) case uses B real examples (no Poisson
padding: the batch has exactly the expected size), uint8 images on the device gathered
by index as in training, and a plan with N = 60000 (Fashion-MNIST), q = B/N, sigma = 1,
C = 1. Models: ``--model dpdm`` (DPDM's Fashion-MNIST NCSN++ UNet, 1.75M parameters,
K = noise multiplicity) and ``--model anchor`` (the anchor benchmark's UNet, 6.3M
parameters, ``benchmarks/anchor_unet.py``). Cases whose B exceeds ``--microbatch-above``
(default 1024; the paper's 4096 x 32) run as one logical batch in micro-batches of
``--microbatch`` examples and by default only with ``--logical-variants`` (plain, fast,
ghost);
``BxK/m`` sets the micro-batch of one case explicitly. For those cases the entry also
projects the DPDM recipe: int(300 * 60000 / B) steps (4394 at B = 4096) at the measured
step time, in hours.

Per entry: compile time (``lower`` + ``compile``), mean step time over ``--steps`` timed
steps after ``--warmup`` untimed ones (one ``block_until_ready`` at the end), examples
(and noised images) per second, the ratio to the plain step of the same case, the
device's process-wide peak memory (``memory_stats()``, where available) and the compiled
executable's ``memory_analysis()`` sizes. Timings use the default matmul precision (TF32
on recent NVIDIA GPUs, like the anchor); ``--check`` compares fast and ghost with
reference at 'highest' precision first (one step, sigma = 0, SGD so the update IS the
clipped mean gradient) and stops the run if either disagrees, so a wrong fast path is
never timed.

``--flops`` adds each step's arithmetic, counted from its jaxpr by
``benchmarks/flop_count.py`` (matmul and convolution FLOPs, loops multiplied out; the
DP step's micro-batch loop is assumed to run B / m trips, as every row here is real), and
the ratio of its matmul FLOPs to the plain step's. ``--flops-only`` traces the steps and
counts, without compiling or timing them: a hardware-free check of how much arithmetic
each path adds, which runs at full size on a CPU in a few minutes.

``--profile DIR`` traces one more step of every timed entry with ``jax.profiler`` into
``DIR/<case>_<variant>`` (a Chrome trace, ``*.trace.json.gz``, for Perfetto) and adds
its summary to the entry (``benchmarks/trace_summary.py``): per process (on a GPU, the
device, its streams together) the number of kernels, their total time and the most
expensive ones,
by name and by HLO op. That is where the DP step's time goes, kernel by kernel, without
opening a viewer during a short device lease.

Each entry is printed as one JSON line when done and the ``--out`` file (meta, check,
entries) is rewritten after every entry, so a killed run keeps what it measured.

Usage (GPU, beside the anchor ``../shared/bench/unet_torch.py`` and ``unet_jax.py``; from
the repository root)::

    python benchmarks/dp_step.py --model anchor --cases 256x1,64x4,32x32 --check
    python benchmarks/dp_step.py --model dpdm --cases 256x1,64x4,32x32,4096x32
    python benchmarks/dp_step.py --tiny --check --out /tmp/dp_step.json   # CPU smoke
    python benchmarks/dp_step.py --model dpdm --flops-only --out /tmp/flops.json  # arithmetic
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import anchor_unet, flop_count, trace_summary  # noqa: E402
from dpjax import atomic_file  # noqa: E402
from dpjax.methods import dpdm  # noqa: E402
from dpjax.methods.base import DataSpec, Method, count_params  # noqa: E402
from dpjax.privacy import ghost  # noqa: E402
from dpjax.privacy.dp_step import example_keys, gather_examples, make_train_step  # noqa: E402
from dpjax.privacy.plan import DPPlan, make_plan  # noqa: E402
from dpjax.randomness import Streams  # noqa: E402
from dpjax.state import TrainState, ema_decay  # noqa: E402

PyTree = Any
SPEC = DataSpec((28, 28, 1), 10)
NUM_EXAMPLES = 60000  # Fashion-MNIST: the plan's (public) N.
RECIPE_EPOCHS = 300  # DPDM's Fashion-MNIST recipe: 300 epochs of 4096-example batches.
LEARNING_RATE = 3e-4
EMA_RATE = 0.999
CLIPPING_IMPL = {
    "fast": "layerwise",
    "ghost": "ghost",
    "reference": "vmap",
    "bf16": "vmap",
    "fast_bf16": "layerwise",
}
COMPUTE_DTYPE = {"bf16": "bfloat16", "fast_bf16": "bfloat16"}  # The others: float32.
VARIANTS = ("plain", "fast", "ghost", "reference", "bf16", "fast_bf16")
CHECKED = ("fast", "ghost")  # The variants ``--check`` compares with the reference.
DEFAULT_CASES = "256x1,64x4,32x32,4096x32"
TINY_CASES = "4x1,2x2,8x2/2"
CHECK_CASE = "4x2/2"  # Two micro-batches, the last row padding: loop and mask both covered.
CHECK_RTOL = 1e-4
ERROR_CHARS = 500


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: B examples, K noise draws each, micro-batches of ``microbatch``.

    Attributes:
      batch: B, examples per (logical) step.
      k: K, the noise multiplicity (noised copies per example).
      microbatch: examples per vectorized chunk; ``microbatch < batch`` is a logical batch.
    """

    batch: int
    k: int
    microbatch: int

    @property
    def logical(self) -> bool:
        """Whether the step loops over several micro-batches."""
        return self.microbatch < self.batch

    @property
    def name(self) -> str:
        """'BxK', or 'BxK/m' for a logical batch."""
        return f"{self.batch}x{self.k}" + (f"/{self.microbatch}" if self.logical else "")


def parse_cases(text: str, microbatch: int, microbatch_above: int) -> list[Case]:
    """Parses 'BxK[/m],...'; without '/m', B > ``microbatch_above`` uses ``microbatch``.

    Raises:
      ValueError: a malformed case, or B not a multiple of its micro-batch.
    """
    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            bk, _, m = item.partition("/")
            b, k = (int(v) for v in bk.lower().split("x"))
            mb = int(m) if m else (microbatch if b > microbatch_above else b)
        except ValueError as e:
            raise ValueError(f"Bad case '{item}': expected BxK or BxK/m, e.g. 4096x32/64.") from e
        if min(b, k, mb) < 1 or b % mb:
            raise ValueError(f"Bad case '{item}': B={b} must be a multiple of micro-batch {mb}.")
        cases.append(Case(b, k, min(mb, b)))
    return cases


def make_method(model: str, k: int, tiny: bool) -> Method:
    """The benchmarked method at noise multiplicity ``k``: 'dpdm' or 'anchor'."""
    if model == "dpdm":
        overrides: dict[str, Any] = {}
        if tiny:
            overrides = dict(
                unet="custom", nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()
            )
        return dpdm.make(dpdm.Config(noise_multiplicity=k, **overrides), SPEC)
    if model == "anchor":
        return anchor_unet.make(k, SPEC, tiny=tiny)
    raise ValueError(f"Unknown model '{model}'; use 'dpdm' or 'anchor'.")


def make_plain_step(
    method: Method,
    optimizer: optax.GradientTransformation,
    *,
    microbatch_size: int,
    ema_rate: float,
    ema_warmup: bool = True,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The non-private step with ``make_train_step``'s signature and state.

    Gradient of the mean per-example loss over the real rows (summed over micro-batches
    of ``microbatch_size``), the optax update and the EMA; no clipping, no noise. Jitted,
    state donated as in the DP step.
    """

    def step(state: TrainState, images, labels, indices, mask, num_real, streams: Streams):
        del num_real  # Every micro-batch is run; the benchmark's batches are all real.
        t = state.step
        examples = gather_examples(images, labels, indices)
        keys = example_keys(jax.random.fold_in(streams.loss, t), indices)
        size = mask.shape[0]
        m = microbatch_size

        def loss_sum(trainable, ex, ks, mk):
            losses, _ = jax.vmap(method.loss_per_example, in_axes=(None, None, 0, 0))(
                trainable, state.frozen, ex, ks
            )
            return jnp.sum(jnp.where(mk, losses, 0.0))

        grad_fn = jax.value_and_grad(loss_sum)
        if size == m:
            total, grad_sum = grad_fn(state.trainable, examples, keys, mask)
        else:

            def body(i, acc):
                take = lambda x: lax.dynamic_slice_in_dim(x, i * m, m, axis=0)
                value, grads = grad_fn(
                    state.trainable, jax.tree_util.tree_map(take, examples), take(keys), take(mask)
                )
                return jax.tree_util.tree_map(jnp.add, acc, (value, grads))

            zeros = jax.tree_util.tree_map(jnp.zeros_like, (jnp.zeros(()), state.trainable))
            total, grad_sum = lax.fori_loop(0, size // m, body, zeros)
        count = jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1).astype(jnp.float32)
        grads = jax.tree_util.tree_map(lambda g: g / count, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        decay = ema_decay(ema_rate, t, ema_warmup)
        ema = jax.tree_util.tree_map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema, trainable
        )
        new = TrainState(t + 1, trainable, state.frozen, opt_state, ema)
        return new, {"loss": total / count, "update_norm": optax.global_norm(updates)}

    return jax.jit(step, donate_argnums=(0,))


def make_plan_for(batch: int, noise_multiplier: float = 1.0, clip_norm: float = 1.0) -> DPPlan:
    """q = B/N with N = 60000; sigma and C given (no calibration: timing only)."""
    return make_plan(
        num_examples=NUM_EXAMPLES,
        batch_size=batch,
        delta=1e-5,
        clip_norm=clip_norm,
        steps=1_000_000,
        noise_multiplier=noise_multiplier,
    )


def make_step(
    variant: str,
    method: Method,
    optimizer: optax.GradientTransformation,
    plan: DPPlan,
    microbatch: int,
) -> Callable[..., Any]:
    """The jitted step of ``variant`` (one of ``VARIANTS``)."""
    if variant == "plain":
        return make_plain_step(method, optimizer, microbatch_size=microbatch, ema_rate=EMA_RATE)
    if variant not in CLIPPING_IMPL:
        raise ValueError(f"Unknown variant '{variant}'; use one of {VARIANTS}.")
    return make_train_step(
        method,
        optimizer,
        plan,
        microbatch_size=microbatch,
        ema_rate=EMA_RATE,
        clipping_impl=CLIPPING_IMPL[variant],
        compute_dtype=COMPUTE_DTYPE.get(variant, "float32"),
    )


def init_params(method: Method, streams: Streams) -> PyTree:
    """The method's initial trainable parameters (one compiled init)."""
    return jax.jit(method.init, static_argnums=1)(streams.init, SPEC).trainable


def fresh_state(trainable: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """A new state owning its own copy of ``trainable`` (each run donates its state).

    Built in one jitted call: eager per-leaf copies would compile one program per shape.
    """

    def create(t: PyTree) -> TrainState:
        t = jax.tree_util.tree_map(jnp.copy, t)
        return TrainState.create(t, {}, optimizer.init(t))

    return jax.jit(create)(trainable)


def synthetic_batch(batch: int, num_real: int | None = None, seed: int = 0) -> dict[str, Any]:
    """A device-resident uint8 'dataset' of B images and a batch reading all of it.

    The first ``num_real`` rows (default all) are real; the others are padding (-1).
    """
    num_real = batch if num_real is None else num_real
    rng = np.random.default_rng(seed)
    indices = np.where(np.arange(batch) < num_real, np.arange(batch), -1).astype(np.int32)
    return {
        "images": jnp.asarray(rng.integers(0, 256, (batch, *SPEC.image_shape), dtype=np.uint8)),
        "labels": jnp.asarray(rng.integers(0, SPEC.num_classes, batch, dtype=np.int32)),
        "indices": jnp.asarray(indices),
        "mask": jnp.asarray(indices >= 0),
        "num_real": jnp.asarray(num_real, jnp.int32),
    }


def _batch_args(data: dict[str, Any], streams: Streams) -> tuple[Any, ...]:
    """The step's arguments after the state: (images, labels, indices, mask, num_real, streams)."""
    names = ("images", "labels", "indices", "mask", "num_real")
    return (*(data[n] for n in names), streams)


def ghosted_fraction(method: Method, trainable: PyTree, case: Case) -> float:
    """The fraction of parameters the ghost path never forms per-example gradients for,
    at this case's micro-batch shapes (``dpjax.privacy.ghost.ghosted_fraction``)."""
    m = case.microbatch
    examples = {
        "image": jax.ShapeDtypeStruct((m, *SPEC.image_shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((m,), jnp.int32),
    }
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0), m))
    mask = jax.ShapeDtypeStruct((m,), jnp.bool_)
    return ghost.ghosted_fraction(method.loss_per_example, trainable, {}, examples, mask, keys)


_global_norm = jax.jit(optax.global_norm)  # Eager, it would compile one program per leaf.


def _memory_analysis(compiled: Any) -> dict[str, int | None]:
    """The compiled executable's own buffer sizes (bytes), where the backend reports them."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # optional backend feature.
        ma = None
    fields = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
    )
    return {f.replace("_size_in", ""): getattr(ma, f, None) for f in fields}


def _peak_bytes() -> int | None:
    """The first device's process-wide peak bytes in use (None where not reported)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # CPU and some backends report nothing.
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def time_step(
    step: Callable[..., Any],
    state: TrainState,
    args: Sequence[Any],
    steps: int,
    warmup: int,
    profile_dir: str = "",
) -> dict[str, Any]:
    """Compiles ``step`` for (state, *args), then times ``steps`` calls after ``warmup``.

    Returns compile_s (lower + compile), first_step_ms, step_ms (mean of the timed steps,
    one block_until_ready at the end) and the executable's memory analysis. With
    ``profile_dir``, one more step then runs under ``jax.profiler.trace(profile_dir)``
    (after the timing, so the timed steps are not traced) and ``profile`` summarizes it.
    """
    t0 = time.perf_counter()
    compiled = step.lower(state, *args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, *args)
    jax.block_until_ready((state, metrics))
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(warmup - 1, 0)):
        state, metrics = compiled(state, *args)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, *args)
    jax.block_until_ready((state, metrics))
    step_ms = (time.perf_counter() - t0) / max(steps, 1) * 1e3
    result = {
        "compile_s": compile_s,
        "first_step_ms": first_ms,
        "step_ms": step_ms,
        "memory_analysis": _memory_analysis(compiled),
        "finite": bool(np.isfinite(float(_global_norm(state.trainable)))),
    }
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            state, metrics = compiled(state, *args)
            jax.block_until_ready((state, metrics))
        result["profile"] = {
            "dir": profile_dir,
            **trace_summary.summarize(trace_summary.latest_trace(profile_dir), top=15),
        }
    return result


# ---------------------------------------------------------------------------------------
# The correctness check: fast == reference and ghost == reference on one step.


def _rel_err(a: PyTree, b: PyTree) -> tuple[float, float]:
    """(global ||a-b|| / ||b||, worst leaf error relative to max(leaf norm, 1e-3 global))."""
    la = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(a)]
    lb = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(b)]
    total = float(np.sqrt(sum(np.sum(x**2) for x in lb)))
    worst = 0.0
    for x, y in zip(la, lb):
        scale = max(float(np.linalg.norm(y)), 1e-3 * total, 1e-30)
        worst = max(worst, float(np.linalg.norm(x - y)) / scale)
    diff = float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb))))
    return diff / max(total, 1e-30), worst


def run_check(
    model: str, tiny: bool, trainable: PyTree | None = None, case_text: str = CHECK_CASE
) -> dict[str, Any]:
    """One DP step of 'reference', 'fast' and 'ghost' from the same state and batch, sigma = 0.

    Uses SGD with learning rate 1 so that the update equals the clipped mean gradient
    (Adam's first update is nearly sign(g) and would hide errors), random perturbations of
    the initial parameters so that every layer has a gradient (zero-initialized output
    layers otherwise block it), C below the typical norm so that clipping acts, and
    'highest' matmul precision. Compares the new parameters (rel. tol ``CHECK_RTOL``),
    the updates, the gradient-norm quantiles and the number of clipped examples.

    Args:
      model: 'dpdm' or 'anchor'.
      tiny: whether to use the tiny UNet.
      trainable: the initial parameters (default: a fresh init).
      case_text: the case 'BxK/m' (default ``CHECK_CASE``); e.g. '256x1/256' checks the
        ghost norms' rounding bound at the micro-batch size the benchmark times.

    Returns:
      The check's record, with 'passed'.
    """
    (case,) = parse_cases(case_text, 1, 1)
    method = make_method(model, case.k, tiny)
    streams = Streams.from_seed(0)
    if trainable is None:
        trainable = init_params(method, streams)
    # Host-side noise: jax.random per leaf costs one threefry compilation per shape.
    rng = np.random.default_rng(1)
    noise = jax.tree_util.tree_map(
        lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.05, trainable
    )
    trainable = jax.jit(lambda t, n: jax.tree_util.tree_map(jnp.add, t, n))(trainable, noise)
    optimizer = optax.sgd(1.0)
    plan = make_plan_for(case.batch, noise_multiplier=0.0, clip_norm=0.1)
    data = synthetic_batch(case.batch, num_real=case.batch - 1, seed=3)
    out: dict[str, Any] = {}
    with jax.default_matmul_precision("highest"):
        for variant in ("reference", *CHECKED):
            step = make_step(variant, method, optimizer, plan, case.microbatch)
            state, metrics = step(fresh_state(trainable, optimizer), *_batch_args(data, streams))
            out[variant] = (jax.device_get(state.trainable), jax.device_get(metrics))
    init = jax.device_get(trainable)
    ref, ref_m = out["reference"]
    record = {
        "model": model,
        "tiny": tiny,
        "case": case.name,
        "num_real": case.batch - 1,
        "params": count_params(trainable),
        "params_allclose_rtol": CHECK_RTOL,
        "grad_norm_median": float(ref_m["grad_norm_median"]),
    }
    # The 'fast' (layerwise) comparison at the top level, as in earlier records.
    record.update(_compare(out["fast"], (ref, ref_m), init))
    record["ghost"] = _compare(out["ghost"], (ref, ref_m), init)
    record["passed"] = bool(record["passed"] and record["ghost"]["passed"])
    return record


def _compare(got: tuple[PyTree, dict], want: tuple[PyTree, dict], init: PyTree) -> dict[str, Any]:
    """One variant's step against the reference's: parameters, update, norms, clipping."""
    (new, m), (ref, ref_m) = got, want
    delta = lambda params: jax.tree_util.tree_map(lambda n, o: n - o, params, init)
    update_err, update_leaf_err = _rel_err(delta(new), delta(ref))
    params_ok = all(
        np.allclose(a, b, rtol=CHECK_RTOL, atol=CHECK_RTOL * 1e-2)
        for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(ref))
    )
    quantiles = ("grad_norm_median", "grad_norm_p90")
    norm_err = max(
        abs(float(m[q]) - float(ref_m[q])) / max(abs(float(ref_m[q])), 1e-30) for q in quantiles
    )
    passed = bool(
        params_ok
        and update_err <= CHECK_RTOL
        and update_leaf_err <= 10 * CHECK_RTOL
        and norm_err <= CHECK_RTOL
        and float(m["frac_clipped"]) == float(ref_m["frac_clipped"])
        and int(m["batch_size"]) == int(ref_m["batch_size"])
    )
    return {
        "params_ok": bool(params_ok),
        "update_rel_err": update_err,
        "update_worst_leaf_rel_err": update_leaf_err,
        "grad_norm_quantile_rel_err": norm_err,
        "frac_clipped": [float(ref_m["frac_clipped"]), float(m["frac_clipped"])],
        "passed": passed,
    }


# ---------------------------------------------------------------------------------------
# The run.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``argv`` None: ``sys.argv``), with the --tiny defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("dpdm", "anchor"), default="dpdm")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"BxK[/m],... (default {DEFAULT_CASES}; with --tiny {TINY_CASES})",
    )
    parser.add_argument("--variants", default="plain,fast,ghost,reference")
    parser.add_argument(
        "--logical-variants",
        default="plain,fast,ghost",
        help="variants run for micro-batched (logical-batch) cases",
    )
    parser.add_argument(
        "--microbatch",
        type=int,
        default=64,
        help="micro-batch of cases whose B exceeds --microbatch-above",
    )
    parser.add_argument("--microbatch-above", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 1)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps, the first call included (default 2; tiny 1)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds; once exceeded the remaining entries are skipped (0: none)",
    )
    parser.add_argument("--out", default="benchmarks/dp_step.json")
    parser.add_argument("--tiny", action="store_true", help="tiny UNet and cases: CPU smoke run")
    parser.add_argument(
        "--check",
        action="store_true",
        help="first check fast == reference on one step; stop if not",
    )
    parser.add_argument(
        "--check-case",
        default=CHECK_CASE,
        help=f"the case BxK/m that --check runs (default {CHECK_CASE}: two micro-batches, "
        "a padding row)",
    )
    parser.add_argument(
        "--flops",
        action="store_true",
        help="also count each step's FLOPs from its jaxpr (benchmarks/flop_count.py)",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="DIR: after timing, trace one more step of each entry with jax.profiler "
        "into DIR/<case>_<variant> and add the trace's summary (benchmarks/trace_summary.py)",
    )
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count FLOPs only: trace each step, neither compile nor time it",
    )
    args = parser.parse_args(argv)
    args.flops = args.flops or args.flops_only
    if args.cases is None:
        args.cases = TINY_CASES if args.tiny else DEFAULT_CASES
    if args.steps is None:
        args.steps = 1 if args.tiny else 10
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    for name in ("variants", "logical_variants"):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        unknown = sorted(set(values) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; use {VARIANTS}")
        setattr(args, name, values)
    return args


def _write(path: str, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as JSON atomically (a killed run leaves the previous file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    atomic_file.write_json(path, payload, indent=2)


def _emit(record: dict[str, Any]) -> None:
    """Prints one JSON line at once (a log of a killed run keeps every finished entry)."""
    print(json.dumps(record), flush=True)


def _meta(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """What the numbers were measured on and with."""
    devices = jax.devices()
    return {
        "benchmark": "dpjax DP step (benchmarks/dp_step.py)",
        "command": " ".join(
            ["python", "benchmarks/dp_step.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "model": args.model,
        "tiny": args.tiny,
        "params": None,
        "steps": args.steps,
        "warmup": args.warmup,
        "optimizer": f"adam(lr={LEARNING_RATE})",
        "ema_rate": EMA_RATE,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "plan": {"num_examples": NUM_EXAMPLES, "noise_multiplier": 1.0, "clip_norm": 1.0},
        "notes": "peak_bytes is the device's process-wide peak so far (entries run in order); "
        "memory_analysis is the entry's own executable.",
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns (and writes to ``--out``) {'meta', 'check', 'entries'}.

    Raises:
      AssertionError: ``--check`` found fast or ghost and reference disagreeing (after
        writing it).
    """
    args = parse_args(argv)
    with warnings.catch_warnings():
        # CPU backends cannot donate; the warning would repeat for every step.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        return _run(args, argv)


def _timing_fields(timing: dict[str, Any], case: Case, plain_ms: float | None) -> dict[str, Any]:
    """An entry's timing fields: ``time_step``'s, rates, the ratio to plain, the recipe."""
    step_s = timing["step_ms"] / 1e3
    fields = dict(timing)
    fields["examples_per_s"] = case.batch / step_s
    fields["images_per_s"] = case.batch * case.k / step_s
    fields["ratio_to_plain"] = timing["step_ms"] / plain_ms if plain_ms is not None else None
    fields["peak_bytes"] = _peak_bytes()
    if case.logical:
        recipe_steps = int(RECIPE_EPOCHS * NUM_EXAMPLES / case.batch)
        fields["recipe_steps"] = recipe_steps
        fields["projected_recipe_h"] = recipe_steps * step_s / 3600
    return fields


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """The body of ``main``."""
    start = time.perf_counter()
    payload: dict[str, Any] = {"meta": _meta(args, argv), "check": None, "entries": []}
    _emit({"meta": payload["meta"]})
    _write(args.out, payload)

    streams = Streams.from_seed(0)
    trainable, params = None, None
    if args.check:
        try:
            trainable = init_params(make_method(args.model, 1, args.tiny), streams)
            params = payload["meta"]["params"] = count_params(trainable)
            payload["check"] = run_check(args.model, args.tiny, trainable, args.check_case)
        except Exception as e:  # recorded, then fatal below.
            payload["check"] = {"passed": False, "error": repr(e)[:ERROR_CHARS]}
        _emit({"check": payload["check"]})
        _write(args.out, payload)
        if not payload["check"]["passed"]:
            raise AssertionError(f"--check failed (vs reference): {payload['check']}")

    cases = parse_cases(args.cases, args.microbatch, args.microbatch_above)
    optimizer = optax.adam(LEARNING_RATE)
    for case in cases:
        wanted = args.logical_variants if case.logical else VARIANTS
        variants = [v for v in VARIANTS if v in args.variants and v in wanted]  # plain first.
        plain_ms, plain_flops = None, None
        for variant in variants:
            entry: dict[str, Any] = {
                "model": args.model + ("-tiny" if args.tiny else ""),
                "params": params,
                "case": case.name,
                "B": case.batch,
                "K": case.k,
                "microbatch": case.microbatch,
                "variant": variant,
                "clipping_impl": CLIPPING_IMPL.get(variant),
                "compute_dtype": COMPUTE_DTYPE.get(variant, "float32"),
            }
            if args.time_budget > 0 and time.perf_counter() - start > args.time_budget:
                entry["skipped"] = f"time budget of {args.time_budget:g} s exceeded"
            else:
                try:
                    method = make_method(args.model, case.k, args.tiny)
                    if trainable is None:
                        trainable = init_params(method, streams)
                        params = entry["params"] = count_params(trainable)
                        payload["meta"]["params"] = params
                    plan = make_plan_for(case.batch)
                    step = make_step(variant, method, optimizer, plan, case.microbatch)
                    data = synthetic_batch(case.batch)
                    if CLIPPING_IMPL.get(variant) == "ghost":
                        entry["ghosted_fraction"] = ghosted_fraction(method, trainable, case)
                    if not args.flops_only:
                        profile_dir = ""
                        if args.profile:
                            name = f"{case.name.replace('/', '_m')}_{variant}"
                            profile_dir = os.path.join(args.profile, name)
                        timing = time_step(
                            step,
                            fresh_state(trainable, optimizer),
                            _batch_args(data, streams),
                            args.steps,
                            args.warmup,
                            profile_dir,
                        )
                        if variant == "plain":
                            plain_ms = timing["step_ms"]
                        entry.update(_timing_fields(timing, case, plain_ms))
                    # After the timing: tracing for the count fills jit's cache, and a
                    # compile after it would leave the tracing out of compile_s.
                    if args.flops:
                        flops = flop_count.count_flops(
                            step,
                            fresh_state(trainable, optimizer),
                            *_batch_args(data, streams),
                            while_trips=case.batch // case.microbatch,  # All rows real.
                        )
                        entry["flops"] = flops.as_dict()
                        if variant == "plain":
                            plain_flops = flops.matmul_flops
                        entry["matmul_flops_ratio_to_plain"] = (
                            flops.matmul_flops / plain_flops if plain_flops else None
                        )
                except Exception as e:  # recorded; the run goes on.
                    entry["error"] = repr(e)[:ERROR_CHARS]
            entry["elapsed_s"] = time.perf_counter() - start
            payload["entries"].append(entry)
            _emit(entry)
            _write(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
