"""Setting up a run: the workdir checks, the privacy plan, the method, the restored state.

``setup`` is what ``train`` calls first. What it guarantees before any step runs:
* the DP plan (q, sigma, C, T, delta) is fixed: a new one is calibrated over the
  method's prior releases and its own private access and written to ``dp_plan.json``;
  on resume the stored plan is checked against the config and a budget overrun, a
  changed plan or changed prior releases are refused before anything is written;
* the workdir is usable and locked, and the config on resume defines the same run
  (``workdir_guard``);
* a restored checkpoint was written under the same plan and the same prior releases;
* a one-release method resumed after its release does not open the private data.
What the run then writes next to each checkpoint (the epsilon spent, the privacy
report) is ``dpjax.run_records``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from dpjax import checkpoint as ckpt_lib
from dpjax import data as data_lib
from dpjax import parallel, run_config, run_noise, run_paths, sample
from dpjax.eval import config as eval_config_lib
from dpjax.methods import get_method_module
from dpjax.methods.base import DataSpec, Params, count_params
from dpjax.optim import make_optimizer
from dpjax.privacy import microbatch as microbatch_lib
from dpjax.privacy import noise_secret, provenance
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import report as report_lib
from dpjax.privacy.accounting import PrivacyError
from dpjax.randomness import Streams
from dpjax.state import TrainState
from dpjax.typed_config import ConfigError
from dpjax.workdir_guard import (
    LOCK_FILE,
    FreeChange,
    check_resume_config,
    check_workdir,
    dataset_digest,
    lock_workdir,
)


class BudgetExceededError(PrivacyError):
    """A step past the planned number of DP steps was requested."""


@dataclasses.dataclass
class Run:
    """Everything ``setup`` builds: what the loop, sampling and export need."""

    config: run_config.RunConfig
    workdir: str
    method: Any
    spec: DataSpec
    plan: plan_lib.DPPlan
    streams: Streams
    state: TrainState
    checkpointer: ckpt_lib.Checkpointer
    releases: list[dict[str, Any]]
    mesh: Mesh | None = None  # None: one device; else the 'data' mesh the step runs on.
    # Free fields this resume changed; written to config.json after it worked.
    free_changes: list[FreeChange] = dataclasses.field(default_factory=list)
    lock: Any = None  # The workdir lock's open file (process 0), closed by ``close``.
    # The Poisson sampler's seed, and where it and ``streams.noise`` come from
    # (noise_secret.SECRET, SEED, or NONE without DP); recorded in every checkpoint.
    sampler_seed: int = 0
    noise_source: str = noise_secret.NONE
    # Where ``streams.loss`` comes from (the same values; noise_secret.LOSS_SOURCE_KEY).
    loss_source: str = noise_secret.NONE

    def close(self) -> None:
        """Ends orbax's threads and releases the workdir lock (``train`` calls it)."""
        try:
            self.checkpointer.close()
        finally:
            if self.lock is not None:
                self.lock.close()


def resolve_plan(
    cfg: run_config.RunConfig,
    num_examples: int,
    workdir: str,
    write: bool = True,
    method: Any = None,
    prior: list[dict[str, Any]] | None = None,
) -> plan_lib.DPPlan:
    """The run's plan: the stored one on resume (checked against the config), else a new one.

    With ``method``, a target epsilon is the total over the method's prior releases and
    its own private access (DP-SGD, or its one release when ``uses_dp_sgd`` is False).
    A new plan is written to ``dp_plan.json`` when ``write`` (process 0 only). ``prior``:
    the method's ``prior_records``, when the caller has read them already (they are read
    once per run: a method may read another workdir)."""
    dp = cfg.dp
    path = os.path.join(workdir, "dp_plan.json")
    one_release = method is not None and not method.uses_dp_sgd
    q = 1.0 if one_release else dp.batch_size / num_examples
    steps = dp.steps if dp.steps > 0 or one_release else int(dp.epochs / q) if q <= 1 else 0
    prior = prior_records(method) if prior is None else prior
    if os.path.exists(path):
        stored, extra = plan_lib.load_plan(path)
        # The sigma of a target epsilon was calibrated with the prior releases it was made
        # with: a prior that changed since (a DP-SAD teacher or a DP feature network
        # trained further, before this run's first checkpoint, whose own check is in
        # ``setup``) would be composed silently over a sigma too small for the target.
        # (A plan file written before dpjax recorded them has no 'releases' here.)
        if "releases" in extra:
            planned = [r for r in extra["releases"] if r.get("stage") == "prior"]
            if planned != prior:
                raise PrivacyError(
                    f"{path} was planned with the prior releases {planned}, but the method now "
                    f"reports {prior}; refusing to compose them under a sigma calibrated for "
                    "the old ones. Use a new workdir (or restore the source runs)."
                )
        # What the config asks of the guarantee: its sigma, or its target epsilon (with
        # config.json edited or lost, check_resume_config cannot see a change of these).
        asked = {} if not dp.enabled else (
            {"noise_multiplier": dp.noise_multiplier, "target_epsilon": None}
            if dp.noise_multiplier is not None
            else {"target_epsilon": dp.epsilon})
        expected = {
            **asked,
            "num_examples": num_examples,
            "sampling_rate": q,
            "clip_norm": dp.clip_norm,
            "delta": dp.delta,
            "accountant": dp.accountant,
            "neighbouring": dp.neighbouring,
            "enabled": dp.enabled,
            "mechanism": "release" if one_release else "dpsgd",
        }
        for k, v in expected.items():
            s = getattr(stored, k)
            same = (math.isclose(s, v, rel_tol=1e-12) if isinstance(v, float) and s is not None
                    else s == v)
            if not same:
                raise PrivacyError(
                    f"{path} was planned with {k}={s!r} but the config gives {v!r}; refusing to "
                    "resume under a different privacy plan. Use a new workdir."
                )
        if steps > stored.steps:
            raise BudgetExceededError(
                f"The privacy plan in {path} allows {stored.steps} steps ("
                + (f"epsilon {stored.target_epsilon}" if stored.target_epsilon is not None
                   else f"sigma {stored.noise_multiplier:.4g}")
                + f"); the config asks for {steps}. Training past the "
                "budget is refused: start a new run with a new plan instead."
            )
        if steps < stored.steps:
            raise PrivacyError(
                f"{path} plans {stored.steps} steps but the config asks for {steps}; refusing "
                "to resume under a different privacy plan (a plan is fixed when its run "
                "starts). Use train.max_steps_per_run to stop early, or a new workdir."
            )
        return stored
    plan = plan_lib.make_plan(
        num_examples=num_examples,
        batch_size=dp.batch_size,
        delta=dp.delta,
        clip_norm=dp.clip_norm,
        epochs=dp.epochs,
        steps=dp.steps,
        epsilon=dp.epsilon if dp.noise_multiplier is None else None,
        noise_multiplier=dp.noise_multiplier,
        accountant=dp.accountant,
        neighbouring=dp.neighbouring,
        enabled=dp.enabled,
        prior_events=[report_lib.release_event(r) for r in prior],
        release_events=method.release_events if one_release else None,
    )
    if write:
        # Before any step, the prior releases alone are spent (a DP teacher's training):
        # 0 here was false until the first checkpoint, and for good if the run died first.
        eps = report_lib.epsilon_spent(plan, 0, prior, (plan.accountant,))
        plan_lib.save_plan(path, plan, {
            "steps_done": 0, "releases": prior,
            "epsilon_spent": report_lib.storable_epsilons(eps)})
    return plan


def prior_records(method: Any) -> list[dict[str, Any]]:
    """The method's prior releases, each marked ``stage='prior'`` (none without a method)."""
    if method is None:
        return []
    return [{**r, "stage": "prior"} for r in method.prior_releases()]


def release_done(releases: list[dict[str, Any]]) -> bool:
    """Whether the run's own one-shot release is among ``releases`` (stage 'release')."""
    return any(r.get("stage") == "release" for r in releases)


def setup(config: ml_collections.ConfigDict, workdir: str, log=print) -> tuple[Run, Any]:
    """Builds the run and restores the latest checkpoint. Returns (run, private dataset).

    With ``train.num_devices`` != 1 the state is replicated over the 'data' mesh and the
    checkpoint is restored onto it, whatever device count wrote it. A one-release
    method (DP-MEPF) resumed after its release does not read the private data at all:
    the dataset returned is then None and the size and spec come from the workdir.
    """
    parallel.initialize_distributed()  # First: before any JAX computation.
    main = parallel.is_main_process()
    if not main:
        log = lambda *_: None  # noqa: E731 - only process 0 talks.
    # Stored absolute: config.json is read again from other directories (run_paths).
    config = run_paths.absolute_source_paths(config)
    cfg = run_config.from_configdict(config)
    # The eval section's typos, types and ranges fail now, not at --mode=eval after the
    # whole training (whether its data, weights or caches exist is the eval's to check).
    eval_config_lib.check_eval(cfg)
    try:
        run_config.check_private_data_spec(cfg)
    except ConfigError as e:
        if not os.path.exists(os.path.join(workdir, "config.json")):  # A new run.
            raise
        # A run begun before a check goes on (its workdir is its own), but is told.
        log(f"[dpjax] warning: {e} This run began with that setting: export will refuse it.")
    if cfg.dp.microbatch_size == 0 and jax.process_count() > 1:
        # Each host would measure its own memory; the padded batch shape must agree.
        raise ConfigError("dp.microbatch_size=0 (auto) is for one host; set it explicitly.")
    mesh = parallel.make_data_mesh(cfg.train.num_devices)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    created = [d for d in (workdir, ckpt_dir) if not os.path.exists(d)]
    check_workdir(workdir)  # After the typed config: a bad value creates nothing.
    lock = lock_workdir(workdir)
    try:
        checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    try:
        run, dataset = _build_run(config, cfg, workdir, checkpointer, mesh, log)
    except BaseException:
        # Orbax cleans the directory in a background thread; a run that fails here (a
        # missing dataset, a changed plan) must end it, or the interpreter's shutdown
        # prints that thread's traceback under the user's one-line error.
        checkpointer.close()
        if lock is not None:
            lock.close()
            if workdir in created:  # A workdir this process created holds no other run.
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(workdir, LOCK_FILE))
        # A new run that failed before writing anything (a missing dataset) leaves no
        # empty folders behind; rmdir removes only empty ones, never a checkpoint.
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    run.lock = lock
    return run, dataset


def _build_run(
    config: ml_collections.ConfigDict,
    cfg: run_config.RunConfig,
    workdir: str,
    checkpointer: ckpt_lib.Checkpointer,
    mesh: Mesh | None,
    log,
) -> tuple[Run, Any]:
    """``setup`` after the workdir checks: plan, method, state, restore (see ``setup``)."""
    main = parallel.is_main_process()
    plan_path = os.path.join(workdir, "dp_plan.json")
    reuse = run_noise.secret_reuse(workdir, checkpointer)  # Before anything is written.
    after_release = (
        checkpointer.latest_step() is not None
        and os.path.exists(plan_path)
        and os.path.exists(os.path.join(workdir, sample.SPEC_FILE))
        and release_done(checkpointer.restore_meta().get("releases", []))
    )
    if after_release:  # Post-processing only: the private data is not opened again.
        dataset = None
        spec = sample.load_spec(workdir)
        num_examples = plan_lib.load_plan(plan_path)[0].num_examples
        log(f"[dpjax] the release is done; the private data ({cfg.data.source}) is not read")
    else:
        dataset = data_lib.load(cfg.data)
        spec = DataSpec(dataset.image_shape, cfg.data.num_classes)
        num_examples = len(dataset)
    with _settings_errors_as_config_errors():  # A setting that fits no model built.
        method = get_method_module(cfg.method).make(cfg.method_args, spec)
    if cfg.dp.enabled:  # Before anything is written: no source may void the guarantee.
        with _settings_errors_as_config_errors():
            method.check_private_run()
        provenance.check_sources(method.source_runs(), dataclasses.asdict(cfg.data), cfg.seed,
                                 cfg.dp.secret_noise)
    if not method.uses_dp_sgd and mesh is not None:
        if cfg.train.num_devices != 0 or jax.process_count() > 1:
            raise ConfigError(
                f"{cfg.method} trains on a release, not on private batches: set "
                "train.num_devices=1 (and run one process)."
            )
        # 0 asks for every device (a sweep's default on a multi-GPU point): one is what a
        # release method uses, so it takes one rather than failing the point.
        log(f"[dpjax] {cfg.method} trains on its release on one device; train.num_devices=0 "
            "(every device) applies to DP-SGD's private batches only")
        mesh = None
    streams = Streams.from_seed(cfg.seed)
    # Before anything is written too: a parameter pattern or LoRA target that matches
    # nothing (a ConfigError of params_select or lora) fails here, and the corrected
    # command then starts the run afresh. One compiled init instead of one compilation
    # per initializer op.
    params: Params = jax.jit(method.init, static_argnums=1)(streams.init, spec)
    optimizer = method.optimizer(make_optimizer(cfg.optim))
    prior = prior_records(method)  # Read once (a method may read another workdir).
    for r in prior:
        if r.get("neighbouring", cfg.dp.neighbouring) != cfg.dp.neighbouring:
            raise PrivacyError(
                f"A prior release ({r.get('description')}) is under the "
                f"'{r['neighbouring']}' relation but this run is under "
                f"'{cfg.dp.neighbouring}'; their epsilons cannot be composed. Use the same "
                "dp.neighbouring."
            )
    # First: a budget overrun or a changed plan says so before anything is written. With
    # a checkpoint, the plan is written only once the checkpoint's own plan matched it
    # (a missing plan file is rewritten by the resume: run_records.refresh_records).
    fresh = checkpointer.latest_step() is None
    plan = resolve_plan(cfg, num_examples, workdir, main and fresh, method, prior)
    digest = None if dataset is None else dataset_digest(dataset)
    if digest is not None:  # Every process gathers rows by the same global indices.
        parallel.check_same_on_every_process(digest, "private dataset (its digest)")
    # Likewise config.json: written now for a new run, after the checkpoint check on resume.
    free_changes = check_resume_config(workdir, config, main and fresh, digest,
                                       resuming=not fresh)
    for change in free_changes:
        log(f"[dpjax] resuming with {change} (how or where, not what: allowed)")
    if main:
        sample.save_spec(workdir, spec)
    state = TrainState.create(params.trainable, params.frozen, optimizer.init(params.trainable))
    data_line = (
        f"data {dataset.name}: {len(dataset)} x {dataset.image_shape}"
        if dataset is not None
        else f"data not read: {num_examples} x {spec.image_shape}"
    )
    log(
        f"[dpjax] {cfg.method}: {count_params(params.trainable):,} trainable parameters, "
        f"{count_params(params.frozen):,} frozen; {data_line}"
    )
    if mesh is not None:
        state = parallel.replicate(state, mesh)
        log(
            f"[dpjax] data parallel over {mesh.size} devices ({jax.process_count()} "
            f"process(es)); the DP step is the same as on one device"
        )
    else:
        # Committed to the device, as a restored checkpoint's arrays are: the step then
        # compiles to the same program from scratch and on resume, one compilation-cache
        # entry (dpjax/compile_cache.py) instead of two.
        state = jax.device_put(state, jax.local_devices()[0])
    releases = list(prior)
    meta = None
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        if not plan_lib.recorded_plan_matches(meta.get("plan"), plan):
            raise ckpt_lib.CheckpointError(
                f"The latest checkpoint was written under plan {meta.get('plan')}, not under "
                f"the plan of dp_plan.json and this config {plan.to_dict()}; refusing to mix "
                "them."
            )
        stored_prior = [r for r in meta.get("releases", []) if r.get("stage") == "prior"]
        if stored_prior != releases:
            raise ckpt_lib.CheckpointError(
                f"The checkpoint was trained on prior releases {stored_prior}, but the method "
                f"now reports {releases}; refusing to mix them. Use a new workdir."
            )
        releases = list(meta.get("releases", []))
        if main:  # A config.json lost or deleted is written back now that it matched.
            check_resume_config(workdir, config, True, digest)
        log(f"[dpjax] resumed from step {int(state.step)} ({checkpointer.directory})")
    elif main and os.path.exists(plan_path := os.path.join(workdir, "dp_plan.json")):
        done = plan_lib.load_plan(plan_path)[1].get("steps_done", 0)
        if done:  # The checkpoints were deleted or moved away.
            log(f"[dpjax] {plan_path} records {done} steps done, but {checkpointer.directory} "
                "holds no checkpoint: starting again from step 0. The steps replay the same "
                "batches and noise (they depend only on the step and the run's noise "
                "secret, or its seed with dp.secret_noise=False).")
    streams, seed_of_batches, noise_source, loss_source = run_noise.noise_randomness(
        cfg, workdir, streams, meta, reuse, log, plan.mechanism)
    if cfg.dp.microbatch_size == 0 and method.uses_dp_sgd:
        per_device = plan.expected_batch_size / parallel.num_shards(mesh)
        cfg = microbatch_lib.with_auto_size(cfg, method, params, spec.image_shape, per_device, log)
    run = Run(cfg, workdir, method, spec, plan, streams, state, checkpointer, releases, mesh,
              free_changes, sampler_seed=seed_of_batches, noise_source=noise_source,
              loss_source=loss_source)
    return run, dataset


@contextlib.contextmanager
def _settings_errors_as_config_errors():
    """A plain ValueError raised while a method builds its model (``make``) comes from
    its settings or the runs they name (a UNet size that fits no image, a teacher
    workdir that holds no run): a ConfigError, reported in one line. Narrower errors
    keep their type. Not used around ``init``, where a plain ValueError may be a bug
    (its setting errors are ConfigErrors already)."""
    try:
        yield
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise ConfigError(f"method_args: {e}") from e
