"""DPDM: differentially private diffusion models (Dockhorn, Cao, Vahdat, Kreis; TMLR 2023).

An EDM-preconditioned DDPM++ denoiser (``dpjax.models.ncsnpp``) trained with DP-SGD. The
method's key trick is *noise multiplicity*: each private example is noised K times with
independent (sigma, n) and the K losses are averaged inside the per-example loss, which
lowers the variance of the example's gradient at no privacy cost because the clipping
unit stays the example (the sensitivity stays C). Classifier-free guidance (Ho & Salimans 2021) is
trained by replacing the label with a null class with probability ``label_dropout``,
drawn once per example before the K repeats.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from dpjax import params_select
from dpjax.diffusion import samplers
from dpjax.diffusion.precond import SIGMA_DATA, NetFn, Preconditioning
from dpjax.methods import base
from dpjax.models import lora, ncsnpp
from dpjax.privacy import provenance


@dataclasses.dataclass(frozen=True)
class Config(samplers.SamplerSettings):
    """DPDM settings (defaults: nv-tlabs/DPDM configs/mnist_28/train_eps_10.0.yaml).

    Attributes:
      unet: 'auto' (the DPDM preset matching the data's shape and conditioning), a preset
        name from ``ncsnpp.PRESETS``, or 'custom' (nf=32, ch_mult=(1, 2, 2), 2 blocks,
        no attention resolutions (the middle block's self-attention, as in DDPM++, is
        always there), then the overrides below). The image size, channels and number of
        classes always come from the DataSpec.
      nf, ch_mult, num_res_blocks, attn_resolutions, dropout: overrides of the chosen UNet
        (None keeps the preset's value).
      precond: 'edm' (Karras et al. 2022) or 'v' (v-prediction, DPDM's epsilon=0.2 models).
      sigma_data: data std of the EDM preconditioning (DPDM: sqrt(1/3), not 0.5).
      p_mean, p_std: EDM training noise, ln sigma ~ N(p_mean, p_std^2).
      logsnr_min, logsnr_max: training log-SNR range of the 'v' loss.
      noise_multiplicity: K, noise draws per example averaged in the per-example loss.
      label_dropout: probability of training on the null class (classifier-free guidance).
      sampler, ..., sample_batch: ``samplers.SamplerSettings`` (inherited).
      init_from: a workdir of a run of this method trained on PUBLIC data (e.g. with
        dp.enabled=False); its EMA UNet initializes this one. DP fine-tuning (DP-LDM and
        DP-LoRA style) starts here. Its data must be public: the privacy report of this
        run covers this run's private data only. Known limitation: the method loads it
        when built, so sampling, eval and export of the fine-tuned run also need it.
      trainable: regular expressions selecting the trained UNet parameters by path (e.g.
        'attn' for the attention blocks, 'label_embed' for the class embedding);
        empty = all (or none when LoRA adapters are used). A pattern matching nothing is
        an error.
      lora_rank, lora_targets, lora_alpha: LoRA adapters (rank r > 0) on the dense and
        1x1-conv layers whose module path matches a target; scale alpha / r (alpha 0
        means alpha = r). The adapters are trained, the UNet weights they adapt are not
        (unless ``trainable`` selects them).
    """

    unet: str = "auto"
    nf: int | None = None
    ch_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attn_resolutions: tuple[int, ...] | None = None
    dropout: float | None = None
    precond: Literal["edm", "v"] = "edm"
    sigma_data: float = SIGMA_DATA
    p_mean: float = -1.2
    p_std: float = 1.2
    logsnr_min: float = -9.0
    logsnr_max: float = 13.0
    noise_multiplicity: int = 32
    label_dropout: float = 0.1
    init_from: str = ""
    trainable: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_alpha: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1, got {self.noise_multiplicity}.")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}.")
        if self.precond not in ("edm", "v"):
            raise ValueError(f"precond must be 'edm' or 'v', got '{self.precond}'.")
        if self.lora_rank < 0 or (self.lora_rank > 0) != bool(self.lora_targets):
            raise ValueError("LoRA needs both lora_rank > 0 and lora_targets (or neither).")


def resolve_unet(config: Config, spec: base.DataSpec) -> ncsnpp.UNetConfig:
    """The UNetConfig that ``config.unet`` and its overrides select for data ``spec``."""
    height, width, channels = spec.image_shape
    if height != width:
        raise ValueError(f"NCSN++ needs square images, got {spec.image_shape}.")
    if config.unet == "auto":
        matches = [
            name
            for name, p in ncsnpp.PRESETS.items()
            if (p.image_size, p.channels, p.num_classes > 0)
            == (height, channels, spec.num_classes > 0)
        ]
        if not matches:
            raise ValueError(
                f"No DPDM UNet preset fits images {spec.image_shape} with "
                f"num_classes={spec.num_classes}; set unet='custom' and attn_resolutions, or "
                f"one of {sorted(ncsnpp.PRESETS)}."
            )
        unet = ncsnpp.PRESETS[matches[0]]
    elif config.unet == "custom":
        unet = ncsnpp.UNetConfig(image_size=height, channels=channels)
    else:
        unet = ncsnpp.preset(config.unet)
        if (unet.image_size, unet.channels) != (height, channels):
            raise ValueError(
                f"UNet preset '{config.unet}' is for {unet.image_size}x{unet.image_size}x"
                f"{unet.channels} images, but the data is {spec.image_shape}."
            )
    overrides = {
        f: getattr(config, f)
        for f in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")
        if getattr(config, f) is not None
    }
    return dataclasses.replace(
        unet, image_size=height, channels=channels, num_classes=spec.num_classes, **overrides
    )


class DPDM(base.Method):
    """The DPDM method object: init, the per-example loss and sampling."""

    name = "dpdm"

    def __init__(self, config: Config, spec: base.DataSpec, load_sources: bool = True) -> None:
        """``load_sources=False`` (``make_released``): ``init_from`` is not read; ``init``
        then gives fresh weights of the same structure, which an export's replace."""
        self.config = config
        self.spec = spec
        self.unet_config = resolve_unet(config, spec)
        self._build_diffusion()
        self.pretrained = (_load_pretrained(config.init_from, self)
                           if config.init_from and load_sources else None)

    def _build_diffusion(self) -> None:
        """The network, preconditioning and jitted sampler of ``self.unet_config``
        (shared with subclasses that choose their own spec, e.g. LDM's latent one)."""
        config = self.config
        self.network = ncsnpp.NCSNpp(self.unet_config)
        self.precond = Preconditioning(
            kind=config.precond,
            sigma_data=config.sigma_data,
            p_mean=config.p_mean,
            p_std=config.p_std,
            logsnr_min=config.logsnr_min,
            logsnr_max=config.logsnr_max,
        )
        if config.guidance != 0 and not self.conditional:
            raise ValueError("guidance != 0 needs class labels; this data is unconditional.")
        self._sample_fn = jax.jit(self._sample_batch, static_argnames="batch")

    def source_runs(self) -> list[provenance.Source]:
        """``init_from``, which this method treats as public (nothing composes it)."""
        c = self.config
        return [provenance.Source("init_from", c.init_from)] if c.init_from else []

    @property
    def fine_tuning(self) -> bool:
        """Whether parameters are split into {'unet': ..., 'lora': ...} / {'unet': ...}."""
        c = self.config
        return bool(c.init_from or c.trainable or c.lora_rank)

    @property
    def lora_scale(self) -> float:
        """alpha / r of the LoRA update (Hu et al. 2022, Sec. 4.1)."""
        c = self.config
        return (c.lora_alpha or c.lora_rank) / max(c.lora_rank, 1)

    def weights(
        self, trainable: base.PyTree, frozen: base.PyTree
    ) -> tuple[base.PyTree, base.PyTree | None]:
        """(the full UNet parameter tree, the LoRA adapters or None)."""
        if not self.fine_tuning:
            return trainable, None
        unet = params_select.merge(trainable.get("unet", {}), (frozen or {}).get("unet", {}))
        return unet, trainable.get("lora")

    @property
    def conditional(self) -> bool:
        """Whether the model takes class labels (the data has classes)."""
        return self.spec.num_classes > 0

    @property
    def null_label(self) -> int | None:
        """The label index of the classifier-free-guidance null class (None if unconditional)."""
        return self.spec.num_classes if self.conditional else None

    def init(self, key: jax.Array, spec: base.DataSpec) -> base.Params:
        """UNet parameters: fresh, or ``init_from``'s; split by ``trainable``; LoRA adapters.

        Without fine-tuning options all parameters are trainable (``frozen`` is empty).
        """
        if spec != self.spec:
            raise ValueError(f"DPDM was built for {self.spec}, init was given {spec}.")
        k_unet, k_lora = jax.random.split(key)
        if self.pretrained is not None:
            unet = jax.tree_util.tree_map(jnp.asarray, self.pretrained)
        else:
            unet = ncsnpp.init_params(self.unet_config, k_unet)
        if not self.fine_tuning:
            return base.Params(trainable=unet, frozen={})
        c = self.config
        if c.trainable:
            selected, rest = params_select.split(unet, c.trainable)
        elif c.lora_rank:
            selected, rest = {}, unet
        else:
            selected, rest = unet, {}
        trainable: dict = {"unet": selected}
        if c.lora_rank:
            trainable["lora"] = lora.init(k_lora, self.lora_layers(unet), c.lora_rank)
        return base.Params(trainable=trainable, frozen={"unet": rest})

    def lora_layers(self, unet: base.PyTree) -> dict[str, lora.LayerShape]:
        """The layers ``lora_targets`` select (an error if a target matches none)."""
        h, w, ch = self.spec.image_shape
        x = jnp.zeros((1, h, w, ch))
        labels = jnp.zeros((1,), jnp.int32) if self.conditional else None
        return lora.discover(
            lambda: self.network.apply({"params": unet}, x, jnp.zeros((1,)), labels),
            self.config.lora_targets,
        )

    def net(
        self,
        trainable: base.PyTree,
        frozen: base.PyTree = None,
        train: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> NetFn:
        """The raw network F(c_in x, c_noise, labels) with parameters (and adapters) bound."""
        rngs = {"dropout": dropout_key} if train and dropout_key is not None else None
        unet, adapters = self.weights(trainable, frozen)

        def apply(x: jax.Array, c_noise: jax.Array, labels: jax.Array | None) -> jax.Array:
            variables = {"params": unet}
            if adapters is None:
                return self.network.apply(variables, x, c_noise, labels, train=train, rngs=rngs)
            with lora.applied(adapters, self.lora_scale):
                return self.network.apply(variables, x, c_noise, labels, train=train, rngs=rngs)

        return apply

    def denoise(
        self,
        trainable: base.PyTree,
        x: jax.Array,
        sigma: jax.Array,
        labels: jax.Array | None,
        frozen: base.PyTree = None,
    ) -> jax.Array:
        """The preconditioned denoiser D(x; sigma, y) (EDM Eq. 7), x (N, H, W, C), sigma (N,)."""
        return self.precond.denoise(self.net(trainable, frozen), x, sigma, labels)

    def copy_labels(self, label: jax.Array, key: jax.Array) -> jax.Array | None:
        """The labels of the K noisy copies of one example.

        Classifier-free-guidance dropout is drawn ONCE per example, before the K repeats,
        so all K copies share the kept or nulled label (DPDM score_losses.py).
        Returns None for an unconditional model.
        """
        if not self.conditional:
            return None
        drop = jax.random.bernoulli(key, self.config.label_dropout)
        label = jnp.where(drop, self.spec.num_classes, jnp.asarray(label, jnp.int32))
        return jnp.full((self.config.noise_multiplicity,), label, jnp.int32)

    def loss_per_example(
        self, trainable: base.PyTree, frozen: base.PyTree, example: base.Example, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """DPDM's loss of one example: the mean of K weighted denoising losses.

        L(x) = 1/K sum_k lambda(sigma_k) mean_pixels (D(x + sigma_k n_k; sigma_k, y) - x)^2
        (DPDM's noise multiplicity; EDM Eqs. 2, 8), sigma_k ~ p(sigma), n_k ~ N(0, I), all
        draws independent.
        Only this example enters the loss; no statistic crosses examples.

        Args:
          trainable: UNet parameters.
          frozen: the UNet parameters that are not trained (fine-tuning), else empty.
          example: {'image': (H, W, C) in [-1, 1], 'label': () int}.
          key: this example's randomness.

        Returns:
          (loss, {'loss': loss}).
        """
        x = jnp.asarray(example["image"], jnp.float32)
        if x.shape != self.spec.image_shape:
            raise ValueError(f"Expected an image of shape {self.spec.image_shape}, got {x.shape}.")
        k_label, k_sigma, k_noise, k_dropout = jax.random.split(key, 4)
        num = self.config.noise_multiplicity
        labels = self.copy_labels(example["label"], k_label)
        sigma = self.precond.sample_sigma(k_sigma, (num,))
        noise = jax.random.normal(k_noise, (num, *x.shape))
        copies = jnp.broadcast_to(x, (num, *x.shape))
        net = self.net(trainable, frozen, train=True, dropout_key=k_dropout)
        loss = jnp.mean(self.precond.loss(net, copies, labels, sigma, noise))
        return loss, {"loss": loss}

    def _sample_batch(
        self,
        trainable: base.PyTree,
        frozen: base.PyTree,
        key: jax.Array,
        labels: jax.Array | None,
        batch: int,
    ) -> jax.Array:
        return jnp.clip(self.run_sampler(trainable, frozen, key, labels, batch), -1.0, 1.0)

    def run_sampler(
        self,
        trainable: base.PyTree,
        frozen: base.PyTree,
        key: jax.Array,
        labels: jax.Array | None,
        batch: int,
    ) -> jax.Array:
        """The configured sampler's output for ``batch`` draws, shape (batch, *spec shape),
        not clipped (the caller decides: pixels are clipped, LDM latents are decoded)."""
        cfg = self.config
        denoise = lambda x, sigma, y: self.denoise(trainable, x, sigma, y, frozen)
        return samplers.sample(
            denoise,
            key,
            (batch, *self.spec.image_shape),
            labels,
            **cfg.sample_kwargs(),
            null_label=self.null_label,
        )

    def sample_labelled(
        self, params: base.Params, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """``n`` samples and the labels they were drawn for. Can be called under ``jax.jit``.

        Sampling runs in jitted chunks of ``config.sample_batch`` images (the last chunk is
        padded to the same static size, so one compilation serves every chunk).

        Args:
          params: parameters (typically the EMA ones).
          key: sampling randomness.
          n: number of images (static).
          labels: (n,) class labels in [0, num_classes] (num_classes = unguided null class),
            or None for labels drawn uniformly from the real classes (never the null
            class). An unconditional model ignores them (callers may pass placeholders).

        Returns:
          (images (n, H, W, C) in [-1, 1], labels (n,) int32, or None if unconditional).

        Raises:
          ValueError: labels of the wrong shape or, when they are concrete, out of range.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        label_key, image_key = jax.random.split(key)
        if not self.conditional:
            labels = None
        elif labels is None:
            labels = jax.random.randint(label_key, (n,), 0, self.spec.num_classes, jnp.int32)
        else:
            labels = jnp.asarray(labels, jnp.int32)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {labels.shape}.")
            if not isinstance(labels, jax.core.Tracer):
                low, high = int(labels.min()), int(labels.max())
                if low < 0 or high > self.spec.num_classes:
                    raise ValueError(
                        f"labels must lie in [0, {self.spec.num_classes}] (the last one is "
                        f"the null class), got values in [{low}, {high}]."
                    )
        batch = min(self.config.sample_batch, n)
        chunks = []
        for i, start in enumerate(range(0, n, batch)):
            count = min(batch, n - start)
            chunk_labels = None
            if labels is not None:
                # Pad the last chunk to the static batch size; its extra rows are dropped.
                chunk_labels = jnp.pad(labels[start : start + count], (0, batch - count))
            chunk_key = jax.random.fold_in(image_key, i)
            images = self._sample_fn(
                params.trainable, params.frozen, chunk_key, chunk_labels, batch
            )
            chunks.append(images[:count])
        return jnp.concatenate(chunks), labels

    def sample(
        self, params: base.Params, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> jax.Array:
        """``n`` images in [-1, 1], shape (n, H, W, C); see ``sample_labelled``."""
        return self.sample_labelled(params, key, n, labels)[0]


def _load_pretrained(workdir: str, method: DPDM) -> dict:
    """The EMA UNet of the DPDM run in ``workdir`` (as NumPy), checked against ``method``."""
    import numpy as np

    from dpjax import sample as sample_lib  # Deferred: sample imports the method registry.

    source, params, spec, _, step = sample_lib.load_trained(workdir)
    if not isinstance(source, DPDM) or source.unet_config != method.unet_config:
        raise ValueError(
            f"init_from={workdir!r} holds a {type(source).__name__} with UNet "
            f"{getattr(source, 'unet_config', None)}, not this run's {method.unet_config}."
        )
    unet, adapters = source.weights(params.trainable, params.frozen)
    if adapters is not None:
        raise ValueError(f"init_from={workdir!r} has LoRA adapters; merge them first.")
    return jax.tree_util.tree_map(np.asarray, unet)


def make(config: Config, spec: base.DataSpec) -> DPDM:
    """Builds the DPDM method for data described by ``spec``."""
    return DPDM(config, spec)


def make_released(config: Config, spec: base.DataSpec, record: dict) -> DPDM:
    """DPDM rebuilt from an export: ``init_from`` (redacted there) only gave initial
    weights, so nothing of it is needed (``record`` is empty)."""
    del record
    return DPDM(config, spec, load_sources=False)
