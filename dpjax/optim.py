"""The optimizer a run's config names (optax); post-processing of the noised gradient."""

from __future__ import annotations

from typing import Any

import optax

from dpjax import run_config


def make_optimizer(cfg: run_config.OptimConfig) -> optax.GradientTransformation:
    """The optax optimizer of the config (Adam by default, as DPDM)."""
    lr: Any = cfg.learning_rate
    if cfg.warmup_steps > 0:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    if cfg.name == "adam":
        return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return optax.sgd(lr)
    raise ValueError(f"Unknown optimizer '{cfg.name}'; use 'adam', 'adamw' or 'sgd'.")
