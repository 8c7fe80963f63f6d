"""How the train loop advances one step, for each kind of privacy plan.

* ``dpsgd_advance``: one DP-SGD step on the Poisson batch of step t (``dp_step.py``).
* ``release_once`` then ``public_advance``: a one-release plan (DP-MEPF) makes its
  release once, checks it against the calibrated plan and checkpoints it at step 0;
  every later step is post-processing of that release and takes no data argument.
Each ``advance(state, t)`` returns (new state, host metrics, the name of the loss
metric), so the loop in ``train.py`` does not depend on the mechanism.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import checkpoint as ckpt_lib
from dpjax import parallel
from dpjax.methods.base import Params
from dpjax.optim import make_optimizer
from dpjax.privacy import report as report_lib
from dpjax.privacy.accounting import PrivacyError
from dpjax.privacy.dp_step import make_train_step
from dpjax.privacy.sampling import PoissonSampler
from dpjax.public_step import make_public_step
from dpjax.run_records import save_checkpoint
from dpjax.run_setup import Run, release_done
from dpjax.state import TrainState


def dpsgd_advance(run: Run, dataset: Any):
    """``advance(state, t) -> (state, host metrics, loss metric name)``: DP-SGD step t."""
    cfg, plan, mesh = run.config, run.plan, run.mesh
    sampler = PoissonSampler(
        plan.num_examples,
        plan.sampling_rate,
        seed=run.sampler_seed,
        # Padded sizes split into equal per-device parts of whole micro-batches; the
        # batch itself depends on (the sampler's seed, step) only.
        multiple=cfg.dp.microbatch_size * parallel.num_shards(mesh),
    )
    step_fn = make_train_step(
        run.method,
        run.method.optimizer(make_optimizer(cfg.optim)),
        plan,
        microbatch_size=cfg.dp.microbatch_size,
        ema_rate=cfg.train.ema_rate,
        ema_warmup=cfg.train.ema_warmup,
        clipping_impl=cfg.dp.clipping,
        mesh=mesh,
        compute_dtype=cfg.dp.compute_dtype,
        microbatch_loop=cfg.dp.microbatch_loop,
    )
    if mesh is None:
        images = jnp.asarray(dataset.images)
        labels = jnp.asarray(dataset.labels)
        streams = run.streams
    else:
        images, labels, streams = parallel.replicate(
            (np.asarray(dataset.images), np.asarray(dataset.labels), run.streams), mesh
        )

    def advance(state: TrainState, t: int):
        batch = sampler.batch(t)
        if mesh is None:
            indices, mask = batch.indices, batch.mask
        else:
            indices, mask = parallel.shard_batch(batch, mesh)
        state, metrics = step_fn(state, images, labels, indices, mask, batch.num_real, streams)
        return state, jax.device_get(metrics), "private_loss_nonprivate"

    return advance


def public_advance(run: Run):
    """``advance`` for the post-processing steps after a one-shot release (no data)."""
    cfg = run.config
    step_fn = make_public_step(
        run.method,
        run.method.optimizer(make_optimizer(cfg.optim)),
        ema_rate=cfg.train.ema_rate,
        ema_warmup=cfg.train.ema_warmup,
    )

    def advance(state: TrainState, t: int):
        del t  # The state's step selects the keys.
        state, metrics = step_fn(state, run.streams)
        return state, jax.device_get(metrics), "public_loss"

    return advance


def release_once(run: Run, state: TrainState, dataset: Any, log) -> TrainState:
    """Performs the method's one release (if not done yet) and checkpoints it at step 0.

    The released values replace ``frozen['release']``; the release's records join the
    run's accounting. The checkpoint written here is what every later step (and every
    resume) starts from, so the private data is read exactly once.
    """
    if release_done(run.releases):
        return state
    if int(state.step) != 0:
        raise ckpt_lib.CheckpointError(
            f"Step {int(state.step)} was checkpointed without the release; use a new workdir."
        )
    key = jax.random.fold_in(run.streams.noise, 0)  # A release plan runs no DP-SGD step.
    images, labels = jnp.asarray(dataset.images), jnp.asarray(dataset.labels)
    release = run.method.private_release(
        Params(state.trainable, state.frozen), images, labels, key, run.plan
    )
    if run.plan.enabled:  # The release must be exactly what the plan calibrated.
        planned = [e.noise_multiplier for e in run.method.release_events(run.plan.noise_multiplier)]
        made = [r.get("noise_multiplier") for r in release.records if r.get("kind") == "gaussian"]
        # The counts first: np.allclose broadcasts ([] or [s, s] against [s] passes).
        if (len(made) != len(release.records) or len(made) != len(planned)
                or not np.allclose(made, planned, rtol=1e-12)):
            raise PrivacyError(
                f"The release's records {release.records} do not match the planned Gaussian "
                f"mechanisms (noise multipliers {planned}); nothing was saved."
            )
    if not all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(release.values)):
        # Post-processing of the noisy values: refusing costs no privacy, and a NaN release
        # must not become the checkpoint every later step starts from.
        raise PrivacyError("The release holds non-finite values; nothing was saved.")
    placeholder = jax.tree_util.tree_structure(state.frozen["release"])
    got = jax.tree_util.tree_structure(release.values)
    if got != placeholder:
        raise ValueError(f"The release's structure {got} is not the placeholder's {placeholder}.")
    frozen = {**state.frozen, "release": release.values}
    state = TrainState(state.step, state.trainable, frozen, state.opt_state, state.ema)
    run.releases.extend({**r, "stage": "release"} for r in release.records)
    save_checkpoint(run, state)
    eps = report_lib.epsilon_spent(run.plan, 0, run.releases, (run.plan.accountant,))
    log(
        f"[dpjax] released once ({len(release.records)} Gaussian mechanism(s)); epsilon "
        f"{report_lib.format_epsilon(float(eps[run.plan.accountant]))} ({run.plan.accountant}); "
        "from here on the private "
        "data is not read"
    )
    return state
