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
embedding) set ``uses_dp_sgd = False`` and implement ``release_events`` (the release's
accounting as a function of sigma, for calibration) and ``private_release`` (the
release itself, called ONCE by the loop before step 0). The released values replace
``frozen['release']`` (placeholders of the same structure made by ``init``), the
release's records go into the run's accounting, and every later step is
post-processing: it trains on ``public_loss`` only and never reads private data.

Methods that build on an earlier release of the same private data (a teacher trained
with DP-SGD on it) list it in ``prior_releases``; the loop composes it into the
calibration, the budget and every report.
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
      values: the released (already noised) arrays; from here on they are public. Same
        structure, shapes and dtypes as the ``frozen['release']`` placeholders of ``init``.
      records: JSON-serializable records, one per Gaussian mechanism of the release, in
        the form ``privacy.report.release_event`` reads (kind, noise_multiplier,
        description); their composition is exactly this release.
    """

    values: PyTree
    records: tuple[dict[str, Any], ...]


class Method:
    """Base class of every method. Subclasses override what they need.

    Subclasses must keep every function pure (no Python side effects, no state on
    ``self`` that changes after construction) so that they can be jitted and vmapped.
    """

    #: Registry name, e.g. 'dpdm'.
    name: str = "base"
    #: Whether private data is accessed through DP-SGD on ``loss_per_example``.
    uses_dp_sgd: bool = True
    #: Whether ``sample`` draws images of the classes it is given (on labelled data). The
    #: downstream-accuracy evaluation trains classifiers on those labels, so a method
    #: whose samples ignore them (an autoencoder's decodings, an unconditional flow)
    #: sets it False and gets no accuracy, instead of a chance-level one.
    samples_follow_labels: bool = True

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

    def routing(self) -> Any:
        """None (default), or a ``privacy.clipping.Routing``: every example reads only
        ONE slice of the trainable tree's leading axis (e.g. one model per class), so the
        DP step differentiates and clips w.r.t. that slice alone. Same sum, 1/K the
        per-example gradient memory."""
        return None

    def public_loss(self, trainable: PyTree, frozen: PyTree, key: jax.Array) -> Any:
        """A data-independent loss term (default: none). Its gradient is added after noising.

        Returns None, a scalar, or (scalar, dict of scalar metrics).
        """
        del trainable, frozen, key
        return None

    def prior_releases(self) -> list[dict[str, Any]]:
        """Records of earlier releases of the SAME private data this method builds on.

        Default: none. A method that starts from a model trained on the private data
        (e.g. a DP teacher) must list that training here (a 'dpsgd' record, see
        ``privacy.report.release_event``) so that its epsilon is composed into the total.
        """
        return []

    def source_runs(self) -> list[Any]:
        """The runs whose weights this method loads (``privacy.provenance.Source`` each).

        Default: none. ``run_setup`` checks them before a private run builds its state
        (``provenance.check_sources``): none may be trained without DP on the private
        data, and one trained with DP on it must be composed (``prior_releases``).
        """
        return []

    def check_private_run(self) -> None:
        """Checks that only a private run needs, beyond ``source_runs``' (default: none).

        ``run_setup`` calls it when ``dp.enabled``, before anything is written, and export
        calls it before a release. A run without DP skips it, as it skips the source
        checks: its settings may name a source that would void a guarantee it does not
        claim (a non-private ablation). Raises ValueError (or PrivacyError) with what is
        wrong and how to mend it.
        """

    def privacy_notes(self) -> list[str]:
        """Sentences the privacy report adds on how this method's guarantee is obtained."""
        return []

    def release_events(self, noise_multiplier: float) -> list[Any]:
        """The dp_accounting events of this method's one release at ``noise_multiplier``.

        Only for ``uses_dp_sgd = False``; the plan calibrates sigma on these events.
        """
        del noise_multiplier
        raise NotImplementedError(f"{type(self).__name__} has no one-shot release.")

    def private_release(
        self, params: Params, images: jax.Array, labels: jax.Array, key: jax.Array, plan: Any
    ) -> Release:
        """The one-shot release computed on the whole private dataset (``uses_dp_sgd = False``).

        ``images`` are uint8 (N, H, W, C), ``labels`` (N,); ``plan.noise_multiplier`` is
        the calibrated sigma. Must match ``release_events(plan.noise_multiplier)``.
        """
        del params, images, labels, key, plan
        raise NotImplementedError(f"{type(self).__name__} has no one-shot release.")

    def exported_frozen(self, frozen: PyTree) -> PyTree:
        """The frozen parameters an export may publish (default: all of them).

        A method whose frozen part is not the released model (DP-SAD's teacher) returns
        only what may be published."""
        return frozen

    def release_record(self) -> dict[str, Any]:
        """JSON facts, beyond the method settings and the exported weights, that the
        module's ``make_released`` needs to rebuild this method from an export, without
        the source runs its ``*_from`` settings name (default: none). Only settings of
        those sources (architectures, preconditioning): never a path, a weight or a
        statistic of any data. ``export`` writes them into ``model_config.json``."""
        return {}

    def optimizer(self, default: Any) -> Any:
        """The optax optimizer (default: the config's). Post-processing of the noised
        gradient, so any choice keeps the guarantee (e.g. per-part learning rates)."""
        return default

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
