"""DP-LFlow: a RealNVP flow in an autoencoder's latent space (Jiang & Sun, TMLR 2023).

The autoencoder and the flow are trained jointly, end to end, from scratch on the
private data with DP-SGD. The per-example loss is

    L(x) = recon_weight * mean_pixels BCE(sigmoid(dec(enc(x))), x) - log p_flow(enc(x) | y)

(DP-LFlow ``train_DPAENF_unconditional.py``: 1e5 x mean BCE + flow NLL; the flow's
gradient also reaches the encoder). ALL parameters, autoencoder and flow, are one
trainable tree clipped once per example, so the sensitivity is C. The published code
clips and noises the two parts with two optimizers, which makes the joint sensitivity
sqrt(2) C while accounting for C: its real noise multiplier is sigma / sqrt(2).

Class-conditional generation, chosen by ``per_class``:

* False (default): a class-conditional flow (the one-hot label enters every coupling),
  one model trained on all the data; the usual accounting applies.
* True: one autoencoder and one flow PER CLASS, as DP-LFlow (``--select c``). Their
  parameters are stacked on a leading class axis and example i's loss reads only the
  models of its class y_i, so its gradient is zero everywhere else. The run is then
  exactly K per-class DP-SGD runs that share one Poisson sampler and one noise draw:
  each class's model sees its own examples Poisson-sampled at rate q with noise sigma C
  on its sum. Parallel composition (each example is in exactly one class subset):
  the guarantee of the whole is the maximum over the classes, here all the same
  mechanism, so it is the single run's epsilon, which the accountant reports (and the
  privacy report says why). The joint per-example clip is over the example's own
  class's parameters (the others' gradient is 0), i.e. one clip over AE + flow as above.
  The DP step uses this (``routing``): it differentiates each example w.r.t. its class's
  models only and adds the clipped gradient into that class's slot, the same sum as
  clipping the whole stack at 1/K of the per-example gradient work.

Sampling: z ~ flow^-1(N(0, I) | y), image = sigmoid(dec(z)). The published post-hoc
sharpness filter is not applied.

Likelihood (``log_likelihood``, ``bits_per_dim``): the model of an 8-bit image is
z ~ flow, then each pixel from a normalized distribution over the 256 grey levels at
lambda = sigmoid(dec(z)) (``pixel_model``): by default the continuous Bernoulli, whose
log-density is minus the Bernoulli cross-entropy the model trains with plus its
normalizer, binned to 8 bits; or Binomial(255, lambda), whose log-likelihood is 255
times the cross-entropy up to a term without parameters. The flow's density is exact;
log p(x) integrates it against the decoder's likelihood by importance sampling with a
Laplace proposal (``dpjax.eval.marginal_likelihood``). The earlier figure, the
codelength of the encoder's code plus the cross-entropy, is ``codelength_bits_per_dim``
(not a likelihood: kept for comparison).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dpjax.eval import marginal_likelihood
from dpjax.methods import base
from dpjax.models import conv_autoencoder, realnvp
from dpjax.privacy import clipping


@dataclasses.dataclass(frozen=True)
class Config:
    """DP-LFlow settings (defaults: the paper's MNIST/Fashion-MNIST models).

    Attributes:
      latent_dim: code size (20 for MNIST/FMNIST, 32 for CelebA-32).
      width: autoencoder width h (64 for MNIST/FMNIST, 256 for CelebA-32).
      flow_layers: affine couplings (9).
      flow_hidden: width of the coupling MLPs (200).
      recon_weight: weight of the per-pixel-mean BCE (the paper's 1e5).
      conditional: class-conditional flow (needs labels).
      per_class: one autoencoder and flow per class instead (needs labels; overrides
        ``conditional``); see the module docstring for the accounting.
      perm_seed: seed of the flow's fixed permutations.
      pixel_model: the decoder's normalized likelihood of 8-bit pixels in
        ``log_likelihood`` (``conv_autoencoder.PIXEL_MODELS``): 'continuous_bernoulli'
        (the density whose unnormalized log is the training BCE, binned) or 'binomial'
        (255 trials: the model whose maximum-likelihood fit the BCE is, far sharper).
        Evaluation only: training is the same.
    """

    latent_dim: int = 20
    width: int = 64
    flow_layers: int = 9
    flow_hidden: int = 200
    recon_weight: float = 1e5
    conditional: bool = True
    per_class: bool = False
    perm_seed: int = 0
    pixel_model: str = "continuous_bernoulli"


class DPLFlow(base.Method):
    """Autoencoder + latent RealNVP, one trainable tree {'ae': ..., 'flow': ...}."""

    name = "dplflow"

    def __init__(self, config: Config, spec: base.DataSpec):
        if len(spec.image_shape) != 3:
            raise ValueError(f"DP-LFlow needs (H, W, C) images, got {spec.image_shape}.")
        if (config.conditional or config.per_class) and spec.num_classes <= 0:
            raise ValueError(
                "method.conditional / per_class need a labelled dataset (num_classes > 0)."
            )
        if config.pixel_model not in conv_autoencoder.PIXEL_MODELS:
            raise ValueError(
                f"method.pixel_model must be one of {sorted(conv_autoencoder.PIXEL_MODELS)}, "
                f"got {config.pixel_model!r}."
            )
        # Per-class models follow the labels too (each sample from its class's models).
        self.samples_follow_labels = bool(config.conditional or config.per_class)
        if config.per_class:  # Each class's flow is unconditional.
            config = dataclasses.replace(config, conditional=False)
        self.config = config
        self.spec = spec
        self.ae = conv_autoencoder.ConvAutoencoder(
            tuple(spec.image_shape), config.latent_dim, config.width
        )
        self.flow = realnvp.RealNVP(
            config.latent_dim,
            config.flow_layers,
            config.flow_hidden,
            spec.num_classes if config.conditional else 0,
            config.perm_seed,
        )

    def privacy_notes(self) -> list[str]:
        if not self.config.per_class:
            return []
        return [
            f"{self.spec.num_classes} per-class models (autoencoder + flow each): every "
            "example is in one class subset and its gradient reaches only its class's "
            "models, so by parallel composition the epsilon is the maximum over the "
            "classes, each the DP-SGD mechanism accounted here (not the sum)."
        ]

    def _labels(self, labels: jax.Array | None) -> jax.Array | None:
        return labels if self.config.conditional else None

    def init(self, key: jax.Array, spec: base.DataSpec) -> base.Params:
        if self.config.per_class:  # Independent models, stacked on a class axis.
            keys = jax.random.split(key, spec.num_classes)
            return base.Params(trainable=jax.vmap(lambda k: self._init_one(k, spec))(keys))
        return base.Params(trainable=self._init_one(key, spec))

    def _init_one(self, key: jax.Array, spec: base.DataSpec) -> base.PyTree:
        k_ae, k_flow = jax.random.split(key)
        x = jnp.zeros((1, *spec.image_shape), jnp.float32)
        ae = self.ae.init(k_ae, x)["params"]
        z = jnp.zeros((1, self.config.latent_dim), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if self.config.conditional else None
        flow = self.flow.init(k_flow, z, y)["params"]
        return {"ae": ae, "flow": flow}

    def _of_class(self, trainable: base.PyTree, label: jax.Array) -> base.PyTree:
        """The parameters example(s) of class ``label`` use (all of them unless per class)."""
        if not self.config.per_class:
            return trainable
        return jax.tree_util.tree_map(lambda p: p[label], trainable)

    def _terms(self, trainable, images: jax.Array, labels: jax.Array | None):
        """(reconstruction BCE summed over pixels, flow NLL of the code), per image."""
        z, logits = self.ae.apply({"params": trainable["ae"]}, images)
        x01 = (images + 1.0) / 2.0
        bce = conv_autoencoder.bernoulli_nll(logits, x01)
        log_p = self.flow.apply(
            {"params": trainable["flow"]}, z, self._labels(labels), method="log_prob"
        )
        return bce, -log_p

    def loss_per_example(self, trainable, frozen, example, key):
        """recon_weight * mean-pixel BCE + flow NLL of ONE example (both parts, one loss)."""
        y = jnp.asarray(example["label"], jnp.int32)
        return self._loss_one(self._of_class(trainable, y), frozen, example, key)

    def routing(self) -> clipping.Routing | None:
        """Per class: example i reads only the models of class y_i (module docstring), so
        the DP step clips w.r.t. those alone: 1/K of the per-example gradient work."""
        if not self.config.per_class:
            return None
        return clipping.Routing(
            num_routes=self.spec.num_classes,
            route=lambda example: jnp.asarray(example["label"], jnp.int32),
            loss=self._loss_one,
        )

    def _loss_one(self, trainable, frozen, example, key):
        """The loss of ONE example under ``trainable``, ITS model (one class's, per class)."""
        del frozen, key
        x = jnp.asarray(example["image"], jnp.float32)[None]
        y = jnp.asarray(example["label"], jnp.int32)[None]
        bce, nll = self._terms(trainable, x, y)
        pixels = math.prod(self.spec.image_shape)
        loss = self.config.recon_weight * bce[0] / pixels + nll[0]
        return loss, {"bce_per_pixel": bce[0] / pixels, "flow_nll": nll[0]}

    def log_likelihood(
        self,
        params: base.Params,
        images: jax.Array,
        labels: jax.Array | None = None,
        key: jax.Array | None = None,
        settings: marginal_likelihood.Settings = marginal_likelihood.DEFAULT,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Per-image log p(x) of the 8-bit image x under the model, in nats.

        The model: z ~ flow (exact density, given the label when conditional or per
        class), then each pixel independently from the decoder's ``config.pixel_model``
        at sigmoid(dec(z)) (a normalized distribution over the 256 grey levels, see
        ``conv_autoencoder``). log p(x) integrates over z by importance sampling with a
        Laplace proposal at the posterior mode, started at the encoder's code
        (``dpjax.eval.marginal_likelihood``): in expectation a lower bound that converges
        to the exact value as ``settings.num_samples`` grows.

        Args:
          params: trained parameters.
          images: (N, H, W, C) in [-1, 1], 8-bit grey levels.
          labels: (N,) int, required for a conditional or per-class model.
          key: PRNG key of the importance samples (default PRNGKey(0)).
          settings: importance-sampling settings.

        Returns:
          ((N,) log-likelihoods, diagnostics with (N,) 'ess' and 'log_joint_at_mode').

        Raises:
          ValueError: no labels for a conditional or per-class model.
        """
        key = jax.random.PRNGKey(0) if key is None else key
        n = images.shape[0]
        if labels is None and (self.config.conditional or self.config.per_class):
            raise ValueError("A conditional or per-class DP-LFlow needs the images' labels.")
        labels = jnp.zeros((n,), jnp.int32) if labels is None else labels
        labels = jnp.asarray(labels, jnp.int32)

        pixel_log_prob = conv_autoencoder.PIXEL_MODELS[self.config.pixel_model]

        def one(x, y, k):
            tr = self._of_class(params.trainable, y)
            cond = self._labels(y[None])
            x01 = (x[None] + 1.0) / 2.0

            def log_joint(z):
                logits = self.ae.apply({"params": tr["ae"]}, z[None], method="decode")
                log_px = pixel_log_prob(logits, x01)[0]
                log_pz = self.flow.apply({"params": tr["flow"]}, z[None], cond, method="log_prob")
                return log_px + log_pz[0]

            z0 = self.ae.apply({"params": tr["ae"]}, x[None], method="encode")[0]
            return marginal_likelihood.log_marginal(log_joint, z0, k, settings)

        return jax.vmap(one)(images, labels, jax.random.split(key, n))

    def bits_per_dim(
        self,
        params: base.Params,
        images: jax.Array,
        labels: jax.Array | None = None,
        key: jax.Array | None = None,
        settings: marginal_likelihood.Settings = marginal_likelihood.DEFAULT,
    ) -> jax.Array:
        """Per-image -log2 p(x) / (H W C) of ``log_likelihood`` (same arguments): bits
        per dimension of 8-bit images, comparable with other models' (an upper bound in
        expectation, see ``log_likelihood``)."""
        log_p, _ = self.log_likelihood(params, images, labels, key, settings)
        return -log_p / (math.prod(self.spec.image_shape) * math.log(2.0))

    def codelength_bits_per_dim(
        self, params: base.Params, images: jax.Array, labels: jax.Array | None = None
    ) -> jax.Array:
        """Per-image training codelength in bits per dimension: the flow's exact negative
        log-density of the encoder's code plus the decoder's Bernoulli cross-entropy on
        grey levels, over H*W*C. NOT a likelihood of images (the cross-entropy on grey
        levels is not normalized over them); kept to compare with earlier runs.

        Args:
          params: trained parameters.
          images: (N, H, W, C) in [-1, 1].
          labels: (N,) int, required for a conditional flow.
        """
        if self.config.per_class:  # Each image under its own class's model.
            bce, nll = jax.vmap(
                lambda x, y: self._terms(self._of_class(params.trainable, y), x[None], None)
            )(images, labels)
            bce, nll = bce[:, 0], nll[:, 0]
        else:
            bce, nll = self._terms(params.trainable, images, labels)
        return (bce + nll) / (math.prod(self.spec.image_shape) * math.log(2.0))

    def sample(self, params: base.Params, key: jax.Array, n: int, labels=None) -> jax.Array:
        """Images in [-1, 1] from z ~ N(0, I) through the inverse flow and the decoder."""
        k_label, k_z = jax.random.split(key)
        labelled = self.config.conditional or self.config.per_class
        if labelled and labels is None:
            labels = jax.random.randint(k_label, (n,), 0, self.spec.num_classes)
        z = jax.random.normal(k_z, (n, self.config.latent_dim))

        def decode(tr, z, labels):
            codes, _ = self.flow.apply({"params": tr["flow"]}, z, labels, method="inverse")
            logits = self.ae.apply({"params": tr["ae"]}, codes, method="decode")
            return jax.nn.sigmoid(logits) * 2.0 - 1.0

        if self.config.per_class:  # Each sample from its class's models.
            one = lambda z, y: decode(self._of_class(params.trainable, y), z[None], None)[0]  # noqa: E731
            return jax.vmap(one)(z, jnp.asarray(labels, jnp.int32))
        return decode(params.trainable, z, self._labels(labels))


def make(config: Config, spec: base.DataSpec) -> DPLFlow:
    return DPLFlow(config, spec)
