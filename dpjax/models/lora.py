"""Low-rank adapters (LoRA; Hu et al., ICLR 2022) for any flax model, without editing it.

For every targeted dense or 1x1-convolution layer y = x W + b, the adapted layer is

    y = x W + b + (alpha / r) (x A) B,   A: (d_in, r), B: (r, d_out),

(Hu et al. Eq. 3). B starts at zero, so at initialization the adapted model computes
exactly the pre-trained one (tested). The adapters live in their own tree
``{module_path: {'A': ..., 'B': ...}}`` and are applied through a flax method
interceptor, so the pre-trained parameters stay untouched and can be frozen. Adapter keys
are module paths joined by '.'.

Targets are regular expressions searched in the layer's module path (e.g.
``attn.*NIN_[0-2]`` for the attention projections). A target that matches no dense or
1x1-conv layer is an error (``discover``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.typed_config import ConfigError


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A targeted layer: its kind and its input/output widths."""

    kind: str  # 'dense' or 'conv1x1'
    d_in: int
    d_out: int


def _kind(module: nn.Module) -> str | None:
    if type(module) is nn.Dense:
        return "dense"
    if type(module) is nn.Conv:
        size = module.kernel_size
        sizes = (size,) if isinstance(size, int) else tuple(size)
        strides = module.strides
        unit = strides is None or all(s == 1 for s in ((strides,) if isinstance(strides, int)
                                                       else strides))  # fmt: skip
        if all(k == 1 for k in sizes) and unit and module.feature_group_count == 1:
            return "conv1x1"
    return None


def _path(module: nn.Module) -> str:
    return "/".join(module.path)


def _key(path: str) -> str:
    # Adapter-tree keys use '.' (checkpoint formats treat '/' in a key as a directory).
    return path.replace("/", ".")


def discover(
    apply_fn: Callable[[], Any], targets: Sequence[str]
) -> dict[str, LayerShape]:
    """The layers ``targets`` select, found by tracing ``apply_fn`` (a closure that applies
    the model once). Shapes only: nothing is computed.

    Only dense and 1x1 stride-1 convolutions are adapted; other layers a target also
    matches (norms, the blocks containing the layers) are left as they are.

    Raises:
      ValueError: a target matches no dense or 1x1-conv layer.
    """
    regexes = [(t, re.compile(t)) for t in targets]
    found: dict[str, LayerShape] = {}
    hit = {t: False for t in targets}

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = _path(context.module)
        matched = [t for t, r in regexes if path and r.search(path)]
        if not matched:
            return next_fun(*args, **kwargs)
        kind = _kind(context.module)
        out = next_fun(*args, **kwargs)
        if kind is None:  # e.g. the norm or the container a broad pattern also matches
            return out
        for t in matched:
            hit[t] = True
        found[_key(path)] = LayerShape(kind, int(args[0].shape[-1]), int(out.shape[-1]))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(apply_fn)
    missing = [t for t, ok in hit.items() if not ok]
    if missing:
        # A setting (method_args.lora_targets), reported in one line.
        raise ConfigError(f"LoRA targets {missing} match no dense or 1x1-conv layer.")
    return found


def init(key: jax.Array, layers: Mapping[str, LayerShape], rank: int) -> dict:
    """Adapters with A ~ N(0, 1/d_in) and B = 0 (the adapted model starts unchanged)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}.")
    out = {}
    for i, (path, shape) in enumerate(sorted(layers.items())):
        k = jax.random.fold_in(key, i)
        a = jax.random.normal(k, (shape.d_in, rank)) / math.sqrt(shape.d_in)
        out[path] = {"A": a, "B": jnp.zeros((rank, shape.d_out))}
    return out


@contextlib.contextmanager
def applied(adapters: Mapping[str, Mapping[str, jax.Array]], scale: float) -> Iterator[None]:
    """Within this context, flax layers at the adapters' paths add scale * (x A) B."""

    def add_low_rank(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        ad = adapters.get(_key(_path(context.module)))
        if ad is None:
            return out
        # (x A) B as two bias-free Dense layers applied to the adapter leaves as they are,
        # so the per-layer clipping paths (privacy/layerwise.py, privacy/ghost.py) see A
        # and B as ordinary Dense kernels; the arithmetic is the einsum's.
        x = args[0].astype(jnp.float32)
        rank, d_out = ad["B"].shape
        h = nn.Dense(rank, use_bias=False).apply({"params": {"kernel": ad["A"]}}, x)
        low = nn.Dense(d_out, use_bias=False).apply({"params": {"kernel": ad["B"]}}, h)
        return out + (scale * low).astype(out.dtype)

    with nn.intercept_methods(add_low_rank):
        yield


def count(adapters: Mapping[str, Mapping[str, jax.Array]]) -> int:
    """Number of adapter parameters."""
    return sum(int(v.size) for ad in adapters.values() for v in ad.values())
