"""``--mode=eval``: FID, downstream accuracy and memorization of a trained run.

Writes ``eval.json`` and ``eval_report.md`` (with the sample grid and the closest-pair
image) next to the checkpoints. Evaluation reads the real train and test splits: its
numbers are for the researcher and are not DP releases. Nothing here feeds back into
training, checkpoint choice or hyperparameters (that would be a private release).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import atomic_file, typed_config
from dpjax import data as data_lib
from dpjax import sample as sample_lib
from dpjax.diffusion import samplers
from dpjax.eval import marginal_likelihood, resumable_array
from dpjax.eval.config import (  # noqa: F401 (public here too: report.EvalConfig etc.)
    DOWNSTREAM_MODEL_NAMES,
    FID_SPLITS,
    EvalConfig,
    check_eval,
    eval_config,
    fid_batch_size,
    sample_batch_size,
)
from dpjax.eval.report_text import report_markdown
from dpjax.methods.base import Params, to_model_range
from dpjax.randomness import Streams


def _samples(
    workdir: str, cfg: EvalConfig, log, trained: tuple, changes: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, int, Any, int | None, str]:
    """The checkpoint's samples (reused from samples.npz if it has enough and was drawn
    with this seed), the sampler batch size they were drawn with (None for a file that
    does not say), and their folder (``sample.samples_dir``: one per sampler)."""
    method, params, spec, run_cfg, step = trained
    out_dir = sample_lib.samples_dir(workdir, step, changes)
    os.makedirs(out_dir, exist_ok=True)
    # One process at a time: a second eval of this workdir waits, then reuses.
    with resumable_array.exclusive_lock(os.path.join(out_dir, "samples.lock"), log):
        path = os.path.join(out_dir, "samples.npz")
        if os.path.exists(path):
            try:
                with np.load(path) as z:
                    stored = z["images"], z["labels"]
                    batch = int(z["sample_batch"]) if "sample_batch" in z.files else None
                    seed = int(z["sample_seed"]) if "sample_seed" in z.files else None
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                log(f"[dpjax] eval: {path} is unreadable ({e}); sampling again")
                stored = None
            if stored is not None and seed not in (None, cfg.seed):
                log(f"[dpjax] eval: {path} was drawn with eval.seed={seed}; sampling again "
                    f"with {cfg.seed}")
                stored = None
            if stored is not None and len(stored[1]) < cfg.num_samples:
                # Typically a --mode=sample output in the same folder: say what goes.
                log(f"[dpjax] eval: {path} holds {len(stored[1])} samples, fewer than "
                    f"eval.num_samples={cfg.num_samples}; the {cfg.num_samples} drawn now "
                    "replace it (with its grid, and its png/ folder if any)")
            if stored is not None and len(stored[1]) >= cfg.num_samples:
                log(f"[dpjax] eval: reusing {path} (drawn with sampler batch "
                    f"{'unrecorded' if batch is None else batch}; eval.sample_batch does "
                    "not apply to reused samples)")
                images, labels = (a[: cfg.num_samples] for a in stored)
                return images, labels, step, (spec, run_cfg), batch, out_dir
        key = jax.random.fold_in(Streams.from_seed(run_cfg.seed).sample, 1_000_000 + cfg.seed)
        t = time.time()
        # Batches are saved as they finish, so a killed eval (the end of a device lease
        # or of a session) resumes. ``generate`` keys them on the weights (by content),
        # the key and the labels; the recipe adds the sampler's settings with
        # eval.sampling's changes, and the backend (its floating point).
        recipe = {"sampler": sampler_definition_digest(workdir), "step": step,
                  "backend": jax.default_backend()}
        extra = {"sample_seed": np.int64(cfg.seed)}
        if changes:  # Only then: the recipes of earlier evals stay valid.
            recipe["sampler_changes"] = changes
            extra["sampler_changes"] = np.array(sample_lib.changes_json(changes))
        stem = os.path.join(out_dir, "samples_in_progress")
        batch = max(1, min(sample_batch_size(cfg), cfg.num_samples))  # As generate does.
        images, labels = sample_lib.generate(
            method, params, spec, key, cfg.num_samples, batch, resume_stem=stem,
            recipe=recipe, log=log,
        )
        log(f"[dpjax] eval: sampled {len(images)} images in {time.time() - t:.0f} s")
        sample_lib.write_samples(images, labels, out_dir, png=False,  # Atomic.
                                 num_classes=sample_lib.released_classes(method, spec),
                                 extra={**extra, "sample_batch": np.int64(batch)})
        for suffix in (".npy", ".json"):  # samples.npz holds them now.
            with contextlib.suppress(FileNotFoundError):
                os.remove(stem + suffix)
    return images, labels, step, (spec, run_cfg), batch, out_dir


def sampler_definition_digest(workdir: str) -> str:
    """A digest of what defines the run's sampler: the ``method`` and ``method_args`` of
    its stored ``config.json`` (as stored: a code change does not alter it). A resume that
    rewrites other fields (``train.*``, a free ``dp`` or ``data`` field) keeps it."""
    stored = atomic_file.read_json(os.path.join(workdir, "config.json"))
    defining = {k: stored.get(k) for k in ("method", "method_args")}
    # The digest of the values, not of how the file spells a non-finite float (bare
    # Infinity before dpjax wrote 'inf'): the same as it always was for such a run.
    return hashlib.sha256(json.dumps(_non_finite_as_floats(defining),
                                     sort_keys=True).encode()).hexdigest()[:16]


def _non_finite_as_floats(x: Any) -> Any:
    """``x`` with the strings 'inf', '-inf' and 'nan' (``atomic_file.json_safe``'s
    spelling of non-finite floats) as the floats they stand for."""
    if isinstance(x, dict):
        return {k: _non_finite_as_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_non_finite_as_floats(v) for v in x]
    return float(x) if isinstance(x, str) and x in typed_config.NON_FINITE else x


def reference_name(data_cfg: Any, split: str, num_images: int) -> str:
    """The cache key of a split's FID statistics and features (``dpjax.eval.feature_cache``):
    a file name, so the dataset's name goes through ``feature_cache.name_part``."""
    from dpjax.eval import feature_cache

    name = feature_cache.name_part(str(data_cfg.name))
    return f"{data_cfg.source}-{name}-{split}-n{num_images}"


def evaluate_workdir(workdir: str, cfg: EvalConfig | None = None, log=print) -> dict[str, Any]:
    """Evaluates the latest checkpoint of ``workdir``; returns what it writes to eval.json."""
    from dpjax.eval import downstream, feature_cache, fid, memorization  # Heavy, eval only.

    run_cfg = sample_lib.load_run_config(workdir)
    # Checked here, before the checkpoint and hours of sampling.
    cfg, fid_batch, changes = check_eval(run_cfg, cfg)
    # Restored once, for every part below.
    # The weights and their checkpoint's metadata in one read, and the guarantee from it
    # now: a training run still going on may rotate the checkpoint away meanwhile.
    method, state, spec, restored_cfg, meta = sample_lib.restore_state_and_meta(
        workdir, changes=changes)
    trained = (method, Params(state.ema, state.frozen), spec, restored_cfg, int(state.step))
    privacy = privacy_at_checkpoint(workdir, method, run_cfg.method, int(state.step), meta)
    images, labels, step, (spec, run_cfg), sample_batch, sample_dir = _samples(
        workdir, cfg, log, trained, changes)
    splits = {"train": data_lib.load(run_cfg.data)}
    result: dict[str, Any] = {"step": step, "num_samples": int(len(images)), "workdir": workdir}
    if run_cfg.data.has_test_split():
        splits["test"] = data_lib.load(dataclasses.replace(run_cfg.data, split="test"))
    else:
        # An npz file or image folder without '{split}' in data.path: its "test" split
        # would be the training file again, and FID and accuracy "on the test set" would
        # be on the private training images.
        result["skipped"] = ["FID vs test, downstream accuracy and bits/dim: data.path has "
                             "no '{split}', so the data has no test split"]
        log(f"[dpjax] eval: {result['skipped'][0]}")
        cfg = dataclasses.replace(
            cfg, fid_references=tuple(s for s in cfg.fid_references if s != "test"),
            downstream=False, bits_per_dim=False)
    # How many real images each reference holds: data.limit applies to every split (it
    # keeps CPU runs short), so a limited run's "test" is the first images of the test
    # split, and FID against fewer real images reads higher.
    result["real_images"] = {split: int(len(d.images)) for split, d in splits.items()}
    # Which data the numbers are on, for a program that sets runs side by side ('fake':
    # generated images under a real dataset's name, as smoke and toy presets have them).
    result["data"] = {"source": run_cfg.data.source, "name": run_cfg.data.name,
                      "split": run_cfg.data.split}
    if run_cfg.data.limit and run_cfg.data.limit in result["real_images"].values():
        result["data"]["limit"] = run_cfg.data.limit  # It cut a split.
    # What was computed, with the batch sizes actually used (the samples depend on the
    # sampler's; None: reused samples from a file that does not record it).
    result["eval_config"] = {**dataclasses.asdict(cfg), "fid_batch": fid_batch,
                             "sample_batch": sample_batch}
    if isinstance(run_cfg.method_args, samplers.SamplerSettings):
        # The sampler that drew the samples (the run's, with eval.sampling's changes).
        result["sampler"] = {**run_cfg.method_args.sample_kwargs(),
                             "changed": sorted(changes)}
    feature_kwargs = {"weights_path": cfg.inception_weights or None}
    ref_names = {split: reference_name(run_cfg.data, split, len(ref))
                 for split, ref in splits.items()}

    if cfg.fid:
        t = time.time()
        # Each image set goes through Inception once, resumably: the samples' features
        # next to the samples, each split's in the cache; memorization reuses both.
        sample_feats = feature_cache.cached_features(
            os.path.join(sample_dir, "inception_pool3"), images,
            fid_batch, log=log, **feature_kwargs)
        mu, sigma = fid.compute_stats(sample_feats)
        result["fid"] = {}
        for split in cfg.fid_references:
            ref_mu, ref_sigma = feature_cache.reference_stats(
                ref_names[split], splits[split].images, batch_size=fid_batch, log=log,
                **feature_kwargs
            )
            result["fid"][split] = fid.fid_from_stats(mu, sigma, ref_mu, ref_sigma)
        result["fid_seconds"] = time.time() - t
        log(f"[dpjax] eval: FID {result['fid']}")
        _write_json(workdir, result)  # Each finished part is kept if a later one fails.

    if cfg.downstream and spec.num_classes > 0 and not trained[0].samples_follow_labels:
        # Classifiers trained on labels the samples ignore would report chance accuracy.
        result.setdefault("skipped", []).append(
            f"downstream accuracy: {run_cfg.method}'s samples do not follow their labels")
        log(f"[dpjax] eval: {result['skipped'][-1]}")
    elif cfg.downstream and spec.num_classes > 0:
        t = time.time()
        test = splits["test"]
        result["downstream"] = downstream.evaluate_downstream(
            images,
            labels,
            test.images,
            test.labels,
            spec.num_classes,
            models=cfg.downstream_models,
            epochs=cfg.downstream_epochs,
            seed=cfg.seed,
        )
        result["downstream_seconds"] = time.time() - t
        acc = {k: round(v["test_accuracy"], 4) for k, v in result["downstream"].items()}
        log(f"[dpjax] eval: downstream test accuracy {acc}")
        _write_json(workdir, result)

    if cfg.bits_per_dim:
        method, params = trained[:2]
        if hasattr(method, "bits_per_dim"):
            test = splits["test"]
            t = time.time()
            result["bits_per_dim"] = bits_per_dim_report(method, params, test, cfg)
            result["bits_per_dim"]["seconds"] = time.time() - t
            log(f"[dpjax] eval: bits/dim on the test split {result['bits_per_dim']['test']:.4f}")
            _write_json(workdir, result)

    if cfg.memorization:
        features = None
        if cfg.fid:
            train_feats = feature_cache.reference_features(
                ref_names["train"], splits["train"].images, batch_size=fid_batch, log=log,
                **feature_kwargs)
            features = (sample_feats, train_feats)
        result["memorization"] = memorization.memorization_report(
            images,
            splits["train"].images,
            features=features,
            png_prefix=os.path.join(workdir, "eval_closest"),
        )
    # The report shows the samples folder's own grid (``sample.write_samples`` drew it),
    # redrawn only if a reused folder lost it: one grid per set of samples.
    grid = os.path.join(sample_dir, "samples_grid.png")
    if not os.path.exists(grid):
        sample_lib.save_samples_grid(images, labels, sample_dir,
                                     sample_lib.released_classes(trained[0], spec))
    result["samples_grid"] = os.path.relpath(grid, workdir)
    result["privacy"] = privacy
    _write_json(workdir, result)
    atomic_file.write_text(os.path.join(workdir, "eval_report.md"), report_markdown(result))
    return result


def privacy_at_checkpoint(
    workdir: str, method: Any, method_name: str, step: int, meta: dict
) -> dict:
    """The guarantee of the checkpoint at ``step``, from the plan and that checkpoint's
    own metadata ``meta`` (its releases; read with its state), not from
    ``privacy_report.json``, which may lag or lead the checkpoint evaluated."""
    from dpjax import export as export_lib
    from dpjax.privacy import noise_secret
    from dpjax.privacy import report as report_lib

    plan = export_lib.read_plan(workdir)
    export_lib.check_checkpoint_plan(meta, workdir, step, plan)
    releases = list(meta.get("releases", []))
    return report_lib.privacy_report(plan, step, method_name, releases, method.privacy_notes(),
                                     noise_source=noise_secret.recorded_source(meta),
                                     loss_source=noise_secret.recorded_loss_source(meta))


def bits_per_dim_report(
    method: Any, params: Any, dataset: Any, cfg: EvalConfig, batch: int = 100
) -> dict[str, Any]:
    """Mean of ``method.bits_per_dim`` over the first ``cfg.bits_per_dim_images`` images
    of ``dataset`` (all when 0), its standard error over images, the mean effective
    sample size where the method reports one, and the training codelength where the
    method has one (``codelength_bits_per_dim``)."""
    n = len(dataset) if cfg.bits_per_dim_images <= 0 else min(cfg.bits_per_dim_images,
                                                                len(dataset))  # fmt: skip
    dims = math.prod(dataset.images.shape[1:])
    key = jax.random.PRNGKey(cfg.seed)
    if hasattr(method, "log_likelihood"):
        settings = marginal_likelihood.Settings(
            num_samples=cfg.likelihood_samples, mode_steps=cfg.likelihood_mode_steps
        )
        fn = jax.jit(lambda x, y, k: method.log_likelihood(params, x, y, k, settings))
    else:
        fn = jax.jit(lambda x, y, k: (-method.bits_per_dim(params, x, y) * dims * math.log(2),
                                      {}))  # fmt: skip
    code_fn = None
    if hasattr(method, "codelength_bits_per_dim"):
        code_fn = jax.jit(lambda x, y: method.codelength_bits_per_dim(params, x, y))
    bpd, ess, code = [], [], []
    for i in range(0, n, batch):
        x = to_model_range(jnp.asarray(dataset.images[i : min(i + batch, n)]))
        y = jnp.asarray(dataset.labels[i : min(i + batch, n)], jnp.int32)
        log_p, diag = fn(x, y, jax.random.fold_in(key, i))
        bpd.append(np.asarray(-log_p) / (dims * math.log(2)))
        if "ess" in diag:
            ess.append(np.asarray(diag["ess"]))
        if code_fn is not None:
            code.append(np.asarray(code_fn(x, y)))
    bpd = np.concatenate(bpd).astype(np.float64)
    out = {"test": float(bpd.mean()), "stderr": float(bpd.std(ddof=1) / math.sqrt(len(bpd)))
           if len(bpd) > 1 else 0.0, "images": int(len(bpd))}  # fmt: skip
    if ess:
        out["importance_samples"] = cfg.likelihood_samples
        out["mode_steps"] = cfg.likelihood_mode_steps
        out["ess_mean"] = float(np.concatenate(ess).mean())
    if code:
        out["codelength_test"] = float(np.concatenate(code).astype(np.float64).mean())
    return out


def _write_json(workdir: str, result: dict[str, Any]) -> None:
    """Writes ``eval.json`` as strict JSON (``atomic_file.json_safe``): a non-finite number
    (a sampler's s_max = inf, a memorization ratio over a zero median) as a string, as the
    privacy report and metrics.jsonl store them."""
    atomic_file.write_json(os.path.join(workdir, "eval.json"), atomic_file.json_safe(result),
                           indent=2, allow_nan=False, default=float)
