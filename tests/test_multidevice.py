"""Data parallelism: the sharded DP step equals the one-device step; resume across devices.

Needs >= 4 devices: the Makefile (and .ci) set XLA_FLAGS=--xla_force_host_platform_device_count=4
so that a CPU shows 4.
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import parallel, train
from dpjax.methods import toy
from dpjax.methods.base import DataSpec
from dpjax.privacy import noise
from dpjax.privacy.dp_step import DATA_AXIS, make_train_step
from dpjax.privacy.plan import DPPlan
from dpjax.privacy.sampling import PaddedBatch, PoissonSampler
from dpjax.randomness import Streams
from dpjax.state import TrainState
from tests.test_train_loop import _config

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason="needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, N, Q, M = 0.5, 48, 0.25, 4
SPEC = DataSpec((4, 4, 1), 3)


def _flat(tree):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(tree)])


def _setup(sigma):
    method = toy.make(toy.Config(noise_multiplicity=2, input_noise=0.3), SPEC)
    plan = DPPlan(
        num_examples=N, sampling_rate=Q, noise_multiplier=sigma, clip_norm=C, steps=10, delta=1e-5
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, 4, 4, 1)).astype(np.uint8)
    labels = rng.integers(0, 3, size=N).astype(np.int32)
    p = method.init(jax.random.key(0), SPEC)
    # Large random parameters: gradients above and below C, so clipping matters.
    tr = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * 2, x.dtype), p.trainable
    )
    return method, plan, images, labels, tr


def _mesh():
    mesh = parallel.make_data_mesh(4)
    assert mesh is not None and mesh.shape[DATA_AXIS] == 4
    return mesh


# SGD with momentum: the first update is exactly -LR * gradient, later ones use opt_state.
LR = 0.5
OPT = optax.sgd(LR, momentum=0.9)


@functools.cache
def _step(sigma, sharded):
    """One compiled step per (sigma, layout), shared by the tests (compiles are slow)."""
    method, plan, _, _, _ = _setup(sigma)
    mesh = _mesh() if sharded else None
    return make_train_step(method, OPT, plan, microbatch_size=M, ema_rate=0.9, mesh=mesh)


def _initial(sigma, mesh):
    _, _, images, labels, tr = _setup(sigma)
    init = (TrainState.create(tr, {}, OPT.init(tr)), images, labels, Streams.from_seed(0))
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, init)
    return parallel.replicate(init, mesh)


def _run(sigma, sharded, batches):
    """Runs the step over ``batches`` on one device or (dealt) on 4."""
    mesh = _mesh() if sharded else None
    state, imgs, labs, streams = _initial(sigma, mesh)
    step = _step(sigma, sharded)
    metrics = []
    for b in batches:
        if mesh is None:
            idx, mask = b.indices, b.mask
        else:
            idx, mask = parallel.shard_batch(b, mesh)
        state, m = step(state, imgs, labs, idx, mask, b.num_real, streams)
        metrics.append(jax.device_get(m))
    return state, metrics


def _batches(multiple, steps=3):
    sampler = PoissonSampler(N, Q, seed=5, multiple=multiple)
    return [sampler.batch(t) for t in range(steps)]


@pytest.mark.parametrize("sigma", [0.0, 3.0])
def test_sharded_step_equals_one_device_step(sigma):
    # The sampler's multiple accounts for the devices; the Poisson batch itself does not
    # depend on it (same indices), only its padding does.
    for a, b in zip(_batches(M), _batches(4 * M)):
        np.testing.assert_array_equal(a.indices[: a.num_real], b.indices[: b.num_real])
        assert b.indices.shape[0] % (4 * M) == 0
    # Both runs get the 4*M-padded batch (extra padding is a no-op on one device; one
    # shape means one compile).
    four = _batches(4 * M)
    ref, ref_m = _run(sigma, False, four)
    out, out_m = _run(sigma, True, four)
    assert any(0 < float(m["frac_clipped"]) < 1 for m in ref_m), "clipping must matter"
    for name in ("trainable", "ema", "opt_state"):
        np.testing.assert_allclose(
            _flat(getattr(out, name)), _flat(getattr(ref, name)), rtol=2e-5, atol=2e-6
        )
    assert int(out.step) == 3
    for a, b in zip(ref_m, out_m):
        assert int(a["batch_size"]) == int(b["batch_size"])
        assert float(a["frac_clipped"]) == pytest.approx(float(b["frac_clipped"]))
        for k in ("grad_norm_median", "grad_norm_p90", "private_loss_nonprivate"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-5), k
    # The state stays replicated on the mesh (what checkpoints save).
    leaf = jax.tree_util.tree_leaves(out.trainable)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4


@pytest.mark.parametrize("loop", ["loop", "unroll"])
def test_the_sharded_step_equals_one_device_with_micro_batches_looped_or_unrolled(loop):
    """On a GPU the micro-batch loop is a fori_loop that stops after each DEVICE's last
    real row (its ``num_local``); the CPU default unrolls it and ignores that count, so
    the test above never ran the GPU's path (replay audit, 2026-12-07: a count clamped to
    one micro-batch dropped every later real row and the suite passed)."""
    batches = _batches(4 * M)
    out = {}
    for mesh in (None, _mesh()):
        method, plan, _, _, _ = _setup(3.0)
        # 2 rows per micro-batch: 2 to 4 per device, some all padding.
        step = make_train_step(method, OPT, plan, microbatch_size=2, ema_rate=0.9,
                               mesh=mesh, microbatch_loop=loop)
        state, imgs, labs, streams = _initial(3.0, mesh)
        for b in batches:
            idx, mask = (b.indices, b.mask) if mesh is None else parallel.shard_batch(b, mesh)
            state, _ = step(state, imgs, labs, idx, mask, b.num_real, streams)
        out[mesh is None] = state
    ref, _ = _run(3.0, False, batches)  # Micro-batches of M, the default layout.
    for name in ("trainable", "ema", "opt_state"):
        for got in (out[False], out[True]):
            np.testing.assert_allclose(_flat(getattr(got, name)), _flat(getattr(ref, name)),
                                       rtol=2e-5, atol=2e-6)


def test_noise_is_drawn_once_per_step_not_per_device():
    """The first update is -LR * (clipped sum + noise) / (N q): update(sigma) - update(0)
    must be exactly -LR times ONE draw of N(0, (sigma C)^2) from fold_in(noise stream, 0)
    over N*q. Noise added per device (same key: 4x; different keys: other values)
    fails this."""
    sigma = 3.0
    batch = _batches(4 * M, steps=1)
    noisy, _ = _run(sigma, True, batch)
    clean, _ = _run(0.0, True, batch)
    _, plan, _, _, tr = _setup(sigma)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, tr)
    draw = noise.add_gaussian_noise(
        zeros, jax.random.fold_in(Streams.from_seed(0).noise, 0), sigma * C
    )
    expected = -LR * _flat(draw) / plan.expected_batch_size
    np.testing.assert_allclose(
        _flat(noisy.trainable) - _flat(clean.trainable), expected, rtol=1e-4, atol=1e-5
    )


def test_devices_without_real_examples_and_a_contiguous_split():
    """2 real rows on 4 devices (two devices all padding); and the un-dealt layout."""
    size = _batches(4 * M, steps=1)[0].indices.shape[0]
    idx = np.full(size, -1, np.int32)
    idx[:2] = [7, 30]
    tiny = PaddedBatch(idx, idx >= 0, 2)
    ref, _ = _run(3.0, False, [tiny])
    out, _ = _run(3.0, True, [tiny])
    np.testing.assert_allclose(_flat(out.trainable), _flat(ref.trainable), rtol=1e-5, atol=1e-6)
    # A contiguous split of a real-rows-first batch also keeps real rows first per slice.
    batch = _batches(4 * M, steps=1)[0]
    mesh = _mesh()
    state, imgs, labs, streams = _initial(3.0, mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
    put = lambda x: jax.device_put(x, sharding)  # noqa: E731
    step = _step(3.0, True)
    out, _ = step(state, imgs, labs, put(batch.indices), put(batch.mask), batch.num_real, streams)
    ref, _ = _run(3.0, False, [batch])
    np.testing.assert_allclose(_flat(out.trainable), _flat(ref.trainable), rtol=1e-5, atol=1e-6)


def test_deal_batch_keeps_the_batch_and_puts_real_rows_first():
    sampler = PoissonSampler(500, 0.1, seed=1, multiple=4 * 8)
    for t in range(5):
        b = sampler.batch(t)
        d = parallel.deal_batch(b, 4)
        assert d.num_real == b.num_real and d.indices.shape == b.indices.shape
        assert sorted(d.indices[d.mask].tolist()) == sorted(b.indices[: b.num_real].tolist())
        counts = []
        for part, mask in zip(np.split(d.indices, 4), np.split(d.mask, 4)):
            k = int(mask.sum())
            assert mask[:k].all() and not mask[k:].any() and (part[k:] == -1).all()
            counts.append(k)
        assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="multiple"):
        parallel.deal_batch(PaddedBatch(np.zeros(6, np.int32), np.ones(6, bool), 6), 4)


def test_mesh_config():
    assert parallel.make_data_mesh(1) is None
    assert parallel.make_data_mesh(0).size == jax.device_count()
    with pytest.raises(parallel.ParallelConfigError, match="only"):
        parallel.make_data_mesh(jax.device_count() + 1)
    assert not parallel.distributed_requested({})
    assert not parallel.distributed_requested({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})
    assert parallel.distributed_requested({"SLURM_STEP_NUM_TASKS": "4"})
    assert parallel.distributed_requested({"JAX_COORDINATOR_ADDRESS": "h:1234"})
    assert parallel.distributed_requested({"DPJAX_DISTRIBUTED": "1"})
    assert not parallel.distributed_requested(
        {"DPJAX_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "h:1234"}
    )
    # A mistyped process count is one clear line, before jax.distributed is touched.
    typo = {"DPJAX_DISTRIBUTED": "1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}
    with pytest.raises(parallel.ParallelConfigError, match="JAX_NUM_PROCESSES='two'"):
        parallel.initialize_distributed(typo)


def test_processes_with_differently_ordered_data_are_refused(monkeypatch):
    """Rows are gathered by global indices on every process: a process whose data is in
    another order would put one example in a batch twice (review of 2026-12-06). The
    real two-process run (below) passes the same check with equal digests."""
    from jax.experimental import multihost_utils

    parallel.check_same_on_every_process("abc", "dataset")  # One process: nothing to do.
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    gathered = {"rows": None}

    def allgather(row):
        other = np.frombuffer(b"abd".ljust(64, b"\0"), np.uint8)
        gathered["rows"] = np.stack([row, row, other])
        return gathered["rows"]

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    with pytest.raises(parallel.ParallelConfigError, match=r"process 0 and \[2\]"):
        parallel.check_same_on_every_process("abc", "dataset")
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda row: np.stack([row] * 3))
    parallel.check_same_on_every_process("abc", "dataset")


def _state_leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.as_dict())]


def test_checkpoints_restore_across_device_counts(tmp_path, same_noise_secret):
    """4 -> 1 and 1 -> 4 devices mid-run end where a 1-device run ends (float tolerance)."""
    quiet = lambda *_: None  # noqa: E731
    over = {"train.ckpt_every": 2, "train.grid_samples": 0, "train.log_every": 2}
    over["dp.noise_multiplier"] = 2.0  # Quicker accounting than sigma=1.

    def run(wd, devices, half=False):
        extra = {"train.num_devices": devices, "train.max_steps_per_run": 2 if half else 0}
        return train.train(_config(steps=4, **over, **extra), str(tmp_path / wd), log=quiet)

    assert int(run("ref", 1, half=True).step) == 2
    shutil.copytree(tmp_path / "ref", tmp_path / "1to4")
    ref = run("ref", 1)
    assert int(run("4to1", 4, half=True).step) == 2
    for wd, devices in (("4to1", 1), ("1to4", 4)):
        out = run(wd, devices)
        assert int(out.step) == 4
        leaf = jax.tree_util.tree_leaves(out.trainable)[0]
        assert len(leaf.sharding.device_set) == devices
        for x, y in zip(_state_leaves(ref), _state_leaves(out), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # A 4-device checkpoint restores in a process that has ONE device (sampling, eval).
    code = (
        "import jax, sys; from dpjax import sample; assert jax.device_count() == 1;"
        "_, s, _, _ = sample.restore_state(sys.argv[1], 2); print(int(s.step))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "4to1")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr[-2000:]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_device(tmp_path):
    """Multi-host on one machine: 2 processes x 2 CPU devices, jax.distributed through
    DPJAX_DISTRIBUTED=1; the same final state as a 1-device run, one metrics log."""
    flags = ["--config=experiments/toy_fake.py:steps=4", "--config.train.progress=False",
             "--config.train.ckpt_every=2", "--config.train.grid_samples=0",
             "--config.train.log_every=1"]  # fmt: skip
    base = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(base, DPJAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")  # fmt: skip
        cmd = [sys.executable, "-m", "dpjax.main", f"--workdir={tmp_path / 'mp'}", *flags,
               "--config.train.num_devices=0"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "data parallel over 4 devices (2 process(es))" in outs[0]
    env = dict(base, XLA_FLAGS="")
    # The one-device run replays the two-process run's noise secret (placed in its new
    # workdir), so the default secret path is compared, not the seed-derived one.
    (tmp_path / "one").mkdir()
    shutil.copy(tmp_path / "mp" / "noise_secret.json", tmp_path / "one")
    ref = subprocess.run(
        [sys.executable, "-m", "dpjax.main", f"--workdir={tmp_path / 'one'}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    from dpjax import metrics_log, sample

    a, b = (
        sample.restore_state(str(tmp_path / "mp"))[1],
        sample.restore_state(str(tmp_path / "one"))[1],
    )
    for x, y in zip(_state_leaves(a), _state_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in metrics_log.read(str(tmp_path / "mp"))] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_sigterm_on_one_process_stops_every_process_at_one_checkpointed_step(tmp_path):
    """A preemption that reaches one host first: the processes agree after each step
    (``parallel.any_process``), so all stop after the same step and save it together
    (stopping alone would leave the others waiting in the collective save)."""
    import signal
    import time

    from dpjax import metrics_log

    flags = ["--config=experiments/toy_fake.py:steps=400", "--config.train.progress=False",
             "--config.train.ckpt_every=1000", "--config.train.grid_samples=0",
             "--config.train.log_every=1", "--config.train.num_devices=0"]  # fmt: skip
    base = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    port = _free_port()
    wd = tmp_path / "mp"
    procs = []
    for i in range(2):
        env = dict(base, DPJAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")  # fmt: skip
        cmd = [sys.executable, "-m", "dpjax.main", f"--workdir={wd}", *flags]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    deadline = time.time() + 400
    while time.time() < deadline and procs[0].poll() is None:
        if (wd / "metrics.jsonl").exists() and len(metrics_log.read(str(wd))) >= 3:
            break
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # The second host only.
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs
    step = json.loads((wd / "dp_plan.json").read_text())["steps_done"]
    assert 3 <= step < 400
    assert f"stopped at step {step} of 400" in outs[0] and f"stopped at step {step}" in outs[1]
    assert os.listdir(wd / "checkpoints") == [str(step)]
