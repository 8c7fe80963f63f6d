"""Setting up a run: the workdir checks, the privacy plan, the method, the restored state.

``setup`` is what ``train`` calls first. What it guarantees before any step runs:
* the DP plan (q, sigma, C, T, delta) is fixed: a new one is calibrated over the
  method's prior releases and its own private access and written to ``dp_plan.json``;
  on resume the stored plan is checked against the config and a budget overrun or a
  changed plan is refused before anything is written;
* the sections of the config that define the run (``RESUME_LOCKED_SECTIONS``) equal the
  stored ones on resume;
* a restored checkpoint was written under the same plan and the same prior releases;
* a one-release method resumed after its release does not open the private data.
``save_checkpoint`` and ``write_privacy_report`` keep the epsilon spent next to every
checkpoint and in the final report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import socket
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from dpjax import atomic_file, parallel, run_config, sample
from dpjax import checkpoint as ckpt_lib
from dpjax import data as data_lib
from dpjax.eval import resumable_array
from dpjax.methods import get_method_module
from dpjax.methods.base import DataSpec, Params, count_params
from dpjax.optim import make_optimizer
from dpjax.privacy import microbatch as microbatch_lib
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import provenance
from dpjax.privacy import report as report_lib
from dpjax.privacy.accounting import PrivacyError
from dpjax.randomness import Streams
from dpjax.state import TrainState

MIN_FREE_BYTES = 50 * 2**20
# Sections whose change on resume would change what is trained or its privacy.
RESUME_LOCKED_SECTIONS = ("seed", "method", "method_args", "data", "dp", "optim")
# Fields of those sections that may change on resume. The dp ones choose how the same
# clipped sum is computed (privacy/clipping.py: equal up to float rounding), e.g. a
# smaller micro-batch on a smaller accelerator; the data ones where the same data lies
# (a moved dataset, another cluster's mounts), accepted when the data's digest agrees.
RESUME_FREE_FIELDS = {
    "dp": ("microbatch_size", "microbatch_loop", "clipping"),
    "data": ("path", "tfds_data_dir", "tfds_download"),
}
# The digest of the private data a run began on (``dataset_digest``); workdir only.
DATA_DIGEST_FILE = "data_digest.json"
# Held (flock) by the process training in a workdir; the OS releases it when it dies.
LOCK_FILE = ".dpjax_train.lock"


class BudgetExceededError(PrivacyError):
    """A step past the planned number of DP steps was requested."""


class WorkdirError(OSError):
    """The workdir cannot be used (not writable, disk full, or holds another run)."""


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

    def close(self) -> None:
        """Ends orbax's threads and releases the workdir lock (``train`` calls it)."""
        try:
            self.checkpointer.close()
        finally:
            if self.lock is not None:
                self.lock.close()


def lock_workdir(workdir: str) -> Any:
    """Takes the workdir's training lock (process 0 only; None elsewhere).

    Two processes training one workdir would write the same checkpoints: a second
    ``train`` of a workdir (a resubmitted SLURM task while the first still runs, a
    forgotten background job) fails here with WorkdirError before anything is written.
    The lock is advisory (flock) and released by the OS when its holder dies, so a
    killed run never blocks its resume."""
    if not parallel.is_main_process():
        return None
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, "a+")  # noqa: SIM115 - held for the run's lifetime.
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise WorkdirError(
            f"Another dpjax process (pid {holder}) is training in {workdir}; two would "
            "write the same checkpoints. Wait for it or stop it, then run again."
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}@{socket.gethostname()}\n")
    f.flush()
    return f


def check_workdir(workdir: str, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Creates ``workdir`` and fails early, clearly, if it is unwritable or the disk is full."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"Workdir {workdir} is not writable: {e.strerror or e}.") from e
    free = shutil.disk_usage(workdir).free
    if free < min_free_bytes:
        raise WorkdirError(
            f"Only {free / 2**20:.1f} MiB free under {workdir}; need at least "
            f"{min_free_bytes / 2**20:.0f} MiB for checkpoints. Free space or pick another workdir."
        )


def check_resume_config(
    workdir: str,
    config: ml_collections.ConfigDict,
    write: bool = True,
    data_digest: str | None = None,
) -> list[FreeChange]:
    """On resume, the sections that define the run must equal the stored ones.

    The fields of ``RESUME_FREE_FIELDS`` may change: they say how the same sum is
    computed or where the same data lies. A changed data location is accepted only
    when ``data_digest`` (that of the data just loaded) equals the digest recorded when
    the run began; a run from before digests were recorded keeps its data fields locked
    (its first resume records the digest of its data, found where the run read it).
    With ``data_digest``, data that changed under the same path is refused too. When
    ``write``, a new run's digest and then its config are written (the digest first: a
    kill between the two leaves a new run, not one that looks older than digests).
    Nothing else is written: the changed free fields are returned, and
    ``record_free_changes`` writes them once the run has used them.
    """
    path = os.path.join(workdir, "config.json")
    new = json.loads(run_config.config_to_json(config))
    stored_digest = _read_data_digest(workdir)
    digest_path = os.path.join(workdir, DATA_DIGEST_FILE)
    if not os.path.exists(path):
        if write:
            if data_digest is not None:
                atomic_file.write_json(digest_path, {"digest": data_digest})
            atomic_file.write_text(path, run_config.config_to_json(config))
        return []
    with open(path) as f:
        old = json.load(f)
    free = {s: set(keys) for s, keys in RESUME_FREE_FIELDS.items()}
    if stored_digest is None or data_digest is None:
        free["data"] = set()  # Nothing shows that another location holds the same data.
    diffs, changed_free = [], []
    for section in RESUME_LOCKED_SECTIONS:
        if old.get(section) != new.get(section):
            a, b = old.get(section), new.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                defaults = _section_defaults(section, new.get("method", ""))
                keys = sorted(
                    k
                    for k in set(a) | set(b)
                    if a.get(k) != b.get(k)
                    # A field added to dpjax after the run started, left at its default,
                    # does not change the run.
                    and not (k not in a and k in defaults and b[k] == defaults[k])
                )
                for k in keys:
                    if k in free.get(section, ()):
                        changed_free.append(FreeChange(section, k, a.get(k), b.get(k)))
                    else:
                        diffs.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
            else:
                diffs.append(f"{section}: {a!r} -> {b!r}")
    if diffs:
        raise ckpt_lib.CheckpointError(
            f"Workdir {workdir} holds a run with a different config; refusing to resume it "
            f"with: {'; '.join(diffs)}. Use a new --workdir (existing checkpoints are untouched)."
        )
    if data_digest is not None and stored_digest not in (None, data_digest):
        raise ckpt_lib.CheckpointError(
            f"The data that data.* gives now ({new['data'].get('source')} "
            f"{new['data'].get('name')!r}) differs from the data that the run in {workdir} was "
            "trained on (its images, labels or their order; a new image decoder can change "
            "them too); refusing to resume it on other data. Point data.* at the run's data, "
            "or use a new --workdir (existing checkpoints are untouched)."
        )
    if write and data_digest is not None and stored_digest is None:
        # A run from before digests: its data fields were locked, so this is its data.
        atomic_file.write_json(digest_path, {"digest": data_digest})
    return changed_free


@dataclasses.dataclass(frozen=True)
class FreeChange:
    """A ``RESUME_FREE_FIELDS`` field that a resume changes (values as config.json has them)."""

    section: str
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.section}.{self.key}: {self.old!r} -> {self.new!r}"


def record_free_changes(workdir: str, changes: list[FreeChange], steps_ran: bool) -> None:
    """Writes a resume's changed free fields into ``config.json``, once they worked.

    The data location always (eval and sample read the data from there; the digest
    showed it holds the run's data); how the sum is computed only when ``steps_ran``
    (a setting that never ran a step, e.g. a clipping path the method refuses, is not
    recorded as the run's). An unfinished eval of the same checkpoint then samples
    again: its resumable samples are keyed on config.json's bytes."""
    todo = [c for c in changes if steps_ran or c.section == "data"]
    if not todo:
        return
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        stored = json.load(f)
    for c in todo:
        stored.setdefault(c.section, {})[c.key] = c.new
    atomic_file.write_text(path, json.dumps(stored, indent=2, sort_keys=True))


def dataset_digest(dataset: data_lib.InMemoryDataset) -> str:
    """A digest of a dataset's images and labels (in order): equal digests, same data.

    Kept in the workdir only (``DATA_DIGEST_FILE``) and never exported or logged: it is
    an exact function of the private data."""
    return resumable_array.tree_digest((dataset.images, dataset.labels))


def _read_data_digest(workdir: str) -> str | None:
    """The digest recorded when the run began; None for a new run or an older one."""
    path = os.path.join(workdir, DATA_DIGEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return str(json.load(f)["digest"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ckpt_lib.CheckpointError(
            f"{path} is unreadable ({e}); it records which data the run began on. Restore "
            "it, or delete it to resume with the data fields locked as they are stored."
        ) from e


def _section_defaults(section: str, method: str) -> dict[str, Any]:
    """The defaults of a config section's fields, as ``config.json`` stores them."""
    cls = {"dp": run_config.DPConfig, "optim": run_config.OptimConfig}.get(section)
    if section == "data":
        cls = data_lib.DataConfig
    elif section == "method_args" and method:
        try:
            cls = get_method_module(method).Config
        except ValueError:  # An unknown method: from_configdict names it.
            return {}
    if cls is None:
        return {}
    try:
        defaults = cls()
    except (TypeError, ValueError):  # No usable defaults: every new key then counts.
        return {}
    return json.loads(json.dumps(dataclasses.asdict(defaults), default=str))


def resolve_plan(
    cfg: run_config.RunConfig,
    num_examples: int,
    workdir: str,
    write: bool = True,
    method: Any = None,
) -> plan_lib.DPPlan:
    """The run's plan: the stored one on resume (checked against the config), else a new one.

    With ``method``, a target epsilon is the total over the method's prior releases and
    its own private access (DP-SGD, or its one release when ``uses_dp_sgd`` is False).
    A new plan is written to ``dp_plan.json`` when ``write`` (process 0 only)."""
    dp = cfg.dp
    path = os.path.join(workdir, "dp_plan.json")
    one_release = method is not None and not method.uses_dp_sgd
    q = 1.0 if one_release else dp.batch_size / num_examples
    steps = dp.steps if dp.steps > 0 or one_release else int(dp.epochs / q) if q <= 1 else 0
    if os.path.exists(path):
        stored, _ = plan_lib.load_plan(path)
        expected = {
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
            same = math.isclose(s, v, rel_tol=1e-12) if isinstance(v, float) else s == v
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
        prior_events=[report_lib.release_event(r) for r in prior_records(method)],
        release_events=method.release_events if one_release else None,
    )
    if write:
        plan_lib.save_plan(path, plan, {"steps_done": 0, "epsilon_spent": {"rdp": 0.0, "pld": 0.0}})
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
    cfg = run_config.from_configdict(config)
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
    method = get_method_module(cfg.method).make(cfg.method_args, spec)
    if cfg.dp.enabled:  # Before anything is written: no source may void the guarantee.
        provenance.check_sources(method.source_runs(), dataclasses.asdict(cfg.data), cfg.seed)
    if not method.uses_dp_sgd and mesh is not None:
        raise ValueError(
            f"{cfg.method} trains on a release, not on private batches: set train.num_devices=1."
        )
    prior = prior_records(method)  # Read once (a method may read another workdir).
    for r in prior:
        if r.get("neighbouring", cfg.dp.neighbouring) != cfg.dp.neighbouring:
            raise PrivacyError(
                f"A prior release ({r.get('description')}) is under the "
                f"'{r['neighbouring']}' relation but this run is under "
                f"'{cfg.dp.neighbouring}'; their epsilons cannot be composed. Use the same "
                "dp.neighbouring."
            )
    # First: a budget overrun or a changed plan says so before anything is written.
    plan = resolve_plan(cfg, num_examples, workdir, main, method)
    digest = None if dataset is None else dataset_digest(dataset)
    free_changes = check_resume_config(workdir, config, main, digest)
    for change in free_changes:
        log(f"[dpjax] resuming with {change} (how or where, not what: allowed)")
    if main:
        sample.save_spec(workdir, spec)
    streams = Streams.from_seed(cfg.seed)
    # One compiled init instead of one compilation per initializer op.
    params: Params = jax.jit(method.init, static_argnums=1)(streams.init, spec)
    optimizer = method.optimizer(make_optimizer(cfg.optim))
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
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        stored = plan_lib.DPPlan.from_dict(meta["plan"])
        if not stored.same_guarantee_as(plan) or stored.steps != plan.steps:
            raise ckpt_lib.CheckpointError(
                f"The latest checkpoint was written under plan {meta['plan']}, not the workdir's "
                f"dp_plan.json {plan.to_dict()}; refusing to mix them."
            )
        stored_prior = [r for r in meta.get("releases", []) if r.get("stage") == "prior"]
        if stored_prior != releases:
            raise ckpt_lib.CheckpointError(
                f"The checkpoint was trained on prior releases {stored_prior}, but the method "
                f"now reports {releases}; refusing to mix them. Use a new workdir."
            )
        releases = list(meta.get("releases", []))
        log(f"[dpjax] resumed from step {int(state.step)} ({checkpointer.directory})")
    if cfg.dp.microbatch_size == 0 and method.uses_dp_sgd:
        cfg = _with_auto_microbatch(cfg, method, params, spec, plan, mesh, log)
    run = Run(cfg, workdir, method, spec, plan, streams, state, checkpointer, releases, mesh,
              free_changes)
    return run, dataset


def _with_auto_microbatch(cfg, method, params: Params, spec: DataSpec, plan, mesh, log):
    """``cfg`` with ``dp.microbatch_size`` chosen from the memory (``microbatch.py``).

    Capped at a quarter of the expected per-device batch, so that the last, partly
    padded micro-batch of a Poisson batch costs at most about 1/8 of a step on average.
    """
    if jax.process_count() > 1:
        # Each host would measure its own memory; the padded batch shape must agree.
        raise ValueError("dp.microbatch_size=0 (auto) is for one host; set it explicitly.")
    per_device = plan.expected_batch_size / parallel.num_shards(mesh)
    choice = microbatch_lib.auto_microbatch_size(
        method,
        params.trainable,
        params.frozen,
        spec.image_shape,
        cfg.dp.clipping,
        max_size=max(1, int(per_device // 4)),
        compute_dtype=cfg.dp.compute_dtype,
    )
    log(
        f"[dpjax] micro-batch size {choice.size} (auto: {choice.bytes_per_example / 2**20:.1f} "
        f"MiB per example measured at {choice.probe}, budget {choice.budget_bytes / 2**30:.1f} GiB)"
    )
    return dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, microbatch_size=choice.size))


def _meta(run: Run, steps_done: int) -> dict[str, Any]:
    # The plan's own accountant only: PLD at small sigma takes seconds per call, too slow
    # for every checkpoint; the final privacy report gives both.
    eps = report_lib.epsilon_spent(run.plan, steps_done, run.releases, (run.plan.accountant,))
    return {
        "plan": run.plan.to_dict(),
        "steps_done": steps_done,
        "epsilon_spent": {k: (v if math.isfinite(v) else str(v)) for k, v in eps.items()},
        "releases": run.releases,
        "method": run.config.method,
    }


def save_checkpoint(run: Run, state: TrainState) -> None:
    """Checkpoint, then the plan file with the epsilon now spent (both atomic)."""
    steps_done = int(state.step)
    meta = _meta(run, steps_done)
    run.checkpointer.save(steps_done, state, meta)  # Every process: orbax coordinates hosts.
    if parallel.is_main_process():
        _write_plan_file(run, meta)


def refresh_plan_file(run: Run, steps_done: int) -> None:
    """Rewrites dp_plan.json for the restored checkpoint's step.

    A kill between a checkpoint and its plan file leaves the file one checkpoint behind;
    a resume that has no step left to run would otherwise never bring it up to date.
    """
    _write_plan_file(run, _meta(run, steps_done))


def _write_plan_file(run: Run, meta: dict[str, Any]) -> None:
    plan_lib.save_plan(
        os.path.join(run.workdir, "dp_plan.json"),
        run.plan,
        {k: v for k, v in meta.items() if k != "plan"},
    )


def write_privacy_report(run: Run, steps_done: int) -> dict[str, Any]:
    """Writes privacy_report.json and privacy_report.md to the workdir."""
    rep = report_lib.privacy_report(
        run.plan, steps_done, run.config.method, run.releases, run.method.privacy_notes()
    )
    # Atomically: a kill mid-write leaves the previous report whole, not a truncated one.
    atomic_file.write_json(os.path.join(run.workdir, "privacy_report.json"), rep, indent=2)
    atomic_file.write_text(os.path.join(run.workdir, "privacy_report.md"),
                           report_lib.report_markdown(rep))
    return rep
