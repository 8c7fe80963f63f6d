"""Data parallelism over devices and hosts: distributed start-up, the mesh, batch dealing.

The DP step (``privacy/dp_step.py``) runs over a ``jax.sharding.Mesh`` with one axis,
``'data'``: the padded Poisson batch is sharded over it, everything else (parameters,
optimizer state, EMA, the dataset, the key streams) is replicated. This module builds
those pieces.

Guarantees:
* ``deal_batch`` only rearranges the rows of a padded batch: the same dataset indices,
  each exactly once, the same number of real rows. So the Poisson batch, and the
  sampler's dependence on (its seed, step) alone, are those of a one-device run.
* Within every device's slice the real rows come first (the clipped sum's early stop
  relies on it), and real rows are dealt round-robin so that the devices' loads differ
  by at most one example.
* ``replicate`` and ``shard_batch`` give global ``jax.Array``s that are correct in a
  multi-process (multi-host) run: every process provides the data of its addressable
  devices only, from the same host values (every process computes the same batch from
  (the sampler's seed, step), with the noise secret that process 0 broadcast, and holds
  the same dataset and initial state).
* ``initialize_distributed`` calls ``jax.distributed.initialize()`` at most once, and only
  when asked to (``DPJAX_DISTRIBUTED=1``) or when the environment is unambiguously a
  multi-process launch (``JAX_COORDINATOR_ADDRESS`` set, or an ``srun`` step of several
  SLURM tasks); ``DPJAX_DISTRIBUTED=0`` turns the detection off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpjax.privacy.dp_step import DATA_AXIS
from dpjax.privacy.sampling import PaddedBatch
from dpjax.typed_config import ConfigError

PyTree = Any
DISTRIBUTED_ENV = "DPJAX_DISTRIBUTED"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ParallelConfigError(ConfigError):
    """The requested device layout cannot be built on the devices present (a user error:
    ``dpjax.main`` reports it in one line)."""


def distributed_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one of several that must call ``jax.distributed.initialize``.

    ``DPJAX_DISTRIBUTED`` decides when set (1/true/yes/on or 0/false/no/off). Otherwise a
    multi-process launch is detected from ``JAX_COORDINATOR_ADDRESS`` or from an ``srun``
    step with more than one task (``SLURM_STEP_NUM_TASKS`` > 1; a plain one-task SLURM
    array job is NOT distributed). Cloud TPU pods are not guessed: the launch script sets
    ``DPJAX_DISTRIBUTED=1`` (``jax.distributed.initialize`` then finds the TPU workers).
    """
    env = os.environ if env is None else env
    flag = env.get(DISTRIBUTED_ENV, "").strip().lower()
    if flag in _TRUE:
        return True
    if flag in _FALSE:
        return False
    if flag:
        raise ParallelConfigError(f"{DISTRIBUTED_ENV}={flag!r}: use 1 or 0.")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:
        return int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    except ValueError:
        return False


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` if requested and not done yet.

    Must run before any JAX computation of the process (``train.setup`` calls it first).
    The coordinator, process count and id come from the environment: SLURM (``srun``) and
    Cloud TPU VMs are detected by JAX; a hand-made launch sets JAX_COORDINATOR_ADDRESS
    (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns whether the
    process runs distributed.
    """
    if jax.distributed.is_initialized():
        return True
    if not distributed_requested(env):
        return False
    env = os.environ if env is None else env
    kwargs: dict[str, int] = {}
    # A hand-made launch (no SLURM/TPU to detect) names the process count and id.
    for name, key in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if env.get(key):
            try:
                kwargs[name] = int(env[key])
            except ValueError:
                raise ParallelConfigError(
                    f"{key}={env[key]!r} is not a whole number (the {name.replace('_', ' ')})."
                ) from None
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise ParallelConfigError(
            f"jax.distributed.initialize() failed ({e}). It must run before any JAX "
            f"computation in the process; unset {DISTRIBUTED_ENV} for a one-process run."
        ) from e
    return True


def check_same_on_every_process(value: str, what: str) -> None:
    """Raises ParallelConfigError unless every process of the job holds the same
    ``value`` (a digest; at most 64 characters are compared). A no-op in one process.

    Every process gathers dataset rows by the same global indices (the module
    docstring), so a process whose copy of the data is in another order (another
    decoder version, a differently sorted folder, a partial copy) would put one example
    in a batch twice and another not at all: the sensitivity the accountant assumes
    would not hold."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    row = np.frombuffer(value.encode()[:64].ljust(64, b"\0"), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(row))
    differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ParallelConfigError(
            f"The {what} differs between processes (process 0 and {differ}): every process "
            "must read the same data in the same order. Point data.* at one shared copy."
        )


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is True on any process of the job (``flag`` itself in one
    process). A collective: every process must call it at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, plan files and reports."""
    return jax.process_index() == 0


def make_data_mesh(num_devices: int) -> Mesh | None:
    """A 1-D mesh with axis ``'data'`` over ``num_devices`` devices; None for one device.

    Args:
      num_devices: 0 for all devices of the job (every local device; in a multi-host run
        every device of every process), 1 for one device (the reference, non-sharded
        path: returns None), n for the first n devices.

    Raises:
      ParallelConfigError: more devices than present, or a multi-process run that does
        not use every device (each process must own part of the mesh).
    """
    devices = jax.devices()
    if num_devices < 0:
        raise ParallelConfigError(f"train.num_devices must be >= 0, got {num_devices}.")
    n = len(devices) if num_devices == 0 else num_devices
    if n > len(devices):
        raise ParallelConfigError(
            f"train.num_devices={num_devices} but only {len(devices)} devices are visible "
            f"({devices[0].platform}). Use 0 for all of them."
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ParallelConfigError(
            f"A {jax.process_count()}-process run must use all {len(devices)} devices; set "
            "train.num_devices=0."
        )
    if n == 1:
        return None
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def num_shards(mesh: Mesh | None) -> int:
    """Devices along 'data' (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[DATA_AXIS])


def deal_batch(batch: PaddedBatch, shards: int) -> PaddedBatch:
    """The batch's rows rearranged into ``shards`` equal slices, real rows first in each.

    Real row j goes to slice j % shards, position j // shards (round-robin), so slice
    loads differ by at most one; every slice is padded with -1 to P / shards rows.

    Raises:
      ValueError: if the padded size P is not a multiple of ``shards``.
    """
    size = batch.indices.shape[0]
    if size % shards:
        raise ValueError(f"Padded batch {size} is not a multiple of {shards} shards.")
    per = size // shards
    n = batch.num_real
    out = np.full((shards, per), -1, np.int32)
    j = np.arange(n)
    out[j % shards, j // shards] = batch.indices[:n]
    indices = out.reshape(-1)
    return PaddedBatch(indices, indices >= 0, n)


def _global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a host value every process holds in full."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf of ``tree`` as a global array replicated over ``mesh`` (typed keys too)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(lambda x: _global(x, sharding), tree)


def shard_batch(batch: PaddedBatch, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """(indices, mask) dealt over the mesh's devices and sharded along 'data'.

    Every process passes the same (full) batch; each provides its devices' slices.
    """
    dealt = deal_batch(batch, num_shards(mesh))
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return _global(dealt.indices, sharding), _global(dealt.mask, sharding)


def local_copy(tree: PyTree) -> PyTree:
    """Each (replicated) leaf as this process's copy on its first local device.

    For work one process does alone (process 0 drawing the sample grid), which must not
    involve other processes' devices. Only meaningful for replicated arrays.
    """
    return jax.tree_util.tree_map(
        lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree
    )
