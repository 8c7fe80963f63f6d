"""The public pieces a latent diffusion run starts from, and the checks that they are public.

DP-LDM and DP-LoRA (``ldm.py``) build on a KL autoencoder, a latent scale factor and,
for the private fine-tune, a pre-trained latent diffusion model. This module loads them
and guarantees:

* every workdir they come from holds a run trained with ``dp.enabled=False``
  (``require_public_run``), i.e. on public data by the premise of the pipeline;
* the latent scale factor (LDM's ``scale_by_std``, a statistic of data and so a release
  if that data were private; method_details.md, Pitfall 6) is measured only on the
  autoencoder run's own public training data (``measure_scale_factor``), inherited from
  ``init_from``, or a configured public constant; never measured on the data of the
  run being trained.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from dpjax.methods import autoencoder, base

if TYPE_CHECKING:  # ldm imports this module.
    from dpjax.methods import ldm

#: Key of the frozen autoencoder weights in ``Params.frozen``.
AUTOENCODER = "autoencoder"
#: Key of the latent scale factor (a float32 scalar) in ``Params.frozen``.
SCALE_FACTOR = "scale_factor"


@dataclasses.dataclass(frozen=True)
class PublicPieces:
    """The public pieces a run starts from (all public, never trained on private data)."""

    autoencoder: autoencoder.Autoencoder
    ae_weights: dict  # NumPy
    ae_workdir: str  # '' for an untrained autoencoder
    scale_factor: float  # NaN: a placeholder, restored from a checkpoint
    unet: dict | None = None  # the public LDM's EMA UNet (NumPy), with init_from
    source: Any = None  # the public LDM method, with init_from


_SCALE_CACHE: dict[tuple[str, int, int, str], float] = {}


def require_public_run(workdir: str, what: str) -> None:
    """Raises unless ``workdir`` holds a run trained with ``dp.enabled=False``."""
    from dpjax.privacy import plan as plan_lib

    path = os.path.join(workdir, "dp_plan.json")
    if not os.path.exists(path):
        raise ValueError(f"{what}={workdir!r} holds no dpjax run (no dp_plan.json).")
    if plan_lib.load_plan(path)[0].enabled:
        raise ValueError(
            f"{what}={workdir!r} was trained with DP (dp.enabled=True), i.e. on private "
            "data. The autoencoder, the scale factor and the pre-trained LDM must come from "
            "PUBLIC data, trained with dp.enabled=False; nothing here accounts for a "
            "release of other private data."
        )


def load_public_pieces(
    config: ldm.Config, spec: base.DataSpec, measure_scale: bool
) -> PublicPieces:
    """The autoencoder, its weights, the scale factor and (with init_from) the public UNet.

    The scale factor is measured (``measure_scale_factor``) only for a new run of a
    public autoencoder without ``init_from`` or a configured constant, and only when
    ``measure_scale``; otherwise it is NaN, a placeholder for the checkpoint's value.
    """
    from dpjax import sample as sample_lib  # Deferred: sample imports the method registry.

    if config.init_from:
        require_public_run(config.init_from, "init_from")
        # Restored through ``make_restored``: its scale factor comes from its checkpoint.
        source, params, source_spec, _, _ = sample_lib.load_trained(config.init_from)
        if source.name != "ldm":
            raise ValueError(
                f"init_from={config.init_from!r} holds a {type(source).__name__} run, not 'ldm'."
            )
        if source_spec.image_shape != spec.image_shape:
            raise ValueError(
                f"init_from={config.init_from!r} was trained on {source_spec.image_shape} "
                f"images, this data is {spec.image_shape}."
            )
        src = source.config
        if config.autoencoder_from and not _same_path(
            config.autoencoder_from, src.autoencoder_from
        ):
            raise ValueError(
                f"autoencoder_from={config.autoencoder_from!r} is not the autoencoder of "
                f"init_from ({src.autoencoder_from!r}); leave it empty to use that one."
            )
        if config.untrained_autoencoder not in (None, src.untrained_autoencoder):
            raise ValueError("untrained_autoencoder differs from init_from's.")
        scale = float(params.frozen[SCALE_FACTOR])
        if config.scale_factor and not math.isclose(config.scale_factor, scale, rel_tol=1e-6):
            raise ValueError(
                f"scale_factor={config.scale_factor} differs from init_from's {scale}; the "
                "public model was trained on latents of that scale (leave it 0 to inherit)."
            )
        unet, adapters = source.weights(params.trainable, params.frozen)
        if adapters is not None:
            raise ValueError(f"init_from={config.init_from!r} has LoRA adapters; merge them first.")
        to_np = lambda t: jax.tree_util.tree_map(np.asarray, t)
        return PublicPieces(
            source.autoencoder,
            to_np(params.frozen[AUTOENCODER]),
            source.public.ae_workdir,
            scale,
            unet=to_np(unet),
            source=source,
        )
    if config.untrained_autoencoder is not None:
        ae = autoencoder.make(config.untrained_autoencoder, spec)
        if not config.scale_factor:
            raise ValueError(
                "An untrained autoencoder has no public data to measure the latent scale "
                "on: set scale_factor > 0."
            )
        weights = ae.random_weights(np.random.default_rng(0))
        return PublicPieces(ae, weights, "", config.scale_factor)
    workdir = config.autoencoder_from
    if not workdir:
        raise ValueError(
            "The latent diffusion method needs its public autoencoder: set "
            "method_args.autoencoder_from to the workdir of an 'autoencoder' run trained with "
            "dp.enabled=False (experiments/ae_mnist.py), or init_from to a public LDM run."
        )
    require_public_run(workdir, "autoencoder_from")
    ae, params, ae_spec, ae_cfg, step = sample_lib.load_trained(workdir)
    if not isinstance(ae, autoencoder.Autoencoder):
        raise ValueError(
            f"autoencoder_from={workdir!r} holds a {type(ae).__name__}, not an autoencoder."
        )
    if ae_spec.image_shape != spec.image_shape:
        raise ValueError(
            f"The autoencoder in {workdir!r} is for {ae_spec.image_shape} images, this data "
            f"is {spec.image_shape}."
        )
    weights = jax.tree_util.tree_map(np.asarray, params.trainable)
    scale = config.scale_factor
    if not scale:
        scale = math.nan  # A placeholder: the checkpoint being restored holds the value.
        if measure_scale:
            scale = measure_scale_factor(ae, weights, workdir, ae_cfg.data, step, config)
    return PublicPieces(ae, weights, workdir, scale)


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def measure_scale_factor(
    ae: autoencoder.Autoencoder,
    weights: base.PyTree,
    workdir: str,
    data_config: Any,
    step: int,
    config: ldm.Config,
) -> float:
    """1 / std of the latents of the first ``config.scale_examples`` PUBLIC examples.

    LDM's ``scale_by_std`` (Rombach et al. 2022; ddpm.py ``on_train_batch_start``)
    measured on the autoencoder run's own training data, which is public (its run has DP
    off, checked by the caller), never on the data of the run being trained. The value
    depends only on that data, the autoencoder and the config, and is cached per process.

    Raises:
      ValueError: the latents have a zero or non-finite standard deviation.
    """
    from dpjax import data as data_lib

    n = config.scale_examples
    cache_key = (os.path.realpath(workdir), int(step), n, config.latent)
    if cache_key in _SCALE_CACHE:
        return _SCALE_CACHE[cache_key]
    limit = min(n, data_config.limit) if data_config.limit else n
    dataset = data_lib.load(dataclasses.replace(data_config, limit=limit))
    sample_posterior = config.latent == "sample"
    z = ae.latents(weights, np.asarray(dataset.images), jax.random.key(0), sample_posterior)
    std = float(np.std(z))
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"The latents of {workdir!r}'s data have std {std}; no scale factor.")
    _SCALE_CACHE[cache_key] = 1.0 / std
    return 1.0 / std
