"""DP-LDM and DP-LoRA: a public latent diffusion model, DP fine-tuned on private data.

DP-LDM (Lyu, Jiang, Vinaroz, Liu, Park; TMLR 2024) and DP-LoRA (Tsai et al., ICCV 2025)
share one pipeline (method_details.md Secs. 2 and 3):

1. a KL autoencoder trained on PUBLIC data (``methods/autoencoder.py``, DP off);
2. a latent diffusion model trained on PUBLIC latents (this method, ``dp.enabled=False``);
3. DP-SGD fine-tuning of a small part of it on PRIVATE data (this method with
   ``init_from`` = the workdir of step 2): DP-LDM trains the attention, cross-attention
   and class-embedding layers (``trainable``), DP-LoRA only low-rank adapters
   (``lora_rank`` > 0, plus the class embedder for conditional data).

All three stages are the same train loop. The diffusion is DPDM's (``dpdm.py``: EDM
preconditioning, noise multiplicity K averaged INSIDE the per-example loss so the
sensitivity stays C, classifier-free guidance, the samplers, ``init_from`` /
``trainable`` / LoRA), applied to latents ``z = scale_factor * mean(enc(x))`` of the
frozen encoder instead of pixels; ``sample`` decodes with the frozen decoder. The UNet
is DPDM's NCSN++ with cross-attention to a learned class embedding
(``ncsnpp.UNetConfig.cross_attention``), LDM's way of conditioning on classes.

Privacy guarantees (beyond those of the DP step):

* The autoencoder and the scale factor are public: the autoencoder run and the public
  LDM run must have ``dp.enabled=False`` (checked from their ``dp_plan.json``; their data
  is public by the premise of the pipeline, so a run trained WITH DP on some data is
  refused, since its data would be private and nothing here accounts for it).
* The latent scale factor 1 / std(latents) (LDM's ``scale_by_std``) is a statistic of
  data, hence a release if that data is private (method_details.md, Pitfall 6). It is
  measured here only on the autoencoder run's own (public) training data, never on the
  data of the run being trained, stored in the checkpoint as ``frozen['scale_factor']``
  and inherited unchanged by the private fine-tune from ``init_from``. A positive
  ``scale_factor`` in the config is a fixed public constant instead.
* The frozen encoder sees each private example only inside that example's loss, as a
  fixed public function: the clipping unit stays the example.

Departures from the papers' code: EDM preconditioning and samplers on latents instead of
DDPM eps-prediction with a linear beta schedule and DDIM-200; DDPM++ residual and
attention blocks with an added cross-attention block instead of openaimodel's
SpatialTransformer (no feed-forward layer inside the transformer block); the autoencoder
is trained without LPIPS and discriminator losses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import typed_config
from dpjax.methods import autoencoder, base, dpdm, ldm_public
from dpjax.methods.ldm_public import AUTOENCODER, SCALE_FACTOR, measure_scale_factor
from dpjax.models import ncsnpp
from dpjax.privacy import provenance

__all__ = [
    "AUTOENCODER",
    "SCALE_FACTOR",
    "Config",
    "LDM",
    "make",
    "make_restored",
    "measure_scale_factor",
    "resolve_unet",
]


@dataclasses.dataclass(frozen=True)
class Config(dpdm.Config):
    """Latent diffusion settings: DPDM's (``dpdm.Config``) on latents, plus the following.

    Defaults that differ from DPDM: ``unet='custom'`` (no DPDM preset is for latents),
    ``sigma_data=1`` (the latents are scaled to unit standard deviation), K = 1 (DP-LDM
    draws one timestep per example; DP-LoRA uses K = 4 to 12).

    Attributes:
      autoencoder_from: the workdir of an 'autoencoder' run on PUBLIC data
        (``dp.enabled=False``). Not needed with ``init_from`` (its autoencoder is used;
        if given, it must be the same workdir).
      untrained_autoencoder: for smoke tests only: instead of ``autoencoder_from``, a
        randomly initialised autoencoder of these settings (NumPy seed 0); its latents
        are meaningless and it has no data to measure a scale on (set ``scale_factor``).
      latent: 'mean' (the encoder's mean, deterministic) or 'sample' (a draw of q(z|x)
        per example, as LDM's ``get_first_stage_encoding``).
      scale_factor: the latent scale. 0 = inherit it from ``init_from``, or, without
        ``init_from``, measure 1 / std of the latents of the first ``scale_examples``
        examples of the autoencoder run's public training data (LDM's scale_by_std,
        on public data only). > 0 = this fixed public value (with ``init_from`` it must
        equal the inherited one).
      scale_examples: public examples the scale is measured on (LDM: one batch).
      cross_attention: condition on labels by cross-attention to a learned class
        embedding ``class_embed`` (LDM's ClassEmbedder + SpatialTransformer); ignored for
        unconditional data. False conditions through DPDM's ``label_embed`` instead.
      context_dim, context_tokens, cross_attention_heads: see ``ncsnpp.UNetConfig``.
      unet_classes: rows of the class embedding (minus the null class); 0 = the data's
        number of classes. A private fine-tune whose public model has more classes sets
        the public count (DP-LDM fine-tunes ImageNet's 1000-class embedder on CIFAR-10's
        labels 0-9, EMNIST letters' 26-class one on MNIST's).
    """

    unet: str = "custom"
    sigma_data: float = 1.0
    noise_multiplicity: int = 1
    autoencoder_from: str = ""
    untrained_autoencoder: autoencoder.Config | None = None
    latent: Literal["mean", "sample"] = "mean"
    scale_factor: float = 0.0
    scale_examples: int = 1000
    cross_attention: bool = True
    context_dim: int = 0
    context_tokens: int = 1
    cross_attention_heads: int = 1
    unet_classes: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent not in ("mean", "sample"):
            raise ValueError(f"latent must be 'mean' or 'sample', got '{self.latent}'.")
        if not (self.scale_factor >= 0 and math.isfinite(self.scale_factor)):
            raise ValueError(f"scale_factor must be finite and >= 0, got {self.scale_factor}.")
        if self.scale_examples < 2 or self.unet_classes < 0:
            raise ValueError("Need scale_examples >= 2 and unet_classes >= 0.")
        if self.autoencoder_from and self.untrained_autoencoder is not None:
            raise ValueError("Give autoencoder_from or untrained_autoencoder, not both.")


class LDM(dpdm.DPDM):
    """Latent diffusion: a DPDM on the latents of a frozen public KL autoencoder.

    ``self.spec`` is the LATENT spec (shape (H/f, W/f, z), the UNet's classes), on which
    the inherited DPDM machinery (loss, sampler, LoRA discovery) runs; ``self.image_spec``
    is the data's. ``init`` takes the data's spec; ``loss_per_example`` takes images and
    ``sample`` returns images in [-1, 1] of the data's shape.
    """

    name = "ldm"

    def __init__(self, config: Config, spec: base.DataSpec, measure_scale: bool = True,
                 public: ldm_public.PublicPieces | None = None) -> None:
        """``measure_scale=False`` (``make_restored``): the scale factor is a placeholder
        that the checkpoint being restored replaces, so it is not measured. ``public``
        (``make_released``): the public pieces as given, no source run is read."""
        # Not DPDM.__init__: the UNet's shape is the latent one, known from the autoencoder.
        self.config = config
        self.image_spec = spec
        self.public = public or ldm_public.load_public_pieces(config, spec, measure_scale)
        self.autoencoder = self.public.autoencoder
        classes = config.unet_classes or spec.num_classes
        if spec.num_classes > classes or (classes and not spec.num_classes):
            raise ValueError(
                f"unet_classes={config.unet_classes} does not fit data with "
                f"{spec.num_classes} classes (it must be 0 or >= the data's, and the data "
                "must have classes if the UNet has)."
            )
        self.spec = base.DataSpec(self.autoencoder.latent_shape, classes)
        self.unet_config = resolve_unet(config, self.spec)
        if self.public.source is not None and self.public.source.unet_config != self.unet_config:
            raise ValueError(
                f"init_from={config.init_from!r} has UNet {self.public.source.unet_config}, "
                f"but this config gives {self.unet_config}."
            )
        self._build_diffusion()
        self.pretrained = self.public.unet

    def source_runs(self) -> list[provenance.Source]:
        """The public autoencoder and ``init_from`` (both must be public: nothing composes them)."""
        c = self.config
        named = (("autoencoder_from", c.autoencoder_from), ("init_from", c.init_from))
        return [provenance.Source(what, wd) for what, wd in named if wd]

    @property
    def scale_factor(self) -> float:
        """The latent scale this method was built with (the checkpoint's is authoritative)."""
        return self.public.scale_factor

    def privacy_notes(self) -> list[str]:
        """Where the public pieces come from (written into the privacy report)."""
        c = self.config
        if c.autoencoder_from or not self.public.ae_workdir:
            ae = c.autoencoder_from or "an untrained autoencoder (smoke test)"
        else:
            # Inherited through init_from: named by that setting, which the export
            # redacts, not by its own path, which no setting of this run holds (the
            # release-boundary review found it in an exported report).
            ae = f"the autoencoder of the public model in {c.init_from}"
        if c.scale_factor:
            scale = f"the configured constant {c.scale_factor:g}"
        elif c.init_from:
            scale = f"inherited from {c.init_from}"
        else:
            scale = f"1/std of the latents of the first {c.scale_examples} examples of {ae}'s data"
        notes = [
            f"Latent diffusion: the frozen autoencoder ({ae}) and the latent scale factor "
            f"({scale}) come from runs with DP off on PUBLIC data; no statistic of this run's "
            "data is computed outside the DP-SGD steps accounted here."
        ]
        if c.init_from:
            notes.append(
                f"DP fine-tuning of the public latent diffusion model in {c.init_from} (DP off, "
                "public data): only the selected parameters / adapters are trained on the "
                "private data; the epsilon covers that training only."
            )
        return notes

    def release_record(self) -> dict[str, Any]:
        """The autoencoder's settings (its architecture; ``autoencoder_from`` or
        ``init_from``, which held it, are redacted from an export)."""
        return {"autoencoder": dataclasses.asdict(self.autoencoder.config)}

    def init(self, key: jax.Array, spec: base.DataSpec) -> base.Params:
        """DPDM's UNet parameters (fresh or ``init_from``'s, split by ``trainable``, LoRA),
        plus the frozen autoencoder and scale factor under ``frozen``."""
        if spec != self.image_spec:
            raise ValueError(f"LDM was built for {self.image_spec}, init was given {spec}.")
        params = super().init(key, self.spec)
        frozen = dict(params.frozen)
        frozen[AUTOENCODER] = jax.tree_util.tree_map(jnp.asarray, self.public.ae_weights)
        frozen[SCALE_FACTOR] = jnp.asarray(self.public.scale_factor, jnp.float32)
        return base.Params(trainable=params.trainable, frozen=frozen)

    def encode(self, frozen: base.PyTree, images: jax.Array, key: jax.Array) -> jax.Array:
        """Scaled latents ``scale_factor * z`` of images (N, H, W, C) in [-1, 1]; no gradient."""
        mean, logvar = self.autoencoder.encode(frozen[AUTOENCODER], images)
        z = mean
        if self.config.latent == "sample":
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return jax.lax.stop_gradient(frozen[SCALE_FACTOR] * z)

    def decode(self, frozen: base.PyTree, latents: jax.Array) -> jax.Array:
        """Images (not clipped) of scaled latents (N, H/f, W/f, z)."""
        return self.autoencoder.decode(frozen[AUTOENCODER], latents / frozen[SCALE_FACTOR])

    def loss_per_example(
        self, trainable: base.PyTree, frozen: base.PyTree, example: base.Example, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """DPDM's loss (the mean of K weighted denoising losses) of ONE example's latent.

        The image is encoded once by the frozen public encoder; the K noise draws are
        averaged inside, so the example stays the unit of clipping.
        """
        x = jnp.asarray(example["image"], jnp.float32)
        if x.shape != self.image_spec.image_shape:
            raise ValueError(
                f"Expected an image of shape {self.image_spec.image_shape}, got {x.shape}."
            )
        k_latent, k_diffusion = jax.random.split(key)
        z = self.encode(frozen, x[None], k_latent)[0]
        latent_example = {"image": z, "label": example["label"]}
        return super().loss_per_example(trainable, frozen, latent_example, k_diffusion)

    def _sample_batch(
        self,
        trainable: base.PyTree,
        frozen: base.PyTree,
        key: jax.Array,
        labels: jax.Array | None,
        batch: int,
    ) -> jax.Array:
        # DPDM's sampler on latents (not clipped: latents are not in [-1, 1]), then decode.
        latents = self.run_sampler(trainable, frozen, key, labels, batch)
        return jnp.clip(self.decode(frozen, latents), -1.0, 1.0)

    def sample_labelled(
        self, params: base.Params, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """DPDM's ``sample_labelled`` returning images (n, H, W, C) in [-1, 1]; labels
        drawn by default uniformly from the DATA's classes (the UNet may have more)."""
        if labels is None and self.conditional:
            # DPDM's own label key, which it leaves unused when given labels: the images'
            # key (the second half of the split) must not also draw the labels.
            label_key = jax.random.split(key)[0]
            labels = jax.random.randint(
                label_key, (n,), 0, self.image_spec.num_classes, jnp.int32)
        return super().sample_labelled(params, key, n, labels)


def resolve_unet(config: Config, latent_spec: base.DataSpec) -> ncsnpp.UNetConfig:
    """The UNet of ``config`` on latents of ``latent_spec``, with cross-attention settings.

    'custom' applies the overrides in one step (``dpdm.resolve_unet`` first builds the
    default 3-level UNet, which odd latent sizes such as 7x7 cannot have); a preset name
    goes through ``dpdm.resolve_unet``.
    """
    cross = {
        "cross_attention": config.cross_attention and latent_spec.num_classes > 0,
        "context_dim": config.context_dim,
        "context_tokens": config.context_tokens,
        "cross_attention_heads": config.cross_attention_heads,
    }
    if config.unet != "custom":
        return dataclasses.replace(dpdm.resolve_unet(config, latent_spec), **cross)
    height, _, channels = latent_spec.image_shape
    overrides = {
        f: getattr(config, f)
        for f in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")
        if getattr(config, f) is not None
    }
    return ncsnpp.UNetConfig(
        image_size=height,
        channels=channels,
        num_classes=latent_spec.num_classes,
        **overrides,
        **cross,
    )


def make(config: Config, spec: base.DataSpec) -> LDM:
    """Builds the latent diffusion method for images described by ``spec``."""
    return LDM(config, spec)


def make_released(config: Config, spec: base.DataSpec, record: dict) -> LDM:
    """The latent diffusion method rebuilt from an export (``dpjax.released``): the
    autoencoder from its settings in ``record`` (``LDM.release_record``) with random
    weights and a NaN scale factor, placeholders that the export's frozen parameters
    replace; no source run is read."""
    ae_config = typed_config.from_configdict(
        autoencoder.Config, record.get("autoencoder"), "model_config.json rebuild.autoencoder")
    ae = autoencoder.make(ae_config, spec)
    pieces = ldm_public.PublicPieces(ae, ae.random_weights(np.random.default_rng(0)), "",
                                     math.nan)
    return LDM(config, spec, measure_scale=False, public=pieces)


def make_restored(config: Config, spec: base.DataSpec) -> LDM:
    """The method of a run whose checkpoint (holding the scale factor) is restored into
    it: the scale is not measured, so sampling, eval and export of a trained run (or
    loading it as ``init_from``) never read the autoencoder run's data."""
    return LDM(config, spec, measure_scale=False)
