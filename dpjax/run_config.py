"""Typed sections of a run's config (what train.py reads), and their conversion.

Everything below ``train.py`` takes these frozen dataclasses, never a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

import ml_collections
import numpy as np

from dpjax import atomic_file, typed_config
from dpjax.data.config import DataConfig
from dpjax.methods import METHODS, get_method_module, is_import_path

# The choices of the string fields below, so that a typo fails when the config is read,
# before a workdir is written (tests/test_bad_inputs.py checks they match the
# implementations' tables: accounting.ACCOUNTANTS, clipping.MICROBATCH_IMPLS, ...).
AccountantName = Literal["rdp", "pld"]
RelationName = Literal["add_or_remove_one", "replace_one", "replace_special"]
ClippingName = Literal["vmap", "layerwise", "ghost"]
ComputeDtypeName = Literal["float32", "bfloat16"]
MicrobatchLoopName = Literal["auto", "unroll", "loop"]
OptimizerName = Literal["adam", "adamw", "sgd"]


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings. Give ``epsilon`` (sigma is calibrated) or ``noise_multiplier``."""

    enabled: bool = True
    epsilon: float | None = 10.0
    noise_multiplier: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    batch_size: int = 4096  # expected batch size B; q = B / N
    epochs: float = 300.0
    steps: int = 0  # if > 0, overrides epochs
    accountant: AccountantName = "rdp"
    neighbouring: RelationName = "add_or_remove_one"
    microbatch_size: int = 64  # 0: the largest that fits the memory (privacy/microbatch.py)
    # 'vmap' (the reference), 'layerwise' (faster at K=1 on GPU) or 'ghost' (ghost norms
    # where cheaper, no per-example gradients there); the same sum (privacy/clipping.py).
    clipping: ClippingName = "vmap"
    # The per-example losses' arithmetic: 'float32' or 'bfloat16' (any clipping path);
    # gradients, clipping, the sum and the noise stay float32 (privacy/clipping.py).
    compute_dtype: ComputeDtypeName = "float32"
    # How the micro-batches of one step run: 'loop' (a traced loop that stops after the
    # last real one), 'unroll' (all of them, unrolled) or 'auto' (unrolled on CPU up to
    # 8 micro-batches, where XLA:CPU runs convolutions in loop bodies slowly); the same
    # sum either way (privacy/clipping.py).
    microbatch_loop: MicrobatchLoopName = "auto"
    # The noise and the Poisson batches from a secret drawn when the run starts, kept in
    # the workdir (privacy/noise_secret.py). False: from config.seed, reproducible across
    # workdirs but recomputable by anyone who knows or guesses the seed: for research
    # and tests, never for a release (export refuses such a run).
    secret_noise: bool = True

    def __post_init__(self) -> None:
        _at_least(self, "dp", {"batch_size": 1, "steps": 0, "microbatch_size": 0})
        if not self.clip_norm > 0.0:
            raise typed_config.ConfigError(f"dp.clip_norm must be > 0, got {self.clip_norm}.")
        if not 0.0 < self.delta < 1.0:
            raise typed_config.ConfigError(f"dp.delta must be in (0, 1), got {self.delta}.")
        if not 0.0 <= self.epochs < math.inf:
            raise typed_config.ConfigError(
                f"dp.epochs must be >= 0 and finite, got {self.epochs}."
            )
        if self.epsilon is not None and not self.epsilon > 0.0:
            raise typed_config.ConfigError(f"dp.epsilon must be > 0 (or None), got {self.epsilon}.")
        # Sigma 0 is allowed: a run without noise, reported as epsilon inf (export refuses it).
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0.0:
            raise typed_config.ConfigError(
                f"dp.noise_multiplier must be >= 0 (or None), got {self.noise_multiplier}.")


def _at_least(section: Any, where: str, minimums: dict[str, int]) -> None:
    """Raises ConfigError naming the first field of ``section`` below its minimum."""
    for key, low in minimums.items():
        if getattr(section, key) < low:
            raise typed_config.ConfigError(
                f"{where}.{key} must be >= {low}, got {getattr(section, key)}."
            )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings (optax)."""

    name: OptimizerName = "adam"
    learning_rate: float = 3e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        # Each would train silently wrong (a negative rate ascends the loss; b1 = 1
        # never forgets the first gradient; eps = 0 divides by zero where a gradient is
        # zero, e.g. at LoRA's zero-initialized factors).
        checks = (
            ("learning_rate", self.learning_rate > 0.0, "> 0"),
            ("b1", 0.0 <= self.b1 < 1.0, "in [0, 1)"),
            ("b2", 0.0 <= self.b2 < 1.0, "in [0, 1)"),
            ("eps", self.eps > 0.0, "> 0"),
            ("weight_decay", self.weight_decay >= 0.0, ">= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
        )
        for key, ok, want in checks:
            if not ok:
                raise typed_config.ConfigError(
                    f"optim.{key} must be {want}, got {getattr(self, key)}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop settings."""

    ema_rate: float = 0.999
    ema_warmup: bool = True
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    max_steps_per_run: int = 0  # stop this invocation after this many steps (0: no limit)
    # Stop this invocation, with a checkpoint, once this much wall time has passed (0: no
    # limit); a rerun resumes. For job time limits (SLURM, lent GPUs).
    max_seconds_per_run: float = 0.0
    grid_samples: int = 100  # samples in the grid written at the end (0: none)
    progress: bool = True
    # Data parallelism (dpjax/parallel.py): 1 = one device (the reference path), 0 = all
    # devices of the job (every host's), n = the first n. Not part of the run's identity:
    # a run may resume on another device count (same numbers up to float rounding).
    num_devices: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_rate < 1.0:  # 1 would never move the released weights.
            raise typed_config.ConfigError(
                f"train.ema_rate must be in [0, 1) (0: no averaging), got {self.ema_rate}.")
        _at_least(self, "train", {"log_every": 1, "ckpt_every": 1, "keep_checkpoints": 1,
                                  "max_steps_per_run": 0, "grid_samples": 0,
                                  "num_devices": 0})
        if not self.max_seconds_per_run >= 0.0:
            raise typed_config.ConfigError(
                f"train.max_seconds_per_run must be >= 0, got {self.max_seconds_per_run}.")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Checkpoint-based sampling defaults (``--mode=sample``)."""

    num: int = 60000
    batch_size: int = 1000
    png: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(self, "sample", {"num": 1, "batch_size": 1})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run."""

    seed: int
    method: str
    method_args: Any
    data: DataConfig
    dp: DPConfig
    optim: OptimConfig
    train: TrainConfig
    sample: SampleConfig
    eval: Any = None


def from_configdict(config: ml_collections.ConfigDict) -> RunConfig:
    """Checks and converts a whole experiment config. Raises ConfigError on any bad key."""
    d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for k in d:
        if k not in known:
            raise typed_config.ConfigError(
                f"Unknown config section '{k}'.{typed_config.suggest(k, sorted(known))} "
                f"Valid sections: {sorted(known)}."
            )
    for k in ("seed", "method", "data", "dp", "optim", "train"):
        if k not in d:
            raise typed_config.ConfigError(f"The config has no '{k}' section.")
    seed = typed_config.as_int(d["seed"], "seed")
    # SeedSequence takes no negative entropy; jax.random.key keeps 32 bits, so seed 2**32
    # would alias seed 0 (the same init and, with dp.secret_noise=False, the same noise).
    if not 0 <= seed < 2**32:
        raise typed_config.ConfigError(f"seed must be in [0, 2**32), got {seed}.")
    if not isinstance(d["method"], str):
        raise typed_config.ConfigError(
            f"method: expected one method name (a string), got {d['method']!r}. "
            f"Known methods: {sorted(METHODS)}."
        )
    if d["method"] not in METHODS and not is_import_path(d["method"]):
        # Checked first: a registered module's import errors are bugs.
        known = sorted(METHODS)
        raise typed_config.ConfigError(
            f"Unknown method {d['method']!r}.{typed_config.suggest(str(d['method']), known)}"
            f" Known methods: {known}, or the import path of a method module "
            "(e.g. 'my_lab.dp_vae')."
        )
    try:
        module = get_method_module(d["method"])
    except ValueError as e:  # An import path that does not import, or lacks the contract.
        raise typed_config.ConfigError(str(e)) from e
    return RunConfig(
        seed=seed,
        method=d["method"],
        method_args=typed_config.from_configdict(
            module.Config, d.get("method_args", {}), "method_args"
        ),
        data=typed_config.from_configdict(DataConfig, d["data"], "data"),
        dp=typed_config.from_configdict(DPConfig, d["dp"], "dp"),
        optim=typed_config.from_configdict(OptimConfig, d["optim"], "optim"),
        train=typed_config.from_configdict(TrainConfig, d["train"], "train"),
        sample=typed_config.from_configdict(SampleConfig, d.get("sample", {}), "sample"),
        eval=d.get("eval") or {},
    )


def check_private_data_spec(cfg: RunConfig) -> None:
    """Raises ConfigError where a private (DP) run's data section would let the private
    files decide something outside the DP mechanism (checked when a run starts, and by
    export for a run that began before a check; a stored config is still readable for
    sampling and eval).

    * A folder dataset needs ``data.image_size`` and ``data.channels``. The image shape
      fixes the model's architecture, and the export publishes both. Read from a folder
      (0) it is a function of the private files: one colour image among grey ones made
      every image RGB (release-boundary review, 2026-12-07), so adding one example
      changed a published fact with certainty. Other sources have one shape per
      dataset (an npz array, a TFDS feature), not one per file.
    * ``data.limit`` is refused: it keeps the first rows in the source's order, so a file
      added to the source can push another out (the trained set then differs by one
      added and one removed example), and a source with fewer rows grows. The stated
      add-or-remove-one guarantee per contributor would not hold (taint review,
      2026-12-07). Make the subset a dataset of its own (a folder, an npz file) instead.
    """
    data = cfg.data
    if not cfg.dp.enabled:
        return
    if data.limit:
        raise typed_config.ConfigError(
            f"data.limit={data.limit} is refused for a private run: it keeps the source's "
            "first rows, so adding one file could push another out and the guarantee per "
            "person would be that of replacing one, not of adding or removing one. Train "
            "on a folder or npz file that holds exactly the subset instead."
        )
    if data.source != "folder":
        return
    missing = [k for k in ("image_size", "channels") if not getattr(data, k)]
    if missing:
        raise typed_config.ConfigError(
            f"A private folder dataset needs {' and '.join('data.' + k for k in missing)} "
            "set (image_size > 0; channels 1 or 3): measured on the private files, the "
            "image shape (which fixes the model and is published with it) would depend on "
            "them outside the DP guarantee. E.g. --config.data.image_size=32 "
            "--config.data.channels=3."
        )


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """A JSON rendering of the experiment config (stored in the workdir).

    NumPy scalars are written as the numbers they hold, so that the run's config, read
    back from ``config.json``, converts to the same ``RunConfig``; a non-finite float as
    'inf', '-inf' or 'nan' (``atomic_file.json_safe``: strict JSON, which float settings
    read back, ``typed_config.NON_FINITE``); anything else that JSON cannot hold is
    written as its ``str``.
    """
    return json.dumps(atomic_file.json_safe(config.to_dict()), indent=2, sort_keys=True,
                      default=_json_value, allow_nan=False)


def _json_value(value: Any) -> Any:
    """``json.dumps``'s fallback: NumPy scalars as Python numbers, the rest as text."""
    return value.item() if isinstance(value, np.generic) else str(value)
