"""Config builders shared by the DP-LDM / DP-LoRA experiment files (``ldm_*.py``).

Each pair file describes one public -> private pair as a ``Pair`` and exposes its three
stages through one experiment argument, ``stage``:

* ``stage=ae``: the KL autoencoder on the PUBLIC data, DP off (``autoencoder`` method);
* ``stage=public``: the latent diffusion model on the PUBLIC data, DP off, on the
  latents of the autoencoder in workdir ``ae=...`` (its scale factor is measured on
  that autoencoder run's public data);
* ``stage=private`` (the default): DP fine-tuning on the PRIVATE data from the public
  LDM in workdir ``public=...`` (autoencoder and scale factor inherited), with
  ``variant=ldm`` (DP-LDM: attention, cross-attention and class-embedding layers) or
  ``variant=lora`` (DP-LoRA: low-rank adapters on the attention projections, plus the
  class embedder for conditional data).

With ``quick`` (pairs that define ``Pair.quick``) every stage uses the pair's CPU-sized
recipe: narrower networks, fewer steps, smaller private batches (each pair file states
its values and how far they are from the paper's).

With ``smoke`` every stage uses fake 8x8 data, tiny networks and 2 steps; the public and
private stages then use a randomly initialised autoencoder (``untrained_autoencoder``)
with scale factor 1 and no public checkpoint, so each stage runs on its own.

Departures from the original DP-LDM / DP-LoRA code shared by every pair (a review
against their configs, 2026-12-06; the pair files list their own), besides EDM
diffusion instead of DDPM and no LPIPS/GAN loss in the autoencoder:

* the class-conditional UNet drops labels with probability 0.1 (the DPDM UNet's
  classifier-free guidance); DP-LDM's ClassEmbedder has none;
* the private fine-tune's EMA rate is 0.999, LitEma's 0.9999;
* latents are the autoencoder's posterior mean (``ldm.Config.latent='mean'``), not a
  posterior sample, and the scale factor is always 1/std of the public latents;
* the KL autoencoder has one attention block, in the middle (the originals add
  attention at the low resolutions, e.g. 16 and 8);
* DP-LoRA: the ``attn`` target adapts the attention's output projections too (in the
  original, PEFT's ``to_out.Linear`` matches nothing, so only q, k, v are adapted),
  A is initialised with std 1/sqrt(d_in) (PEFT's 'gaussian': 1/r), LoRA biases are not
  trained (PEFT ``bias='lora_only'``), and the public class embedder is fine-tuned
  rather than re-initialised;
* the originals' learning-rate warm-up (LambdaLinearScheduler from 1e-6 over 10k
  Lightning steps, i.e. physical batches) is not set: give
  ``--config.optim.warmup_steps=N`` (logical steps; the pair files give N);
* sigma is calibrated with RDP (``dp.accountant``); the originals use Opacus' PRV
  accountant, whose sigma is 4-5% smaller at the same epsilon (CIFAR-10: 0.897 by RDP,
  0.857 by PLD): ``--config.dp.accountant=pld`` matches them.

Every stage, the public ones included, runs micro-batches of the stage's 'microbatch'
entry, else 16: enough for a small accelerator, slow on a large one. The argument
``microbatch=`` sets it (e.g. the batch itself for one micro-batch per step where it
fits; 0 chooses from the memory for the DP stages).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from dpjax.methods import autoencoder, ldm
from dpjax.typed_config import ConfigError, to_configdict
from experiments import common

STAGES = ("ae", "public", "private")
VARIANTS = ("ldm", "lora")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One public -> private pair and its recipe (values cited in each pair file).

    Attributes:
      name: the pair's name, used in default workdirs (runs/<name>_public, ...).
      ae_name: the name of the autoencoder run (pairs may share one).
      public_data, private_data: overrides of the ``data`` section.
      image_size: side of the (square) images, public and private, after the data
        section's resizing; channels: their channels.
      ae: the autoencoder settings; ae_train: its batch, steps and learning rate.
      unet: DPDM/LDM UNet settings (nf, ch_mult, num_res_blocks, attn_resolutions, ...).
      public_classes: the public data's number of classes (the UNet's class rows).
      public_train: batch, steps and learning rate of the public LDM.
      private_dp: DP settings of the fine-tune (eps, delta, clip, batch, epochs).
        Each stage's dict (ae_train, public_train, private_dp, ldm, lora) may also name
        its 'microbatch' size, used unless the experiment argument ``microbatch`` is given
        (default 16).
      ldm: DP-LDM's trainable patterns, learning rate and K (and optionally its own
        'batch', 'epochs', 'clip', 'ema' (the EMA rate, default 0.999; 0 for none),
        overriding ``private_dp``).
      lora: DP-LoRA's rank, targets, trainable patterns, learning rate and K (idem).
      quick: the CPU-sized variant (experiment argument ``quick``): for each field above
        whose value is a dict or an ``autoencoder.Config`` (``ae``), the entries that
        replace the full recipe's. Empty: the pair has no quick variant.
    """

    name: str
    ae_name: str
    public_data: dict[str, Any]
    private_data: dict[str, Any]
    image_size: int
    channels: int
    ae: autoencoder.Config
    ae_train: dict[str, Any]
    unet: dict[str, Any]
    public_classes: int
    public_train: dict[str, Any]
    private_dp: dict[str, Any]
    ldm: dict[str, Any]
    lora: dict[str, Any]
    quick: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def quick_pair(pair: Pair) -> Pair:
    """``pair`` with its ``quick`` overrides applied (a ConfigError if it has none)."""
    if not pair.quick:
        raise ConfigError(f"The pair {pair.name!r} has no quick (CPU-sized) variant.")
    changes: dict[str, Any] = {}
    for field, values in pair.quick.items():
        current = getattr(pair, field, None)
        if isinstance(current, autoencoder.Config):
            changes[field] = dataclasses.replace(current, **values)
        elif isinstance(current, dict):
            changes[field] = {**current, **values}
        else:
            raise ConfigError(f"Pair.quick cannot override {field!r} of pair {pair.name!r}.")
    return dataclasses.replace(pair, name=f"{pair.name}_quick", quick={}, **changes)


def args_for(pair: Pair, **extra: Any) -> dict[str, Any]:
    """The experiment arguments of a pair file (``extra`` adds pair-specific ones)."""
    return {
        "stage": "private",
        "variant": "ldm",
        "ae": f"runs/{pair.ae_name}",
        "public": f"runs/{pair.name}_public",
        "eps": float(pair.private_dp["eps"]),
        "microbatch": None,  # None: the stage's 'microbatch' entry, else 16.
        "quick": False,
        "smoke": False,
        **extra,
    }


def _stage_recipe(pair: Pair, stage: str, variant: str) -> dict[str, Any]:
    """The training entries of one stage (the variant's own entries over ``private_dp``)."""
    if stage == "ae":
        return pair.ae_train
    if stage == "public":
        return pair.public_train
    return {**pair.private_dp, **(pair.lora if variant == "lora" else pair.ldm)}


def _set(section: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    for k, v in values.items():
        section[k] = v


def get_config(pair: Pair, args: dict[str, Any]) -> ml_collections.ConfigDict:
    """The config of ``args['stage']`` for ``pair`` (see the module docstring)."""
    stage, variant = args["stage"], args["variant"]
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}.")
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    smoke = bool(args["smoke"])
    if args.get("quick"):
        pair = quick_pair(pair)
    if stage == "ae":
        c = _ae_config(pair, args)
    elif stage == "public":
        c = _public_config(pair, args)
    else:
        c = _private_config(pair, args)
    microbatch = args["microbatch"]
    if microbatch is None:
        microbatch = _stage_recipe(pair, stage, variant).get("microbatch", 16)
    c.dp.microbatch_size = int(microbatch)
    c.train.log_every = 50
    c.train.ckpt_every = 1000
    if smoke:
        _smoke(c, pair, stage)
    return common.finalize(c)


def _non_private(c: ml_collections.ConfigDict, train: dict[str, Any]) -> None:
    common.non_private_training(c, int(train["batch"]), int(train["steps"]), float(train["lr"]))


def _ae_config(pair: Pair, args: dict[str, Any]) -> ml_collections.ConfigDict:
    c = common.base_config("autoencoder", pair.ae)
    _set(c.data, pair.public_data)
    _non_private(c, pair.ae_train)
    c.train.ema_rate = 0.999
    c.train.grid_samples = 64  # Decoded prior samples: a diagnostic of the latent space.
    return c


def _ldm_method(pair: Pair, **kw: Any) -> ldm.Config:
    return ldm.Config(**{**pair.unet, **kw})


def _public_config(pair: Pair, args: dict[str, Any]) -> ml_collections.ConfigDict:
    method = _ldm_method(
        pair, autoencoder_from=str(args["ae"]), noise_multiplicity=1, label_dropout=0.1
    )
    c = common.base_config("ldm", method)
    _set(c.data, pair.public_data)
    _non_private(c, pair.public_train)
    c.train.ema_rate = 0.9999
    return c


def _private_config(pair: Pair, args: dict[str, Any]) -> ml_collections.ConfigDict:
    variant = pair.lora if args["variant"] == "lora" else pair.ldm
    method = _ldm_method(
        pair,
        init_from=str(args["public"]),
        unet_classes=pair.public_classes,
        noise_multiplicity=int(variant["K"]),
        trainable=tuple(variant["trainable"]),
        lora_rank=int(variant.get("rank", 0)),
        lora_targets=tuple(variant.get("targets", ())),
    )
    c = common.base_config("ldm", method)
    _set(c.data, pair.private_data)
    dp = _stage_recipe(pair, "private", args["variant"])
    c.dp.epsilon = float(args["eps"])
    c.dp.delta = float(dp["delta"])
    c.dp.clip_norm = float(dp["clip"])
    c.dp.batch_size = int(dp["batch"])
    c.dp.epochs = float(dp["epochs"])
    c.optim.learning_rate = float(variant["lr"])
    c.train.ema_rate = float(dp.get("ema", 0.999))
    return c


def _smoke(c: ml_collections.ConfigDict, pair: Pair, stage: str) -> None:
    """Fake 8x8 data, tiny networks, 2 steps; no workdir of an earlier stage needed."""
    classes = int(c.data.num_classes)
    enabled = bool(c.dp.enabled)
    common.smoke_overrides(c, num_classes=classes, image_shape=(8, 8, pair.channels))
    c.dp.enabled = enabled
    # sigma 5 instead of common's 1: the accounting of each log line and of the report
    # is about 7x faster (the smoke run's epsilon means nothing either way).
    c.dp.noise_multiplier = 5.0
    c.train.log_every = 1
    tiny_ae = autoencoder.Config(
        downsample=2, z_channels=2, ch=8, num_res_blocks=0, mid_attention=False
    )
    if stage == "ae":
        c.method_args = to_configdict(tiny_ae)
        return
    # Latents 4x4x2; a one-level UNet without residual blocks outside the middle, whose
    # only attention is the middle block's (self- then cross-attention): the fewest
    # operations, as compile time dominates smoke runs.
    common.small_dpdm_unet(c, nf=8, attn_resolutions=(), num_steps=2, sample_batch=10)
    c.method_args.ch_mult = (1,)
    c.method_args.num_res_blocks = 0
    c.method_args.context_dim = 0
    c.method_args.cross_attention_heads = 1
    c.method_args.init_from = ""
    c.method_args.autoencoder_from = ""
    c.method_args.untrained_autoencoder = to_configdict(tiny_ae)
    c.method_args.scale_factor = 1.0
    c.method_args.unet_classes = 0
    if c.method_args.lora_rank:
        c.method_args.lora_rank = 2
