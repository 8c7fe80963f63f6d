"""A classifier trained through the train loop: the public feature network of DP-MEPF.

DP-MEPF needs a feature extractor trained on PUBLIC data (dpjax/methods/dpmepf.py reads
this method's checkpoint through ``features_from``). It is an ordinary run of the one
train loop with ``dp.enabled=False`` on public data (experiments/features_mnist.py); the
same method trained with DP on private data is a DP classifier. The per-example loss is
the cross-entropy of the ``FeatureCNN``; the model has GroupNorm only, so it is safe
under per-example clipping. It generates no images: ``sample`` refuses clearly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dpjax.methods import base
from dpjax.models import feature_cnn


@dataclasses.dataclass(frozen=True)
class Config:
    """Classifier settings.

    Attributes:
      widths: channels of the FeatureCNN stages (two 3x3 convolutions each).
      label_smoothing: cross-entropy label smoothing.
    """

    widths: tuple[int, ...] = (32, 64, 128)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 4:
            raise ValueError(f"method_args.widths must be channels >= 4, got {self.widths}.")


class Classifier(base.Method):
    """Trainable {'net': FeatureCNN params}; nothing frozen."""

    name = "classifier"

    def __init__(self, config: Config, spec: base.DataSpec) -> None:
        if spec.num_classes < 2:
            raise ValueError("The classifier needs a labelled dataset (data.num_classes >= 2).")
        self.config = config
        self.spec = spec
        self.net = feature_cnn.FeatureCNN(spec.num_classes, tuple(config.widths))

    def init(self, key: jax.Array, spec: base.DataSpec) -> base.Params:
        x = jnp.zeros((1, *spec.image_shape), jnp.float32)
        return base.Params(trainable={"net": self.net.init(key, x)["params"]})

    def logits(self, trainable: base.PyTree, images: jax.Array) -> jax.Array:
        """Class logits of (N, H, W, C) images in [-1, 1]."""
        return self.net.apply({"params": trainable["net"]}, images)[0]

    def loss_per_example(self, trainable, frozen, example, key):
        """Cross-entropy of ONE example (with optional label smoothing)."""
        del frozen, key
        logits = self.logits(trainable, jnp.asarray(example["image"], jnp.float32)[None])[0]
        target = jax.nn.one_hot(example["label"], self.spec.num_classes)
        target = optax.smooth_labels(target, self.config.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, target)
        correct = (jnp.argmax(logits) == example["label"]).astype(jnp.float32)
        return loss, {"accuracy": correct}

    def sample(self, params, key, n, labels=None):
        raise NotImplementedError(
            "A classifier run generates no images; it is the feature network of DP-MEPF "
            "(method_args.features_from). Set train.grid_samples=0."
        )


def make(config: Config, spec: base.DataSpec) -> Classifier:
    return Classifier(config, spec)
