"""The locked base config every experiment overrides, and the string-argument parser.

Usage in an experiment file::

    @common.arguments_take_effect
    def get_config(arg: str = "") -> ml_collections.ConfigDict:
        args = common.parse_args(arg, {"eps": 10.0, "smoke": False})
        c = common.base_config("dpdm", dpdm.Config())
        ...  # overrides
        return common.finalize(c)

The config is locked by ``finalize``: assigning a key that the base does not have (a
typo) raises at once, and so does an unknown ``key=value`` in the argument string, or
an argument that a preset flag (``smoke``, ``quick``, ...) overrides
(``arguments_take_effect``).
"""

from __future__ import annotations

import ast
import difflib
import functools
from collections.abc import Callable
from typing import Any

import ml_collections

from dpjax import run_config
from dpjax.data.config import DataConfig
from dpjax.eval.config import EvalConfig, eval_config
from dpjax.privacy.sampling import PoissonSampler
from dpjax.typed_config import ConfigError, to_configdict


def base_config(method: str, method_config: Any) -> ml_collections.ConfigDict:
    """All sections with their defaults; ``method_config`` is the method's Config()."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = method
    c.method_args = to_configdict(method_config)
    c.data = to_configdict(DataConfig())
    c.dp = to_configdict(run_config.DPConfig())
    c.optim = to_configdict(run_config.OptimConfig())
    c.train = to_configdict(run_config.TrainConfig())
    c.sample = to_configdict(run_config.SampleConfig())
    c.eval = to_configdict(EvalConfig())
    return c


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(arg: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Parses 'eps=1,smoke' into a dict over ``defaults``; a bare name means True.

    Raises:
      ConfigError: for a name not in ``defaults`` (with a suggestion and the valid names).
    """
    out = dict(defaults)
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown experiment argument '{name}'.{hint} Valid arguments: "
                f"{', '.join(f'{k}={v!r}' for k, v in defaults.items())}."
            )
        out[name] = _parse_value(value.strip()) if sep else True
    return out


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
    out = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(config.to_dict(), "")
    return out


def arguments_take_effect(
    get_config: Callable[[str], ml_collections.ConfigDict],
) -> Callable[[str], ml_collections.ConfigDict]:
    """Wraps an experiment's ``get_config``: an argument that a preset flag overrides is
    a ConfigError, not a silent no-op.

    Presets (``quick``, ``cpu``) set values that other arguments set too, and an
    experiment applies them last: ``dpdm_fmnist.py:quick,batch=64`` trained at quick's
    batch of 32, and ``quick,cpu`` was the ``cpu`` run. So, when flags are given (a bare
    name, or ``name=True``), each argument must change the config: a ``key=value`` that
    changes it without the flags but not with them, or a flag that another flag undoes,
    is refused, with the ``--config`` override that does what was meant (overrides apply
    after the experiment). A ``key=value`` equal to its default changes nothing anyway
    and passes. ``smoke`` is exempt: it replaces the data, the model and the DP settings
    by design (a pipeline check of any point, e.g. a whole sweep's), so what it
    overrides is meant to be overridden.
    """

    @functools.wraps(get_config)
    def checked(arg: str = "") -> ml_collections.ConfigDict:
        config = get_config(arg)
        parts = list(dict.fromkeys(p.strip() for p in (arg or "").split(",") if p.strip()))
        if any(p.split("=", 1)[0].strip() == "smoke" for p in parts):
            return config
        flags = [p for p in parts
                 if "=" not in p or _parse_value(p.split("=", 1)[1].strip()) is True]
        if not flags:
            return config
        flat = _flat(config)
        for part in parts:
            rest = [p for p in parts if p != part]
            if _flat(get_config(",".join(rest))) != flat:
                continue  # It takes effect.
            others = [p for p in flags if p != part]
            if part in flags:
                if others:
                    raise ConfigError(f"Experiment argument '{part}' has no effect with "
                                      f"{others}: give one of them.")
                continue
            values = [p for p in parts if p not in flags]
            alone = _flat(get_config(",".join(values)))
            without = _flat(get_config(",".join(p for p in values if p != part)))
            changed = {k: v for k, v in alone.items() if without.get(k) != v}
            if changed:
                overrides = " ".join(f"--config.{k}={v!r}" for k, v in changed.items())
                raise ConfigError(
                    f"Experiment argument '{part}' has no effect with {flags}, which set "
                    f"{sorted(changed)} themselves. Give it as an override after the "
                    f"experiment instead: {overrides}"
                )
        return config

    checked.arguments_take_effect = True  # What tests check every experiment for.
    return checked


def smoke_overrides(
    c: ml_collections.ConfigDict,
    num_classes: int = 10,
    image_shape: tuple[int, int, int] = (28, 28, 1),
) -> None:
    """Fake data, 2 DP steps, tiny batches: what the test suite runs for every experiment."""
    c.data.source = "fake"
    c.data.num_classes = num_classes
    c.data.fake_num_examples = 64
    c.data.fake_image_shape = image_shape
    c.data.limit = 0
    c.data.image_size = 0
    c.data.center_crop = 0
    c.dp.batch_size = 8
    c.dp.steps = 2
    # A given sigma, not a calibrated one: calibration is tested on its own, and a
    # 2-step plan at epsilon 10 has a tiny sigma that makes accounting slow.
    c.dp.epsilon = None
    c.dp.noise_multiplier = 1.0
    # One micro-batch per step (64 x 1/8 pads to 32): each extra micro-batch is another
    # compiled copy of the per-example gradient on CPU (unrolled), or a slow loop body.
    # Micro-batching itself is tested on its own (test_microbatch, test_privacy_engine).
    c.dp.microbatch_size = 32
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.train.grid_samples = max(num_classes, 4)
    c.train.progress = False
    c.sample.num = 8
    c.sample.batch_size = 8
    c.eval.num_samples = 20
    c.eval.sample_batch = 20
    c.eval.fid = False
    c.eval.downstream_models = ("logreg",)
    c.eval.downstream_epochs = 1


def cpu_quick_training(
    c: ml_collections.ConfigDict,
    steps: int,
    num_examples: int = 60_000,
    batch_size: int = 32,
) -> None:
    """The README demo's training size (``dpdm_fmnist.py:quick``), shared by the quick
    diffusion runs built on its UNet (DP-SAD's student too): ``steps`` DP steps of an
    expected batch of ``batch_size`` (the demo: 32) out of ``num_examples`` private
    images, Adam 2e-3, EMA 0.9, a log line every 5 steps and a checkpoint every 10.

    The step is sized for a CPU: the 'ghost' clipping path (the same clipped sum as the
    reference, ``dpjax/privacy/ghost.py``) on ONE micro-batch holding the whole padded
    Poisson batch (32 + 6 std + 1 = 67 rows). Against the reference path in 5 unrolled
    micro-batches of 16 (80 rows, the setting before), back to back on 2 cores
    (``benchmarks/results.md``): the demo's first step (trace, compile, run) 68 -> 27 s,
    later steps 2.7 -> 1.5 s, the whole run 185 -> 100 s; DP-SAD's student 76 -> 41 s
    and 2.7 -> 2.0 s.
    """
    c.dp.batch_size = batch_size
    c.dp.steps = steps
    c.dp.clipping = "ghost"
    # A batch above the padded size (rare: 2.1e-8 per step for the demo's 32 of 60,000)
    # becomes two micro-batches.
    sampler = PoissonSampler(num_examples, batch_size / num_examples, seed=0)
    c.dp.microbatch_size = sampler.base_size
    c.optim.learning_rate = 2e-3
    c.train.ema_rate = 0.9
    c.train.log_every = 5
    c.train.ckpt_every = 10


def non_private_training(
    c: ml_collections.ConfigDict, batch: int, steps: int, learning_rate: float | None = None
) -> None:
    """Public pre-training: the same loop with DP off (no clipping, no noise, no
    epsilon), ``steps`` steps of an expected ``batch`` examples in one micro-batch; the
    learning rate is set when given."""
    c.dp.enabled = False
    c.dp.epsilon = None
    c.dp.batch_size = batch
    c.dp.steps = steps
    c.dp.microbatch_size = batch
    if learning_rate is not None:
        c.optim.learning_rate = learning_rate


def small_dpdm_unet(
    c: ml_collections.ConfigDict,
    nf: int,
    attn_resolutions: tuple[int, ...],
    num_steps: int,
    sample_batch: int,
    noise_multiplicity: int = 2,
) -> None:
    """A small 2-level DPDM UNet (quick CPU runs and smoke tests), one block per level."""
    c.method_args.unet = "custom"
    c.method_args.nf = nf
    c.method_args.ch_mult = (1, 2)
    c.method_args.num_res_blocks = 1
    c.method_args.attn_resolutions = attn_resolutions
    c.method_args.noise_multiplicity = noise_multiplicity
    c.method_args.num_steps = num_steps
    c.method_args.sample_batch = sample_batch


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config (typos become errors) and checks it converts to typed sections."""
    c.lock()
    run_config.from_configdict(c)
    eval_config(c.eval)
    return c
