"""DP-MEPF: a noised mean embedding of perceptual features, released once (Harder et al.,
TMLR 2023), then a generator trained, as post-processing, to match it.

Private access: ONE release, before the first step (the loop calls ``private_release``
and never opens the private data again; ``uses_dp_sgd = False``). For each private
example i with class y_i, the feature network (trained on PUBLIC data, or random) gives
the concatenated pre-activation outputs phi(x_i) of its convolutions (DP-MEPF's
``get_pt_vgg_with_conv_layers`` hooks). The example contributes

    u_i = onehot(y_i) (x) C * [alpha * phi_i / |phi_i|,  beta * psi_i / |psi_i|,  w]

with psi_i = phi_i^2 (the optional second moment) and alpha^2 + beta^2 + w^2 = 1, so
|u_i| = C exactly (DP-MEPF's default 'norm' bound: rescale to norm C, not clip). The
release is S = sum_i u_i + N(0, (sigma C)^2 I): one Gaussian mechanism whose sensitivity
is C under add-or-remove-one and 2C under replace-one (DP-MEPF's 'swap' relation; the
accountant applies the factor, see ``accounting.for_accountant``). The last coordinate
of each class's block is a noised count, so the per-class mean embedding is the noised
sum over the noised count: neither the class sizes nor N are used unprotected
(DP-MEPF divides by the true class counts with a per-class sensitivity 2C/n_c). The
optional validation embedding (DP-MEPF ``--dp_val_noise_scaling 10``) is a second,
independent release of the same sum with noise ``val_noise_scale * sigma * C``; it is
only logged (``public_val_distance``), as a DP proxy for model selection. Both
Gaussians are composed by the accountant, and sigma is calibrated on the composition.

Generator training (GFMN's "Adam moving average", DP-MEPF ``adam_match_loss``): a
moving estimate m_k of (target_k - fake mean_k) is trained with its own Adam toward
the current difference, and the generator maximizes <m_k, fake mean_k>; both come from
one loss with stop-gradients. It reads only ``frozen['release']`` (public after the
release): private data never enters it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import optax

from dpjax.methods import base
from dpjax.models import feature_cnn, resnet_generator
from dpjax.privacy import provenance


@dataclasses.dataclass(frozen=True)
class Config:
    """DP-MEPF settings.

    Attributes:
      features_from: workdir of a 'classifier' run (dpjax/methods/classifier.py) whose
        EMA network gives the features. It must be trained on PUBLIC data, or with DP;
        a DP run's own epsilon is composed into this run's total (``prior_releases``).
        '' uses a randomly initialized network (seed ``feature_seed``; no public data).
      feature_widths: stage widths of the random network (ignored with features_from).
      feature_seed: seed of the random network.
      feature_layers: indices of the convolutions whose outputs are concatenated, in
        network order (0 .. 2 * stages - 1); empty for all of them (DP-MEPF's default).
      count_weight: w, the share of C spent on the count coordinate (noised class sizes).
      second_moment: also release the mean of the squared features (DP-MEPF's m2).
      second_moment_share: beta^2 / (alpha^2 + beta^2) when second_moment is on.
      val_noise_scale: > 0 adds a validation release with this times the noise (10 in
        DP-MEPF); 0 for none.
      release_batch: images per chunk when computing the release.
      z_dim: generator latent size (100).
      ngf: generator width (64).
      gen_batch: generated images per step; a multiple of the number of classes.
      m_learning_rate: Adam learning rate of the moving average m (DP-MEPF ``m_avg_lr``).
      b1: Adam beta1 of both the generator and m (0.5 in DP-MEPF).
    """

    features_from: str = ""
    feature_widths: tuple[int, ...] = (32, 64, 128)
    feature_seed: int = 0
    feature_layers: tuple[int, ...] = ()
    count_weight: float = 0.1
    second_moment: bool = False
    second_moment_share: float = 0.5
    val_noise_scale: float = 0.0
    release_batch: int = 500
    z_dim: int = 100
    ngf: int = 64
    gen_batch: int = 100
    m_learning_rate: float = 1e-3
    b1: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.count_weight < 1.0:
            raise ValueError(f"method_args.count_weight must be in (0, 1): {self.count_weight}.")
        if not 0.0 < self.second_moment_share < 1.0:
            raise ValueError("method_args.second_moment_share must be in (0, 1).")
        if self.val_noise_scale < 0:
            raise ValueError("method_args.val_noise_scale must be >= 0 (0: no validation release).")
        for key in ("release_batch", "z_dim", "ngf", "gen_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"method_args.{key} must be >= 1.")


class DPMEPF(base.Method):
    """trainable {'gen', 'm'}; frozen {'features', 'release'}."""

    name = "dpmepf"
    uses_dp_sgd = False

    def __init__(self, config: Config, spec: base.DataSpec,
                 released_features: dict[str, Any] | None = None) -> None:
        """``released_features`` (``make_released``): the feature network's widths and
        head size as an export records them; ``features_from`` is then not read."""
        self.config = config
        self.spec = spec
        self.classes = max(spec.num_classes, 1)
        if config.gen_batch % self.classes:
            raise ValueError(
                f"method_args.gen_batch={config.gen_batch} must be a multiple of the "
                f"{self.classes} classes (each step generates the same number per class)."
            )
        self.generator = resnet_generator.ResNetGenerator(
            tuple(spec.image_shape), spec.num_classes, config.ngf
        )
        self.pretrained_features = None
        self.features_plan: dict[str, Any] | None = None
        widths = tuple(config.feature_widths)
        head = 1
        if released_features is not None:
            widths = tuple(int(w) for w in released_features["widths"])
            head = int(released_features["head"])
        elif config.features_from:
            widths, self.pretrained_features, self.features_plan = _load_features(
                config.features_from, spec
            )
            # The classifier head size does not matter for the features; keep the source's.
            head = self.pretrained_features["head"]["bias"].shape[0]
        self.widths = widths
        self.head = head
        self.features_net = feature_cnn.FeatureCNN(head, widths)
        layers = tuple(int(i) for i in config.feature_layers)
        num_layers = 2 * len(widths)
        if any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(
                f"method_args.feature_layers={layers} must be distinct indices in "
                f"[0, {num_layers}) (the feature network has {num_layers} convolutions)."
            )
        self.layers = layers or tuple(range(num_layers))
        self.num_features = feature_cnn.num_features(tuple(spec.image_shape), widths, layers)
        w2 = config.count_weight**2
        share = config.second_moment_share if config.second_moment else 0.0
        self.alpha = math.sqrt((1.0 - w2) * (1.0 - share))
        self.beta = math.sqrt((1.0 - w2) * share)
        self.embed_dim = self.num_features * (2 if config.second_moment else 1)

    # ----------------------------------------------------------------- embedding

    def embedding(self, features: base.PyTree, images: jax.Array) -> jax.Array:
        """e(x) = [alpha phi/|phi|, beta psi/|psi|] of (N, H, W, C) images in [-1, 1].

        Guarantee: |e(x)| <= sqrt(1 - w^2) for every image (equality unless phi = 0).
        """
        _, maps = self.features_net.apply({"params": features}, images)
        phi = jnp.concatenate([maps[i].reshape(maps[i].shape[0], -1) for i in self.layers], -1)
        parts = [self.alpha * _unit(phi)]
        if self.config.second_moment:
            parts.append(self.beta * _unit(phi * phi))
        return jnp.concatenate(parts, axis=-1)

    def rows(self, features: base.PyTree, images: jax.Array) -> jax.Array:
        """[e(x), w] per image, (N, embed_dim + 1): u_i is this row in block y_i."""
        e = self.embedding(features, images)
        return jnp.concatenate([e, jnp.full((e.shape[0], 1), self.config.count_weight)], -1)

    def contributions(self, features: base.PyTree, images: jax.Array, labels: jax.Array):
        """Each example's u_i, (N, classes, embed_dim + 1), as in the module docstring.

        Guarantee: |u_i| <= 1 (in units of C), with equality unless phi(x_i) = 0.
        """
        row = self.rows(features, images)
        onehot = jax.nn.one_hot(self._labels(labels), self.classes, dtype=row.dtype)
        return onehot[:, :, None] * row[:, None, :]

    def _labels(self, labels: jax.Array) -> jax.Array:
        return labels if self.spec.num_classes > 0 else jnp.zeros_like(labels)

    # ----------------------------------------------------------------- contract

    def init(self, key: jax.Array, spec: base.DataSpec) -> base.Params:
        k_gen, _ = jax.random.split(key)
        z = jnp.zeros((1, self.config.z_dim), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if spec.num_classes else None
        gen = self.generator.init(k_gen, z, labels)["params"]
        if self.pretrained_features is not None:
            features = jax.tree_util.tree_map(jnp.asarray, self.pretrained_features)
        else:  # A fixed random network, from its own seed (not the run's).
            x = jnp.zeros((1, *spec.image_shape), jnp.float32)
            features = self.features_net.init(jax.random.key(self.config.feature_seed), x)
            features = features["params"]
        shape = (self.classes, self.embed_dim + 1)
        release = {"sum": jnp.zeros(shape, jnp.float32)}
        if self.config.val_noise_scale > 0:
            release["val_sum"] = jnp.zeros(shape, jnp.float32)
        return base.Params(
            trainable={"gen": gen, "m": jnp.zeros((self.classes, self.embed_dim), jnp.float32)},
            frozen={"features": features, "release": release},
        )

    def release_record(self) -> dict[str, Any]:
        """The feature network's widths and head size (those of ``features_from``'s
        classifier, redacted from an export, or the random network's)."""
        return {"features": {"widths": list(self.widths), "head": self.head}}

    def source_runs(self) -> list[provenance.Source]:
        """The feature network's run; composed (``prior_releases``) when it used DP."""
        wd = self.config.features_from
        if not wd:
            return []
        composed = self.features_plan is not None and bool(self.features_plan["enabled"])
        return [provenance.Source("features_from", wd, composed)]

    def prior_releases(self) -> list[dict[str, Any]]:
        """The feature network's own DP training, if it was trained with DP."""
        plan = self.features_plan
        if plan is None or not plan["enabled"]:
            return []
        return [
            {
                "kind": "dpsgd",
                "noise_multiplier": plan["noise_multiplier"],
                "sampling_rate": plan["sampling_rate"],
                "steps": int(plan["steps_done"]),
                "neighbouring": plan["neighbouring"],
                "description": f"feature network trained with DP-SGD ({self.config.features_from})",
            }
        ]

    def release_events(self, noise_multiplier: float) -> list[Any]:
        """The embedding release and, optionally, the validation release (both Gaussian)."""
        events = [dp_accounting.GaussianDpEvent(noise_multiplier)]
        if self.config.val_noise_scale > 0:
            events.append(
                dp_accounting.GaussianDpEvent(noise_multiplier * self.config.val_noise_scale)
            )
        return events

    def exact_sums(self, features: base.PyTree, images: jax.Array, labels: jax.Array):
        """sum_i u_i over the dataset (no noise), in chunks; (classes, embed_dim + 1).

        Guarantee: adding or removing one example changes the result by exactly that
        example's u_i, of norm <= 1 (the unit bound; the release multiplies by C). A row
        with a non-finite value (a feature network that overflows on some image) counts
        as 0, as in DP-SGD: its NaN would otherwise spread to every class's block
        (0 x NaN), so one example would decide whether the whole release is finite
        (non-finite review, 2026-12-07).
        """
        n = images.shape[0]
        chunk = min(self.config.release_batch, n)
        pad = (-n) % chunk
        idx = jnp.concatenate([jnp.arange(n), jnp.full((pad,), -1)]).reshape(-1, chunk)

        def body(total, rows):
            safe = jnp.maximum(rows, 0)
            x = base.to_model_range(images[safe])
            row = self.rows(features, x)
            keep = (rows >= 0) & jnp.all(jnp.isfinite(row), axis=-1)  # Padding adds 0.
            row = jnp.where(keep[:, None], row, 0.0)  # (where, not a product: 0 x NaN.)
            onehot = jax.nn.one_hot(self._labels(labels[safe].astype(jnp.int32)), self.classes)
            # sum_i onehot_i (x) row_i, without materializing the (N, K, E) contributions.
            return total + jnp.einsum("nk,ne->ke", onehot, row), None

        init = jnp.zeros((self.classes, self.embed_dim + 1), jnp.float32)
        return jax.lax.scan(body, init, idx)[0]

    def private_release(self, params, images, labels, key, plan) -> base.Release:
        """sum_i u_i + N(0, sigma^2 I) (and the validation copy), in units of C.

        Every u_i has norm exactly C; the released values are that sum plus N(0, (sigma C)^2)
        noise, divided by the public constant C (post-processing), so C itself has no
        effect: the guarantee is that of a Gaussian mechanism with noise multiplier sigma.
        """
        sums = jax.jit(self.exact_sums)(params.frozen["features"], images, labels)
        k_main, k_val = jax.random.split(key)
        has_val = "val_sum" in params.frozen["release"]
        if not plan.enabled:
            desc = "mean embedding released WITHOUT noise (dp.enabled=False)"
            values = {"sum": sums, **({"val_sum": sums} if has_val else {})}
            return base.Release(values, ({"kind": "non_private", "description": desc},))
        sigma = plan.noise_multiplier
        values = {"sum": sums + sigma * jax.random.normal(k_main, sums.shape)}
        records = [
            {
                "kind": "gaussian",
                "noise_multiplier": sigma,
                "description": (
                    f"DP-MEPF mean embedding: {self.classes} class(es) x {self.embed_dim} "
                    f"features + a count, each example's part of norm C, noise sigma C with "
                    f"sigma = {sigma:.5g}"
                ),
            }
        ]
        if has_val:
            s_val = sigma * self.config.val_noise_scale
            values["val_sum"] = sums + s_val * jax.random.normal(k_val, sums.shape)
            records.append(
                {
                    "kind": "gaussian",
                    "noise_multiplier": s_val,
                    "description": f"DP-MEPF validation embedding, sigma = {s_val:.5g}",
                }
            )
        return base.Release(values, tuple(records))

    def targets(self, release_sum: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(per-class mean embedding (classes, embed_dim), noised class sizes (classes,))."""
        count = release_sum[:, -1] / self.config.count_weight
        # The noise can push a tiny class's count to or below 0: floor it at one example.
        mean = release_sum[:, :-1] / jnp.maximum(count, 1.0)[:, None]
        return mean, count

    def public_loss(self, trainable, frozen, key):
        """GFMN's moving-average matching loss (post-processing of the release)."""
        b = self.config.gen_batch
        labels = jnp.arange(b) % self.classes
        images = self._generate(trainable["gen"], key, labels)
        fake = self.embedding(frozen["features"], images)
        # Rows cycle through the classes, so (b / K, K, E) -> the per-class means.
        fake_mean = fake.reshape(b // self.classes, self.classes, -1).mean(axis=0)
        target, _ = self.targets(frozen["release"]["sum"])
        diff = target - fake_mean
        m = trainable["m"]
        m_loss = 0.5 * jnp.sum((m - jax.lax.stop_gradient(diff)) ** 2)
        gen_loss = -jnp.sum(jax.lax.stop_gradient(m) * fake_mean)
        metrics = {"distance": jnp.sum(diff**2)}
        if "val_sum" in frozen["release"]:
            val_target, _ = self.targets(frozen["release"]["val_sum"])
            metrics["val_distance"] = jnp.sum((val_target - fake_mean) ** 2)
        return m_loss + gen_loss, metrics

    def optimizer(self, default: Any) -> Any:
        """The config's optimizer for the generator; Adam(m_learning_rate, b1) for m."""
        m_opt = optax.adam(self.config.m_learning_rate, b1=self.config.b1)
        return optax.multi_transform({"gen": default, "m": m_opt}, {"gen": "gen", "m": "m"})

    def _generate(self, gen: base.PyTree, key: jax.Array, labels: jax.Array) -> jax.Array:
        z = jax.random.normal(key, (labels.shape[0], self.config.z_dim))
        cond = labels if self.spec.num_classes > 0 else None
        return self.generator.apply({"params": gen}, z, cond)

    def loss_per_example(self, trainable, frozen, example, key):
        raise NotImplementedError("DP-MEPF has no per-example loss: it releases once.")

    def sample(self, params, key, n, labels=None):
        """``n`` images in [-1, 1] from the generator (balanced labels if none given)."""
        k_label, k_z = jax.random.split(key)
        if labels is None:
            labels = jax.random.randint(k_label, (n,), 0, self.classes)
        return self._generate(params.trainable["gen"], k_z, jnp.asarray(labels, jnp.int32))


def _unit(v: jax.Array) -> jax.Array:
    """Rows of ``v`` scaled to unit L2 norm (a zero row stays zero: norm <= 1 always)."""
    norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
    return v / jnp.maximum(norm, 1e-12)


def _load_features(workdir: str, spec: base.DataSpec):
    """(widths, EMA FeatureCNN params as NumPy, the run's plan dict) of a classifier run."""
    import numpy as np

    from dpjax import sample as sample_lib  # Deferred: sample imports the method registry.
    from dpjax.methods import classifier

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"method_args.features_from={workdir!r} is not a directory.")
    source, params, source_spec, _, step = sample_lib.load_trained(workdir)
    if not isinstance(source, classifier.Classifier):
        raise ValueError(
            f"features_from={workdir!r} holds a {type(source).__name__} run, not a classifier "
            "(train one with experiments/features_mnist.py)."
        )
    if tuple(source_spec.image_shape) != tuple(spec.image_shape):
        raise ValueError(
            f"features_from={workdir!r} was trained on {source_spec.image_shape} images; this "
            f"data is {spec.image_shape}. Resize the data or train a matching network."
        )
    # The plan the loaded checkpoint itself records (dp_plan.json alone could be edited).
    # The steps behind the weights loaded are the checkpoint's own step. The plan file's
    # steps_done is written after each checkpoint and lags it if the run was killed in
    # between; composing that count would leave trained steps out of epsilon.
    plan = {**provenance.checked_source_plan("features_from", workdir, step),
            "steps_done": int(step)}
    net = jax.tree_util.tree_map(np.asarray, params.trainable["net"])
    return tuple(source.config.widths), net, plan


def make(config: Config, spec: base.DataSpec) -> DPMEPF:
    return DPMEPF(config, spec)


def make_released(config: Config, spec: base.DataSpec, record: dict) -> DPMEPF:
    """DP-MEPF rebuilt from an export: the feature network's shape from ``record``
    (``DPMEPF.release_record``); its weights and the release are the export's."""
    if not isinstance(record.get("features"), dict):
        raise ValueError("model_config.json has no rebuild.features record (an export "
                         "from before dpjax wrote one); export the run again.")
    return DPMEPF(config, spec, released_features=record["features"])
