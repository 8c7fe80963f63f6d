"""A VGG-style CNN whose convolution outputs serve as perceptual features (DP-MEPF).

DP-MEPF (Harder et al., TMLR 2023) takes the pre-activation outputs of every
convolution of a network trained on PUBLIC data (ImageNet VGG19 for CIFAR/CelebA; a
ResNet18 trained on CIFAR-10 for Fashion-MNIST), flattens and concatenates them. This
is the same idea at the size of small images: ``blocks`` stages of two 3x3 convolutions
(GroupNorm, ReLU), 2x2 average pooling between stages, and a linear classifier on the
globally pooled last stage, so the network can be trained as a classifier on public
labelled data. GroupNorm, not BatchNorm, so that the same network can also be trained
with DP-SGD and a feature never depends on another image.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import group_norm


class FeatureCNN(nn.Module):
    """``__call__(x) -> (logits, features)``; features are the pre-ReLU conv outputs.

    Attributes:
      num_classes: classifier outputs (the public training task).
      widths: channels of each stage (two 3x3 convolutions per stage).
    """

    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        features = []
        for i, width in enumerate(self.widths):
            if i > 0:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            for j in range(2):
                x = nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{i}_{j}")(x)
                features.append(x)  # Pre-activation, as DP-MEPF's forward hooks.
                x = nn.GroupNorm(group_norm.num_groups(width), name=f"norm_{i}_{j}")(x)
                x = nn.relu(x)
        logits = nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(-3, -2)))
        return logits, features


def layer_sizes(image_shape: tuple[int, int, int], widths: tuple[int, ...]) -> list[int]:
    """Length of each convolution's flattened output for one image, in network order."""
    h, w, _ = image_shape
    sizes = []
    for i, width in enumerate(widths):
        if i > 0:
            h, w = -(-h // 2), -(-w // 2)
        sizes += [h * w * width] * 2
    return sizes


def num_features(
    image_shape: tuple[int, int, int], widths: tuple[int, ...], layers: tuple[int, ...] = ()
) -> int:
    """Length of the concatenated feature vector of one image (``layers``: all if empty)."""
    sizes = layer_sizes(image_shape, widths)
    return sum(sizes[i] for i in layers) if layers else sum(sizes)
