"""The loss's arithmetic dtype (``dp.compute_dtype``): autocast for mixed precision.

Guarantees of ``in_compute_dtype``: the returned loss runs its matmuls and convolutions
in the compute dtype, but every cast sits INSIDE the function, so its gradient w.r.t.
float32 parameters is float32 and per-example clipping, summation and noise stay float32
(``dpjax.privacy.clipping``). The privacy guarantee does not depend on the compute dtype:
the sensitivity bound holds for any per-example gradient, however it was computed, as
long as an example's clipped contribution is scaled by the norm of that same
contribution, which every clipping path does (the layerwise and ghost paths form theirs
from the layers' bfloat16 inputs and cotangents with float32 accumulation:
``cast_params``, ``dpjax.privacy.unfolding``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

#: The compute dtypes of the loss (``dp.compute_dtype``); None: as the parameters are.
COMPUTE_DTYPES: dict[str, Any] = {"float32": None, "bfloat16": jnp.bfloat16}


#: Flax layers whose inputs ``in_compute_dtype`` casts (autocast): the matmuls and
#: convolutions, where the time goes. Everything else keeps the dtype JAX promotes to.
AUTOCAST_LAYERS: tuple[type, ...] = (
    nn.Dense,
    nn.DenseGeneral,
    nn.Conv,
    nn.ConvTranspose,
    nn.Einsum,
)


def _cast(tree: PyTree, to: Any) -> PyTree:
    """Floating leaves of ``tree`` cast to ``to``; integer and key leaves untouched."""

    def one(x):
        is_float = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(to) if is_float else x

    return jax.tree_util.tree_map(one, tree)


def check_compute_dtype(compute_dtype: str) -> None:
    """Raises ValueError for an unknown compute dtype (every clipping path takes each)."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"Unknown compute dtype '{compute_dtype}': use one of {list(COMPUTE_DTYPES)}."
        )


def cast_params(tree: PyTree, compute_dtype: str) -> PyTree:
    """``tree``'s floating leaves in ``compute_dtype`` (the tree itself for 'float32').

    What the layerwise and ghost paths are given under bfloat16: they know a layer's
    parameters by identity inside the loss, and ``in_compute_dtype``'s own cast of
    leaves already in the compute dtype returns them unchanged, so the layers see these
    very arrays. A layer's gradient w.r.t. them is its gradient w.r.t. the float32
    parameters (the transpose of the cast casts it back).
    """
    check_compute_dtype(compute_dtype)
    dtype = COMPUTE_DTYPES[compute_dtype]
    return tree if dtype is None else _cast(tree, dtype)


def in_compute_dtype(loss_fn: LossFn, compute_dtype: str) -> LossFn:
    """``loss_fn`` with its matmuls and convolutions in ``compute_dtype``, outputs float32.

    Autocast, as mixed-precision training does it: inside the returned function the
    parameters, frozen weights and examples are cast to the compute dtype, and the
    inputs of every Flax layer in ``AUTOCAST_LAYERS`` are cast too (through
    ``nn.intercept_methods``). The cast is needed because values a loss creates itself
    (noise draws, time embeddings) are float32 and would promote every layer after them
    back to float32. Other operations (normalization, softmax, the loss) run in the dtype
    JAX promotes to. As all casts are INSIDE the function, ``jax.grad`` of it w.r.t.
    float32 parameters is float32 (the transpose of a cast casts the cotangent back).
    Integer and key inputs (labels, PRNG keys) are untouched. 'float32' returns
    ``loss_fn`` itself. A loss whose model is not made of Flax layers gets the parameter
    casts only.

    Raises:
      ValueError: an unknown dtype name.
    """
    check_compute_dtype(compute_dtype)
    dtype = COMPUTE_DTYPES[compute_dtype]
    if dtype is None:
        return loss_fn

    def autocast(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, AUTOCAST_LAYERS):
            args, kwargs = _cast((args, kwargs), dtype)
        return next_fun(*args, **kwargs)

    def loss(trainable, frozen, example, key):
        with nn.intercept_methods(autocast):
            out = loss_fn(_cast(trainable, dtype), _cast(frozen, dtype), _cast(example, dtype), key)
        return _cast(out, jnp.float32)

    return loss
