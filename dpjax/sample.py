"""Checkpoint-based sampling: npz with labels, an optional PNG folder, a labelled grid.

Sampling reads only the workdir's config, its public data spec and the EMA weights of
a checkpoint; it never opens the private data (the data section of the config is not
loaded). Samples are post-processing of the DP model and cost no privacy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from dpjax import atomic_file, run_config, run_paths
from dpjax import checkpoint as ckpt_lib
from dpjax import methods as methods_lib
from dpjax.diffusion import samplers
from dpjax.methods import make_for_restore
from dpjax.methods.base import DataSpec, Params
from dpjax.randomness import Streams
from dpjax.state import TrainState
from dpjax.typed_config import ConfigError

SPEC_FILE = "data_spec.json"


def save_spec(workdir: str, spec: DataSpec) -> None:
    """Records the public data spec (image shape, classes) next to the checkpoints."""
    atomic_file.write_json(os.path.join(workdir, SPEC_FILE),
                           {"image_shape": list(spec.image_shape), "num_classes": spec.num_classes})


def load_spec(workdir: str) -> DataSpec:
    d = atomic_file.read_json(os.path.join(workdir, SPEC_FILE), keys=("image_shape",
                                                                       "num_classes"))
    return DataSpec(tuple(d["image_shape"]), int(d["num_classes"]))


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """``n`` labels cycling through the classes (class-balanced up to one), int32."""
    if num_classes <= 0:
        return np.zeros((n,), np.int32)
    return (np.arange(n) % num_classes).astype(np.int32)


def released_classes(method: Any, spec: DataSpec) -> int:
    """The classes that samples are drawn and labelled by: the data's, or 0 (as for
    unconditional data) for a method whose samples ignore their labels."""
    return spec.num_classes if getattr(method, "samples_follow_labels", True) else 0


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 pixels (round to nearest, clipped).

    The inverse of ``methods.base.to_model_range`` up to rounding. DPDM's sample writer
    truncates instead ((x / 2 + 0.5) * 255 cast to uint8), which darkens every pixel by
    half a level on average; rounding keeps the samples' mean that of the model."""
    x = np.asarray(images, np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def generate(
    method: Any,
    params: Params,
    spec: DataSpec,
    key: jax.Array,
    n: int,
    batch_size: int = 1000,
    labels: np.ndarray | None = None,
    *,
    resume_stem: str | os.PathLike | None = None,
    recipe: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    require_finite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples as uint8 (n, H, W, C) and their int32 labels (balanced by default).

    Batches all have the same shape (the last one is padded and cut), so sampling 60k
    images compiles the sampler once. Batch i is drawn with ``fold_in(key, i)``: the
    images do not depend on how the work is split or resumed.

    Args:
      method: the trained run's method (its ``sample``).
      params: the parameters to sample with (EMA weights in practice).
      spec: the data spec (class count).
      key: the sampling key.
      n: number of images.
      batch_size: images per sampler call.
      labels: (n,) class labels; default balanced.
      resume_stem: if given, finished batches are saved at ``<stem>.npy`` (see
        ``dpjax.eval.resumable_array``) and a killed job resumes there. They are reused
        only for the same parameters (by content), key, labels, batch size and
        ``recipe``.
      recipe: what else the samples depend on (e.g. the sampler's settings).
      log: progress lines for the resumable case, if given.
      require_finite: raise ValueError if the sampler returns a non-finite value (which
        the uint8 conversion would silently turn into black pixels).
    """
    labels = balanced_labels(n, spec.num_classes) if labels is None else np.asarray(labels)
    labels = labels.astype(np.int32)
    # The labels returned describe the samples: those of a method that ignores them are
    # all 0, as an unconditional run's (``released_classes``), not a claim of classes.
    out_labels = labels if released_classes(method, spec) else np.zeros_like(labels)
    batch_size = max(1, min(batch_size, n))
    sample_fn = jax.jit(lambda p, k, y: method.sample(p, k, batch_size, y))

    def compute(start: int, stop: int) -> np.ndarray:
        y = labels[start:stop]
        y_pad = np.concatenate([y, np.zeros((batch_size - len(y),), np.int32)])
        key_i = jax.random.fold_in(key, start // batch_size)
        x = np.asarray(sample_fn(params, key_i, jnp.asarray(y_pad)))[: len(y)]
        if require_finite and not np.isfinite(x).all():
            raise ValueError(f"The sampler returned non-finite values in images {start} to "
                             f"{stop - 1}.")
        return to_uint8(x)

    if resume_stem is None:
        images = np.concatenate([compute(s, min(s + batch_size, n))
                                 for s in range(0, n, batch_size)])
        return images, out_labels
    from dpjax.eval import resumable_array  # Eval-side helper; no heavy imports.

    key_data = key if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else (
        jax.random.key_data(key))
    full_recipe = {
        "params": resumable_array.tree_digest(params),
        "key": np.asarray(key_data).tolist(),
        "labels": resumable_array.tree_digest(labels),
        **(recipe or {}),
    }
    images = resumable_array.fill_resumably(resume_stem, n, batch_size, full_recipe, compute,
                                            log=log)
    return images, out_labels


def grid_image(images: np.ndarray, labels: np.ndarray, num_classes: int) -> Image.Image:
    """A grid with one row per class (label written at the left) or a square grid."""
    n, h, w, c = images.shape
    pad, margin = 2, (24 if num_classes > 0 else 0)
    if num_classes > 0:
        rows = [images[labels == k] for k in range(num_classes)]
        cols = max(len(r) for r in rows)
    else:
        cols = int(np.ceil(np.sqrt(n)))
        rows = [images[i : i + cols] for i in range(0, n, cols)]
    canvas = Image.new(
        "RGB", (margin + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y0 = pad + r * (h + pad)
        if num_classes > 0:
            draw.text((4, y0 + h // 2 - 5), str(r), fill="black")
        for j, img in enumerate(row):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
            canvas.paste(tile, (margin + pad + j * (w + pad), y0))
    return canvas


def write_grid(
    method: Any, params: Params, spec: DataSpec, key: jax.Array, n: int, path: str
) -> str:
    """Samples ``n`` images (class-balanced) and writes a labelled grid PNG to ``path``."""
    images, labels = generate(method, params, spec, key, n, batch_size=n)
    grid_image(images, labels, released_classes(method, spec)).save(path)
    return path


# What ``--mode=sample`` writes into its folder (``check_sample_out`` refuses others).
SAMPLE_OUTPUTS = ("samples.npz", "samples_grid.png", "png")


class SampleOutputError(ValueError):
    """The folder given for samples cannot take them (a file, or another tool's folder)."""


def check_sample_out(out_dir: str) -> None:
    """Raises SampleOutputError unless ``out_dir`` is new, empty, or holds only an
    earlier sample output (``SAMPLE_OUTPUTS``): samples must not overwrite an export
    (its model card would describe other samples) or anything else."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise SampleOutputError(f"--out {out_dir} is a file, not a folder.")
    # A killed write of samples.npz leaves its temporary behind (atomic_file).
    others = sorted(n for n in set(os.listdir(out_dir)) - set(SAMPLE_OUTPUTS)
                    if not atomic_file.is_leftover(n, "samples.npz"))
    png = os.path.join(out_dir, "png")
    if os.path.lexists(png) and (os.path.islink(png) or not os.path.isdir(png)):
        others.append("png (a link or a file, not earlier samples' folder)")
    if others:
        raise SampleOutputError(
            f"--out {out_dir} holds other files ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}); samples go to a new or empty folder, "
            "or to one holding only earlier samples (an export is never overwritten).")


def save_samples_grid(images: np.ndarray, labels: np.ndarray, out_dir: str,
                      num_classes: int) -> str:
    """Writes ``out_dir/samples_grid.png``, the first ten samples of each class (or the
    first 100), and returns its path: the one grid of a folder of samples."""
    n_grid = min(len(images), 10 * num_classes if num_classes else 100)
    path = os.path.join(out_dir, "samples_grid.png")
    grid_image(images[:n_grid], labels[:n_grid], num_classes).save(path)
    return path


def write_samples(images: np.ndarray, labels: np.ndarray, out_dir: str, png: bool,
                  num_classes: int, extra: dict[str, Any] | None = None) -> str:
    """Writes ``samples.npz`` (images uint8 NHWC, labels, and the ``extra`` arrays;
    atomically), ``samples_grid.png`` (the first ten of each class, or 100 images) and
    optionally a PNG folder. The folder's outputs always describe one set of samples: a
    PNG folder of earlier samples is removed first, and the grid is redrawn."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "samples.npz")
    # Atomically: a kill mid-write leaves no half zip behind.
    atomic_file.write_npz(path, {**(extra or {}), "images": images, "labels": labels},
                          compressed=True)
    old_png = os.path.join(out_dir, "png")
    if os.path.isdir(old_png) and not os.path.islink(old_png):  # Never through a link.
        shutil.rmtree(old_png)
    save_samples_grid(images, labels, out_dir, num_classes)
    if png:
        for i, (img, y) in enumerate(zip(images, labels)):
            d = os.path.join(out_dir, "png", str(int(y)))
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
                os.path.join(d, f"{i:06d}.png")
            )
    return path


def sampler_changes(
    cfg: run_config.RunConfig, sampling: samplers.SamplerOverrides | None
) -> dict[str, Any]:
    """The sampler fields ``sampling`` (``eval.sampling``) sets to other values than the
    run ``cfg`` was configured with; {} when it changes nothing.

    Raises:
      ConfigError: ``sampling`` sets a field and the run's method has no diffusion
        sampler, or the changed settings are invalid (checked before any checkpoint is
        read).
    """
    given = sampling.given() if sampling is not None else {}
    if not given:
        return {}
    if not isinstance(cfg.method_args, samplers.SamplerSettings):
        raise ConfigError(
            f"eval.sampling sets {sorted(given)}, but method '{cfg.method}' samples without "
            "a diffusion sampler (eval.sampling applies to dpdm, ldm and dpsad runs)."
        )
    # In the field's own type (50 and 50.0 are one setting, one folder, one recipe).
    given = {k: type(getattr(cfg.method_args, k))(v) for k, v in given.items()}
    changes = {k: v for k, v in given.items() if getattr(cfg.method_args, k) != v}
    with_sampler_changes(cfg, changes)  # Validates them.
    return changes


def with_sampler_changes(
    cfg: run_config.RunConfig, changes: dict[str, Any]
) -> run_config.RunConfig:
    """``cfg`` with the method's sampler fields replaced by ``changes`` (validated)."""
    if not changes:
        return cfg
    try:
        args = dataclasses.replace(cfg.method_args, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"eval.sampling: {e}") from e
    return dataclasses.replace(cfg, method_args=args)


def changes_json(changes: dict[str, Any]) -> str:
    """Canonical JSON of sampler changes (sorted keys): the text that names their samples
    folder and is recorded beside the samples, so both always agree."""
    return json.dumps(changes, sort_keys=True, default=str)


def samples_dir(workdir: str, step: int, changes: dict[str, Any] | None = None) -> str:
    """Where the samples of checkpoint ``step`` go: ``samples/step_N`` with the run's
    sampler, ``samples/step_N/sampler_<digest>`` with other settings (each set of
    changes its own folder, so that samples of two samplers are never mixed up)."""
    out = os.path.join(workdir, "samples", f"step_{step}")
    if changes:
        digest = hashlib.sha256(changes_json(changes).encode()).hexdigest()[:12]
        out = os.path.join(out, f"sampler_{digest}")
    return out


def not_private_warning(workdir: str) -> str | None:
    """A warning when the workdir's plan gives no guarantee: DP off, sigma 0, or noise,
    batches or per-example loss draws derived from config.seed (its plan file's record,
    as the privacy report reads it)."""
    from dpjax.privacy import noise_secret
    from dpjax.privacy import plan as plan_lib

    path = os.path.join(workdir, "dp_plan.json")
    if not os.path.exists(path):
        return None
    plan, extra = plan_lib.load_plan(path)
    if plan.enabled and plan.noise_multiplier > 0:
        public = noise_secret.public_randomness(extra, plan.mechanism)
        if public is None or (extra.get("steps_done") == 0
                              and noise_secret.NOISE_SOURCE_KEY not in extra):
            return None  # (Or no checkpoint yet records where its randomness comes from.)
        why = f"its {public} derive from config.seed"
    else:
        why = "DP is disabled" if not plan.enabled else "its noise multiplier is 0"
    return (f"[dpjax] warning: this run has no differential privacy guarantee ({why}): its "
            "samples are not a private release.")


def load_run_config(workdir: str) -> run_config.RunConfig:
    """The typed config stored in a workdir (no private data is read); a method module
    outside dpjax must be trusted by the user first (``methods.check_trusted``)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ckpt_lib.CheckpointError(f"{workdir} holds no dpjax run (no config.json).")
    stored = atomic_file.read_json(path)
    try:
        methods_lib.check_trusted(str(stored.get("method", "")))
    except ValueError as e:  # Before from_configdict imports it.
        raise ConfigError(f"{path}: {e}") from None
    try:
        return run_config.from_configdict(ml_collections.ConfigDict(stored))
    except ConfigError as e:  # Changed outside dpjax, or written by another dpjax version.
        raise ConfigError(f"{path}: {e}") from e


def restore_state(
    workdir: str, step: int | None = None, changes: dict[str, Any] | None = None
) -> tuple[Any, TrainState, DataSpec, Any]:
    """(method, full TrainState, spec, run config) of a workdir's checkpoint ``step``;
    the method samples with the run's sampler settings updated by ``changes``
    (``sampler_changes``; the checkpoint does not depend on them)."""
    return restore_state_and_meta(workdir, step, changes)[:4]


def restore_state_and_meta(
    workdir: str, step: int | None = None, changes: dict[str, Any] | None = None
) -> tuple[Any, TrainState, DataSpec, Any, dict[str, Any]]:
    """``restore_state`` and the checkpoint's metadata, read together (a training run
    going on may remove the checkpoint between two reads)."""
    from dpjax.optim import make_optimizer

    cfg = with_sampler_changes(load_run_config(workdir), changes or {})
    spec = load_spec(workdir)
    try:
        method = make_for_restore(cfg.method, cfg.method_args, spec)
    except (ValueError, ckpt_lib.CheckpointError, FileNotFoundError) as e:
        # A plain ValueError of ``make`` comes from the settings or the runs they name
        # (as in run_setup): with ``changes`` e.g. guidance for a run without classes,
        # else e.g. a source run that a relative path no longer finds from here (which
        # may also say so as a missing file or checkpoint).
        hint = relative_paths_hint(cfg)
        if type(e) is not ValueError and not hint:
            raise
        where = (f"eval.sampling {changes}" if changes and not hint
                 else os.path.join(workdir, "config.json"))
        raise ConfigError(f"{where}: {e}{hint}") from e
    params = jax.eval_shape(lambda: method.init(Streams.from_seed(cfg.seed).init, spec))
    optimizer = method.optimizer(make_optimizer(cfg.optim))
    template = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        params.trainable,
        params.frozen,
        jax.eval_shape(optimizer.init, params.trainable),
        params.trainable,
    )
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        state, meta = checkpointer.restore(template, step)
    finally:
        checkpointer.close()
    return method, state, spec, cfg, meta


def relative_paths_hint(cfg: run_config.RunConfig) -> str:
    """'' or a sentence naming the relative paths of a run stored before they were made
    absolute (``run_paths``): they resolve against the current directory."""
    relative = run_paths.relative_source_paths({
        section: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {}
        for section, value in (("data", cfg.data), ("method_args", cfg.method_args))
    })
    if not relative:
        return ""
    names = ", ".join(f"{k}={v!r}" for k, v in relative.items())
    return (f" (this run was stored with relative paths, {names}, which resolve against the "
            f"current directory {os.getcwd()}: run dpjax from the directory the run was "
            "started in, or write them absolute into its config.json)")


def load_trained(
    workdir: str, step: int | None = None, changes: dict[str, Any] | None = None
) -> tuple[Any, Params, DataSpec, Any, int]:
    """(method, EMA params, spec, run config, step) from a workdir, without private data
    (the sampler updated by ``changes``, as ``restore_state``)."""
    method, state, spec, cfg = restore_state(workdir, step, changes)
    return method, Params(state.ema, state.frozen), spec, cfg, int(state.step)


def sample_from_workdir(
    workdir: str,
    num: int,
    out_dir: str | None = None,
    png: bool = False,
    seed: int = 0,
    batch_size: int = 1000,
    sampling: samplers.SamplerOverrides | None = None,
    log=print,
) -> str:
    """``--mode=sample``: samples from the latest checkpoint's EMA weights into ``out_dir``
    (default ``samples_dir``), with the run's sampler updated by ``sampling``. Sampling
    is post-processing: the samples carry the run's guarantee, and a run without one
    (DP off, or no noise) is warned about."""
    if out_dir is not None:
        check_sample_out(out_dir)  # Before the checkpoint is read.
    changes = sampler_changes(load_run_config(workdir), sampling)
    method, params, spec, cfg, step = load_trained(workdir, changes=changes)
    warning = not_private_warning(workdir)
    if warning:
        log(warning)
    out_dir = out_dir or samples_dir(workdir, step, changes)
    key = jax.random.fold_in(Streams.from_seed(cfg.seed).sample, 1_000_000 + seed)
    images, labels = generate(method, params, spec, key, num, batch_size)
    # What the samples depend on besides the weights, for an eval that reuses them: the
    # batch (generate's, clamped) and the sampler's changed settings.
    extra = {"sample_batch": np.int64(max(1, min(batch_size, num))), "sample_seed": np.int64(seed)}
    if changes:
        extra["sampler_changes"] = np.array(changes_json(changes))
    return write_samples(images, labels, out_dir, png, released_classes(method, spec),
                         extra=extra)
