"""Orbax checkpoints of the train state, with the privacy plan and epsilon in each.

Guarantees:
* A checkpoint is written to a temporary directory and renamed into place (orbax's
  atomic commit), so a process killed mid-write leaves the previous checkpoints intact;
  stale temporary directories are ignored on restore and cleaned up.
* Every checkpoint carries ``meta``: the DP plan, the steps done and the epsilon spent,
  so a checkpoint alone says what privacy it has cost.
* ``Checkpointer.restore`` restores onto the structure, dtypes and shardings of a
  template state, so a checkpoint saved on N devices restores on M (4 -> 1 and 1 -> 4
  are tested): template leaves that are arrays keep their sharding (e.g. replicated
  over a data-parallel mesh), and abstract leaves without a sharding (``eval_shape``
  templates) restore onto this process's first local device, never onto the topology
  that wrote the checkpoint.
* A restored state whose floating-point values are not all finite is refused: the train
  loop never saves one (it stops on a non-finite update), so it is a corrupt file (a
  flipped byte restored silently as NaN and was trained on and exported). The array
  data itself is checked by TensorStore's OCDBT format: of 397 single-bit flips spread
  over every file of a checkpoint, 106 were refused (every one in the data file that
  restore reads) and 291 changed nothing restore reads; none restored other values
  (``benchmarks/cpu/checkpoint_bitflips.py``, orbax 0.12.8). A CRC-32 per array in the
  meta was tried and dropped: it caught nothing more.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dpjax.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible with the current config."""


def _manager(directory: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=("state", "meta")
    )


def _restore_target(leaf: Any) -> jax.ShapeDtypeStruct:
    """The abstract restore target of a template leaf; one local device if it has no sharding."""
    target = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(target, "sharding", None) is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=device)
    return target


class Checkpointer:
    """Saves and restores ``TrainState`` plus JSON metadata under ``directory``."""

    def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"No checkpoint directory at {self.directory}.")
        self._mgr = _manager(self.directory, keep, read_only)
        # The manager removes stale temporary directories (a write killed midway) in a
        # background thread that only its ``save`` waits for (orbax 0.11). Wait here: a
        # process that fails before saving (a missing dataset) would otherwise end while
        # that thread runs and print its traceback under the user's one-line error.
        wait = getattr(self._mgr, "_maybe_await_cleanup_tmp_directory", None)
        if wait is not None:
            wait()

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Saves synchronously; returns once the checkpoint is committed.

        Raises:
          CheckpointError: the directory cannot be written (a full disk, a read-only or
            unwritable file system); the checkpoints saved before are intact.
        """
        try:
            self._mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state.as_dict()),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
            self._mgr.wait_until_finished()
        except (OSError, ValueError) as e:
            if not is_storage_error(e):
                raise
            what = (f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
                    if isinstance(e, OSError) else _first_line(e))
            raise CheckpointError(
                f"Cannot write checkpoint {step} to {self.directory} ({what}). The "
                "checkpoints saved before are intact: free space or fix the permissions, "
                "then run the same command again to resume."
            ) from e

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for corrupt files.
            raise CheckpointError(
                f"Checkpoint {step} in {self.directory} is unreadable ({type(e).__name__}: "
                f"{_first_line(e)})." + self._earlier_hint(step)
            ) from e
        return dict(out["meta"])

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores ``step`` (default: latest) onto the template's structure and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        target = jax.tree_util.tree_map(_restore_target, template.as_dict())
        try:
            out = self._mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"Cannot restore checkpoint {step} from {self.directory}: it is corrupt or was "
                f"written by a different config/model ({type(e).__name__}: {_first_line(e)})."
                + self._earlier_hint(step)
            ) from e
        state = TrainState.from_dict(out["state"])
        bad = _non_finite_leaves(out["state"])
        if bad:
            raise CheckpointError(
                f"Checkpoint {step} in {self.directory} holds non-finite values in {bad[:3]} "
                f"({len(bad)} array(s)); training never saves such a state, so its files are "
                "corrupt." + self._earlier_hint(step)
            )
        return state, dict(out["meta"])

    def _earlier_hint(self, step: int) -> str:
        """How to go on from the checkpoint before ``step``, if there is one."""
        earlier = sorted(s for s in self._mgr.all_steps() if s < step)
        if not earlier:
            return ""
        return (f" To go on from checkpoint {earlier[-1]}, move {self.directory}/{step} out of "
                "the workdir (a resume replays the same steps).")

    def close(self) -> None:
        self._mgr.close()


# A full disk or quota, a read-only or unwritable file system: the user's to fix, and
# what the one-line messages of save() and of main's handler say to fix.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_storage_error(error: BaseException) -> bool:
    """Whether an error is a lack of space or of permission to write: an OSError with one
    of STORAGE_ERRNOS, or TensorStore's ValueError for one ('RESOURCE_EXHAUSTED: Error
    writing ... [os_error_code=28]'). Anything else (a removed directory, a bug) is not,
    so it is never disguised as "free space or fix the permissions"."""
    if isinstance(error, OSError):
        return error.errno in STORAGE_ERRNOS
    text = str(error)
    code = re.search(r"os_error_code=(\d+)", text)
    if code:
        return int(code.group(1)) in STORAGE_ERRNOS
    return "RESOURCE_EXHAUSTED" in text or "PERMISSION_DENIED" in text


def _non_finite_leaves(tree: Any) -> list[str]:
    """The paths of the floating-point arrays of ``tree`` with a NaN or an infinity."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    floats = [(p, x) for p, x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if not floats:
        return []
    finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in floats])
    return [jax.tree_util.keystr(p) for (p, _), ok in zip(floats, finite, strict=True)
            if not bool(ok)]


def _first_line(error: BaseException) -> str:
    """An orbax/TensorStore error's first sentence: their messages go on with a
    multi-line dump of the store's spec, which says nothing to a user."""
    text = str(error).split("See full TensorStore details", 1)[0]
    return (text.strip().splitlines() or [type(error).__name__])[0].strip()[:300]
