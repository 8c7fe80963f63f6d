"""The method contract: what every DP generative method supplies to the one train loop.

A method is a small object of pure functions over parameter pytrees. The train loop
owns the optimizer, the DP step, the accountant, checkpoints and logging; the method
owns only the model and the per-example objective.

Parameters are split in two pytrees that never mix:

* ``trainable``: the leaves the DP step differentiates, clips and noises.
* ``frozen``: everything else (a public autoencoder, a public feature extractor, the
  non-selected layers of a public pre-trained model). Closed over, never differentiated.

Privacy rule of the contract: anything a method repeats per example (DPDM's K noise
draws, augmentations, DP-SAD's timesteps) is averaged INSIDE ``loss_per_example`` so
that the unit of clipping stays the example and the sensitivity stays C. Nothing in a
method may compute a statistic across examples of a private batch (no BatchNorm).

Methods whose private access is not a DP-SGD loss (DP-MEPF's one-shot noised mean
embedding) implement ``private_release``; it returns the released values and the
``dp_accounting`` event that describes the release, and the loop composes that event
with everything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Example = Mapping[str, jax.Array]  # one example: {'image': (H, W, C) in [-1, 1], 'label': ()}
Batch = Mapping[str, jax.Array]  # the same with a leading batch axis


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a method may know about the private data without touching it.

    These are public facts (the shape of images and the number of classes), fixed by
    the experiment's config rather than measured on the private data.
    """

    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int  # 0 for unconditional data


@dataclasses.dataclass(frozen=True)
class Params:
    """A method's parameters, split into the part DP-SGD trains and the part it never touches."""

    trainable: PyTree
    frozen: PyTree = dataclasses.field(default_factory=dict)


jax.tree_util.register_dataclass(Params, data_fields=["trainable", "frozen"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Release:
    """A one-shot private release (e.g. DP-MEPF's noised embedding).

    Attributes:
      values: the released (already noised) arrays; from here on they are public.
      dp_event: the ``dp_accounting.DpEvent`` that describes exactly this release.
      description: a short human-readable line for the privacy report.
    """

    values: PyTree
    dp_event: Any
    description: str


class Method:
    """Base class of every method. Subclasses override what they need.

    Subclasses must keep every function pure (no Python side effects, no state on
    ``self`` that changes after construction) so that they can be jitted and vmapped.
    """

    #: Registry name, e.g. 'dpdm'.
    name: str = "base"
    #: Whether private data is accessed through DP-SGD on ``loss_per_example``.
    uses_dp_sgd: bool = True

    def init(self, key: jax.Array, spec: DataSpec) -> Params:
        """Returns freshly initialised parameters (or loads public pre-trained ones)."""
        raise NotImplementedError

    def loss_per_example(
        self, trainable: PyTree, frozen: PyTree, example: Example, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The loss of ONE example (no batch axis) and scalar auxiliary metrics.

        Any repetition (noise multiplicity, augmentations, timesteps) is averaged in here.
        """
        raise NotImplementedError

    def public_loss(self, trainable: PyTree, frozen: PyTree, key: jax.Array) -> jax.Array | None:
        """A data-independent loss term (default: none). Its gradient is added after noising."""
        del trainable, frozen, key
        return None

    def private_release(
        self, params: Params, images: np.ndarray, labels: np.ndarray, key: jax.Array, plan: Any
    ) -> Release | None:
        """A one-shot release computed on the private data (default: none)."""
        del params, images, labels, key, plan
        return None

    def sample(
        self, params: Params, key: jax.Array, n: int, labels: jax.Array | None = None
    ) -> jax.Array:
        """Returns ``n`` images in [-1, 1], shape (n, H, W, C). Never reads private data."""
        raise NotImplementedError


def count_params(tree: PyTree) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def to_model_range(images_uint8: jax.Array) -> jax.Array:
    """Maps uint8 pixels to [-1, 1] (DPDM: x * 2 - 1 for x in [0, 1])."""
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0
