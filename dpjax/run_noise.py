"""Where a private run's DP noise and Poisson batches come from (``setup`` calls it).

``privacy/noise_secret.py`` keeps the secret; this module decides, for one run, whether it
draws a new one, reads its own back (a resume), or may use one already in its workdir
(a restart of the same run, or a secret placed on purpose), and puts the result into the
run's key streams and sampler seed. ``dp.secret_noise=False``, a run without DP and a
checkpoint from before the secret keep the seed-derived ones.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dpjax import checkpoint as ckpt_lib
from dpjax import run_config
from dpjax.privacy import noise_secret
from dpjax.randomness import Streams, sampler_seed
from dpjax.workdir_guard import LOCK_FILE


def secret_reuse(workdir: str, checkpointer: ckpt_lib.Checkpointer) -> str:
    """Why a run from step 0 may use the noise secret already in ``workdir``, or ''.

    Read before the run writes anything: a config.json means a run began here, and as
    setup refuses another config or other data where one is, this run replays it
    (``noise_secret.REUSE_RESTART``); a workdir holding nothing but the secret (and what
    setup itself made: the lock, an empty checkpoints folder, the compilation cache) had
    it placed there (``REUSE_PLACED``). Anything else (a workdir whose config.json and
    plan were deleted, with a previous run's logs left) gets a new secret.
    """
    if checkpointer.latest_step() is not None:
        return ""  # A resume: it reads the secret anyway.
    if os.path.exists(os.path.join(workdir, "config.json")):
        return noise_secret.REUSE_RESTART
    made_by_setup = {LOCK_FILE, "checkpoints", "xla_cache", noise_secret.SECRET_FILE}
    if set(os.listdir(workdir)) <= made_by_setup:
        return noise_secret.REUSE_PLACED
    return ""


def noise_randomness(
    cfg: run_config.RunConfig,
    workdir: str,
    streams: Streams,
    meta: dict[str, Any] | None,
    reuse: str = "",
    log=print,
    mechanism: str = "dpsgd",
) -> tuple[Streams, int, str, str]:
    """The streams with the run's noise and loss keys, the Poisson sampler's seed, and
    where the noise and batches, and the per-example loss draws, came from.

    A new private run (``meta`` None) takes a new secret unless ``dp.secret_noise`` is
    False, or keeps the one in its workdir where ``reuse`` (``secret_reuse``) says why,
    and draws its noise, batches and loss draws from it; a resumed one (``meta``: its
    restored checkpoint's) goes on with the sources it began with (a checkpoint without
    a record predates the secret, or secret loss draws: 'seed'), so that it replays an
    uninterrupted run and its records say where its randomness came from. ``mechanism``:
    the plan's ('release' draws no per-example loss draws under the guarantee).
    """
    if not cfg.dp.enabled:
        return streams, sampler_seed(cfg.seed), noise_secret.NONE, noise_secret.NONE
    if meta is None:
        source = noise_secret.SECRET if cfg.dp.secret_noise else noise_secret.SEED
        loss_source = source
    else:
        source = noise_secret.recorded_source(meta)
        loss_source = noise_secret.recorded_loss_source(meta)
    if source != noise_secret.SECRET:
        if cfg.dp.secret_noise:
            log("[dpjax] this run's checkpoint records noise and batches derived from "
                "config.seed, and it goes on so: export refuses it")
        return streams, sampler_seed(cfg.seed), noise_secret.SEED, noise_secret.SEED
    noise, batches = noise_secret.load_or_create(workdir, resuming=meta is not None,
                                                 reuse=reuse, log=log)
    streams = dataclasses.replace(streams, noise=noise_secret.noise_key(noise))
    if loss_source == noise_secret.SECRET:
        streams = dataclasses.replace(streams, loss=noise_secret.loss_key(noise))
    elif noise_secret.public_loss_draws_void(loss_source, mechanism):
        log("[dpjax] this run's checkpoint predates secret per-example loss draws: they "
            "stay derived from config.seed, so it replays the same run, and it has no "
            "guarantee to publish (export refuses it; privacy/noise_secret.py says why). "
            "Train it again in a new workdir.")
    return streams, batches, source, loss_source
