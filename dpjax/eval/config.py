"""The ``eval`` section of an experiment: what ``--mode=eval`` computes, checked early.

``check_eval`` runs when training starts (``run_setup``) and again before an eval reads
its checkpoint, so a mistyped key or an out-of-range count fails in seconds, not after
hours of training and sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from dpjax import sample as sample_lib
from dpjax.diffusion import samplers
from dpjax.typed_config import ConfigError, from_configdict

# The dataset splits FID compares with, and the classifiers of dpjax.eval.downstream (its
# DOWNSTREAM_MODELS; named here so that a config is checked without importing flax models).
FID_SPLITS = ("train", "test")
DOWNSTREAM_MODEL_NAMES = ("logreg", "mlp", "cnn")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``--mode=eval`` computes (the ``eval`` section of an experiment).

    Attributes:
      num_samples: synthetic images to generate (DPDM: 60,000).
      sample_batch: images per sampling call; 0 (default) picks ``sample_batch_size``'s
        choice for the backend. The samples depend on it (batch i is drawn with its
        own key), so eval.json records the value used.
      fid: compute FID (TF Inception 2015-12-05, pool3) against each reference split.
      fid_references: splits of the experiment's dataset to compare with.
      fid_batch: Inception batch size; 0 (default) picks ``fid_batch_size``'s choice
        for the backend. Cached features are keyed on it (it changes the floating
        point), so a split's features are reused only at the same batch size (its FID
        statistics at any: ``dpjax.eval.feature_cache``).
      inception_weights: a weights file; '' searches the usual places
        (dpjax.eval.inception_weights).
      downstream: train classifiers on the labelled samples, test on the real test set.
      downstream_models: among 'logreg', 'mlp', 'cnn'.
      downstream_epochs: epochs per classifier (DPDM: 50); the epoch is selected on a
        held-out part of the synthetic data, never on the test set.
      memorization: nearest training image of each sample (pixels, and Inception
        features when ``fid``).
      bits_per_dim: for methods with a likelihood (``method.bits_per_dim``, e.g.
        DP-LFlow), the mean bits per dimension of the real test split (with its
        standard error over images).
      bits_per_dim_images: how many test images (the first ones; 0: all of them).
      likelihood_samples: importance samples per image where the likelihood integrates
        over a latent (``dpjax.eval.marginal_likelihood``).
      likelihood_mode_steps: L-BFGS steps of each image's posterior-mode search there
        (most of the cost; fewer steps give a looser bound).
      seed: sampling seed (a stream separate from training's).
      sampling: sampler settings to use instead of the run's (diffusion methods only;
        None keeps the run's), e.g. DPDM's Churn sampler
        ``--config.eval.sampling.sampler=heun --config.eval.sampling.s_churn=50``. The
        samples of other settings go to their own folder (``sample.samples_dir``).
    """

    num_samples: int = 60000
    sample_batch: int = 0
    fid: bool = True
    fid_references: tuple[str, ...] = ("train", "test")
    fid_batch: int = 0
    inception_weights: str = ""
    downstream: bool = True
    downstream_models: tuple[str, ...] = ("logreg", "mlp", "cnn")
    downstream_epochs: int = 50
    memorization: bool = True
    bits_per_dim: bool = True
    bits_per_dim_images: int = 0
    likelihood_samples: int = 128
    likelihood_mode_steps: int = 100
    seed: int = 0
    sampling: samplers.SamplerOverrides = samplers.SamplerOverrides()

    def __post_init__(self) -> None:
        # Checked here, so that training checks them at its start (run_setup) instead of
        # an eval failing after hours of sampling.
        for key, low in (("num_samples", 1), ("downstream_epochs", 1),
                         ("bits_per_dim_images", 0), ("likelihood_samples", 1),
                         ("likelihood_mode_steps", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"eval.{key} must be >= {low}, got {getattr(self, key)}.")
        for key, known in (("fid_references", FID_SPLITS),
                           ("downstream_models", DOWNSTREAM_MODEL_NAMES)):
            unknown = [v for v in getattr(self, key) if v not in known]
            if unknown:
                raise ConfigError(f"eval.{key}: unknown {unknown}; one or more of {list(known)}.")


def eval_config(section: Any) -> EvalConfig:
    """The typed eval section (an empty or missing section gives the defaults)."""
    return from_configdict(EvalConfig, section or {}, "eval")


# Batch sizes for eval.fid_batch = 0 and eval.sample_batch = 0. On a CPU small batches
# are faster, their activations staying nearer the caches; measured on the 2-core
# development machine (interleaved rounds): Inception 4.36 images/s at 8 against 3.22 at
# 200; the DPDM sampler (180k-parameter UNet, 30 steps) 10.4 at 50 against 8.3 at 400.
# On an accelerator a large batch fills the device.
_AUTO_BATCH = {"fid_batch": (8, 200), "sample_batch": (50, 1000)}


def _batch_for_backend(cfg: EvalConfig, name: str) -> int:
    value = getattr(cfg, name)
    if value < 0:
        raise ConfigError(f"eval.{name} must be >= 0 (0: chosen for the backend), got {value}")
    if value:
        return value
    cpu, accelerator = _AUTO_BATCH[name]
    return cpu if jax.default_backend() == "cpu" else accelerator


def fid_batch_size(cfg: EvalConfig) -> int:
    """The Inception batch: ``cfg.fid_batch``, or for 0 this backend's choice.

    8 on a CPU, 200 on a GPU or TPU (measurements next to ``_AUTO_BATCH``).
    """
    return _batch_for_backend(cfg, "fid_batch")


def check_eval(
    run_cfg: Any, cfg: EvalConfig | None = None
) -> tuple[EvalConfig, int, dict[str, Any]]:
    """(eval config, Inception batch, sampler changes) for a run: ``cfg``, or the run's
    ``eval`` section checked (keys, types, ranges), with its batch sizes and sampler
    changes checked too. Raises ConfigError. Training calls it at its start
    (``run_setup``), ``evaluate_workdir`` before it reads the checkpoint."""
    cfg = cfg or eval_config(run_cfg.eval)
    fid_batch = fid_batch_size(cfg)
    sample_batch_size(cfg)
    return cfg, fid_batch, sample_lib.sampler_changes(run_cfg, cfg.sampling)


def sample_batch_size(cfg: EvalConfig) -> int:
    """The sampler batch: ``cfg.sample_batch``, or for 0 this backend's choice.

    50 on a CPU, 1000 on a GPU or TPU (measurements next to ``_AUTO_BATCH``).
    """
    return _batch_for_backend(cfg, "sample_batch")
