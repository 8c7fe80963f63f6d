"""The workdir guard: what a workdir must be before a run writes, and what a resume may change.

What it guarantees (``run_setup.setup`` calls it before any step runs):
* the workdir is writable and has room for checkpoints (``check_workdir``);
* one process at a time trains in it (``lock_workdir``, an flock the OS frees when its
  holder dies);
* on resume, the config sections that define the run (``RESUME_LOCKED_SECTIONS``) equal
  the stored ones, except the fields of ``RESUME_FREE_FIELDS``, which say how the same
  clipped sum is computed or where the same data lies, and so do the fields of
  ``RESUME_LOCKED_FIELDS`` (the EMA's) of the sections that may otherwise change; a
  moved dataset is accepted only when its digest equals the one recorded when the run
  began (``check_resume_config``);
* a changed free field is written into ``config.json`` only once the run has used it
  (``record_free_changes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import warnings
from typing import Any

import jax
import ml_collections

from dpjax import atomic_file, file_lock, parallel, run_config, run_paths
from dpjax import checkpoint as ckpt_lib
from dpjax import data as data_lib
from dpjax.data import npz
from dpjax.eval import resumable_array
from dpjax.methods import get_method_module

MIN_FREE_BYTES = 50 * 2**20
# Sections whose change on resume would change what is trained or its privacy.
RESUME_LOCKED_SECTIONS = ("seed", "method", "method_args", "data", "dp", "optim")
# Fields of those sections that may change on resume. The dp ones choose how the same
# clipped sum is computed (privacy/clipping.py: equal up to float rounding), e.g. a
# smaller micro-batch on a smaller accelerator; the data ones where the same data lies
# (a moved dataset, another cluster's mounts), accepted when the data's digest agrees.
RESUME_FREE_FIELDS = {
    "dp": ("microbatch_size", "microbatch_loop", "clipping"),
    # float_range: a run without DP begun before it existed declares its npz float range
    # once, accepted only where the digest shows the images read the same (a private one
    # is refused: npz.check_float_range_from_start).
    "data": ("path", "tfds_data_dir", "tfds_download", "float_range"),
}
# Fields of the free sections that define the released weights all the same: the
# exported EMA and the model card's rate. A resume under another rate would average
# two rates while config.json and the card state the first.
RESUME_LOCKED_FIELDS = {"train": ("ema_rate", "ema_warmup")}
# The digest of the private data a run began on (``dataset_digest``); workdir only.
DATA_DIGEST_FILE = "data_digest.json"
# Held (flock) by the process training in a workdir; the OS releases it when it dies.
LOCK_FILE = ".dpjax_train.lock"


class WorkdirError(OSError):
    """The workdir cannot be used (not writable, disk full, or holds another run)."""


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
    existed = os.path.exists(path)
    f = open(path, "a+")  # noqa: SIM115 - held for the run's lifetime.
    try:
        status, error = file_lock.try_lock(f)
    except OSError as e:
        f.close()
        raise WorkdirError(f"Cannot lock {path}: {e.strerror or e}.") from e
    if status == file_lock.UNSUPPORTED:
        f.close()
        if not existed:  # Unheld, it marks nothing; a failed new run leaves no folder.
            os.remove(path)
        warnings.warn(file_lock.unsupported_message(workdir, error), stacklevel=2)
        return None
    if status == file_lock.HELD:
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
    """Creates ``workdir`` and fails early, clearly, if it is unwritable or the disk is
    full (then a folder it created is removed again)."""
    created = not os.path.exists(workdir)
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
        if created:  # A refused new run leaves no empty folder behind.
            with contextlib.suppress(OSError):
                os.rmdir(workdir)
        raise WorkdirError(
            f"Only {free / 2**20:.1f} MiB free under {workdir}; need at least "
            f"{min_free_bytes / 2**20:.0f} MiB for checkpoints. Free space or pick another workdir."
        )


def _check_same_data(
    workdir: str, new: dict[str, Any], stored_digest: str | None, data_digest: str | None
) -> None:
    """Raises CheckpointError if the data just loaded is not the data the run began on."""
    if data_digest is None or stored_digest in (None, data_digest):
        return
    raise ckpt_lib.CheckpointError(
        f"The data that data.* gives now ({new['data'].get('source')} "
        f"{new['data'].get('name')!r}"
        + (f" at {new['data']['path']}" if new["data"].get("path") else "")
        + f") differs from the data that the run in {workdir} was "
        "trained on (its images, labels or their order; a new image decoder can change "
        "them too); refusing to resume it on other data. Point data.* at the run's data, "
        "or use a new --workdir (existing checkpoints are untouched)."
    )


def _field_change(
    stored: dict[str, Any], new: dict[str, Any], key: str, defaults: dict[str, Any]
) -> tuple[Any, Any] | None:
    """(stored value, new value) of ``key`` if they differ, else None.

    A field that either side lacks had its default: a field added to dpjax after the run
    started, left at its default, does not change the run."""
    was, now = stored.get(key, defaults.get(key)), new.get(key, defaults.get(key))
    return None if was == now else (was, now)


def check_resume_config(
    workdir: str,
    config: ml_collections.ConfigDict,
    write: bool = True,
    data_digest: str | None = None,
    resuming: bool = True,
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
    ``record_free_changes`` writes them once the run has used them. ``resuming``: the
    workdir has a checkpoint; then, with config.json lost, the data is still checked
    against the recorded digest.
    """
    path = os.path.join(workdir, "config.json")
    new = json.loads(run_config.config_to_json(config))
    stored_digest = _read_data_digest(workdir)
    digest_path = os.path.join(workdir, DATA_DIGEST_FILE)
    if not os.path.exists(path):
        if resuming:  # config.json lost: the digest still tells the checkpoint's data.
            _check_same_data(workdir, new, stored_digest, data_digest)
        if write:
            if data_digest is not None:
                atomic_file.write_json(digest_path, {"digest": data_digest})
            atomic_file.write_text(path, run_config.config_to_json(config))
        return []
    # A run stored before its paths were absolute: they resolved against the directory
    # each command ran in, as this one's do (run_paths).
    # In the form config_to_json writes (a run stored before it wrote non-finite floats
    # as 'inf' held bare Infinity tokens: the same values).
    old = atomic_file.json_safe(run_paths.absolute_source_paths(atomic_file.read_json(path)))
    if resuming:  # Steps ran under the stored data section: were they the DP mechanism?
        # (The file at the stored path, which the steps read: a converted copy elsewhere
        # would read the same and hide what they did.)
        npz.check_float_range_from_start(
            old.get("data") or {}, bool((old.get("dp") or {}).get("enabled", True)))
    free = {s: set(keys) for s, keys in RESUME_FREE_FIELDS.items()}
    if stored_digest is None or data_digest is None:
        free["data"] = set()  # Nothing shows that another location holds the same data.
    diffs, changed_free = [], []
    for section in RESUME_LOCKED_SECTIONS:
        if old.get(section) != new.get(section):
            a, b = old.get(section), new.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                defaults = _section_defaults(section, new.get("method", ""))
                for k in sorted(set(a) | set(b)):
                    change = _field_change(a, b, k, defaults)
                    if change is None:
                        continue
                    if k in free.get(section, ()):
                        changed_free.append(FreeChange(section, k, *change))
                    else:
                        diffs.append(f"{section}.{k}: {change[0]!r} -> {change[1]!r}")
            else:
                diffs.append(f"{section}: {a!r} -> {b!r}")
    for section, keys in RESUME_LOCKED_FIELDS.items():
        a, b = old.get(section) or {}, new.get(section) or {}
        defaults = _section_defaults(section, "")
        for k in keys:
            change = _field_change(a, b, k, defaults)
            if change is not None:
                diffs.append(f"{section}.{k}: {change[0]!r} -> {change[1]!r}")
    if diffs:
        raise ckpt_lib.CheckpointError(
            f"Workdir {workdir} holds a run with a different config; refusing to resume it "
            f"with: {'; '.join(diffs)}. Use a new --workdir (existing checkpoints are untouched)."
        )
    _check_same_data(workdir, new, stored_digest, data_digest)
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
    recorded as the run's). An unfinished eval of the same checkpoint goes on: its
    resumable samples are keyed on the method and its arguments, which stay."""
    todo = [c for c in changes if steps_ran or c.section == "data"]
    if not todo:
        return
    path = os.path.join(workdir, "config.json")
    stored = atomic_file.read_json(path)
    for c in todo:
        stored.setdefault(c.section, {})[c.key] = c.new
    atomic_file.write_text(path, json.dumps(atomic_file.json_safe(stored), indent=2,
                                            sort_keys=True, allow_nan=False))


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
    cls = {"dp": run_config.DPConfig, "optim": run_config.OptimConfig,
           "train": run_config.TrainConfig}.get(section)
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
    return json.loads(json.dumps(atomic_file.json_safe(dataclasses.asdict(defaults)),
                                 default=str))
