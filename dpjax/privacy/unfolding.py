"""How a layer's input unfolds into per-example kernel gradients (``layerwise``, ``ghost``).

For y = conv(a, W) (a dense layer is the case of one kernel offset), example i's kernel
gradient at offset o is view(o)_i^T g_i: ``Unfolded`` holds the padded input and the
output cotangent and visits the offsets one at a time. ``dense_unfold``, ``conv_unfold``
and ``conv_transpose_unfold`` build it for flax's Dense, Conv and ConvTranspose;
``patch_rule`` turns it into per-example gradients.

Operand dtype: a layer that ran in bfloat16 (``dp.compute_dtype='bfloat16'``) is unfolded
from its bfloat16 input and cotangent (``_operands``), and ``patch_rule`` multiplies them
with float32 accumulation (``preferred_element_type``). The product of two bfloat16
numbers is exact in float32 (8 + 8 significand bits < 24), so this gives the per-example
gradients of widening both operands to float32 first, up to the order of the float32
sums, at half the memory and traffic and at the matrix units' bfloat16 rate. Any other
mix of dtypes is widened to float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Unfolded:
    """The unfolded input of one layer call, read one kernel offset at a time.

    For y = conv(a, W) (a dense layer is the case of one offset), example i's kernel
    gradient at offset o is ``view(o)_i^T gg_i``, where ``view(o)`` (B, T, C_in) is the
    input each of the T output positions (copies included) sees through offset o.
    ``map`` and ``fold`` visit the offsets in a ``lax.scan``, so only ONE view exists at
    a time: built all at once, XLA kept prod(kernel) copies of the input alive (9x for a
    3x3 kernel: 56 MB instead of 14 MB for one 64-channel 28x28 layer at B = 32; DPDM's
    whole layerwise DP step at B = 32 held 1,151 MB of temporaries on the CPU, 643 MB
    with the scan; ``benchmarks/results.md``).

    Attributes:
      source: the padded (and, for transposed convolutions, dilated) input,
        (B * copies, *spatial, C_in).
      starts: (offsets, spatial dims) int32, where each offset's window starts.
      window: the extent of one view in ``source`` before striding.
      strides: the output positions' stride in ``source``.
      examples: B.
      gg: the output cotangent, (B, T, C_out).
    """

    source: jax.Array
    starts: np.ndarray
    window: tuple[int, ...]
    strides: tuple[int, ...]
    examples: int
    gg: jax.Array

    def as_float32(self) -> Unfolded:
        """The same unfolding with float32 operands (exact: a widening)."""
        return dataclasses.replace(
            self, source=self.source.astype(jnp.float32), gg=self.gg.astype(jnp.float32)
        )

    @property
    def offsets(self) -> int:
        """Kernel offsets (1 for a dense layer)."""
        return int(self.starts.shape[0])

    @property
    def c_in(self) -> int:
        """Input channels of one offset."""
        return int(self.source.shape[-1])

    def view(self, start: jax.Array | np.ndarray) -> jax.Array:
        """(B, T, C_in): the input seen through the offset starting at ``start`` (a NumPy
        start is sliced statically, a traced one dynamically)."""
        src = self.source
        size = (src.shape[0], *self.window, src.shape[-1])
        if isinstance(start, np.ndarray):
            begin = (0, *(int(x) for x in start), 0)
            src = lax.slice(src, begin, tuple(x + n for x, n in zip(begin, size)))
        else:
            src = lax.dynamic_slice(src, (0, *(start[d] for d in range(len(self.window))), 0), size)
        if any(st > 1 for st in self.strides):
            src = src[(slice(None), *(slice(None, None, st) for st in self.strides))]
        return src.reshape(self.examples, -1, src.shape[-1])

    def map(self, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """``fn(view(o))`` stacked over offsets o (leading axis, ``np.ndindex`` order)."""
        if self.offsets == 1:
            return fn(self.view(self.starts[0]))[None]
        _, out = lax.scan(lambda c, st: (c, fn(self.view(st))), 0, jnp.asarray(self.starts))
        return out

    def fold(self, fn: Callable[[jax.Array, jax.Array], jax.Array], init: jax.Array) -> jax.Array:
        """``fn(... fn(fn(init, view(0)), view(1)) ..., view(last))``."""
        if self.offsets == 1:
            return fn(init, self.view(self.starts[0]))
        step = lambda acc, st: (fn(acc, self.view(st)), None)  # noqa: E731
        return lax.scan(step, init, jnp.asarray(self.starts))[0]


def _operands(a: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The layer's input and cotangent as the per-example products take them.

    A cotangent in bfloat16 means the layer's output was bfloat16, and flax's Dense, Conv
    and ConvTranspose cast the input and kernel to their output's dtype before
    multiplying (``promote_dtype``): the input is then taken in bfloat16 too, the very
    values the layer multiplied (the recorded input may be the float32 value before an
    autocast, ``compute_dtype.in_compute_dtype``). Otherwise both are widened to float32.
    """
    if g.dtype == jnp.bfloat16:
        return a.astype(jnp.bfloat16), g
    return a.astype(jnp.float32), g.astype(jnp.float32)


def dense_unfold(module: nn.Dense, inputs, g: jax.Array) -> Unfolded:
    """A dense layer over the last axis is a 1-offset patch layer: T = all other positions."""
    del module
    a, g = _operands(inputs[0], g)
    b = a.shape[0]
    a = a.reshape(b, -1, a.shape[-1])
    return Unfolded(
        a, np.zeros((1, 1), np.int32), a.shape[1:2], (1,), b, g.reshape(b, -1, g.shape[-1])
    )


def conv_supported(module: nn.Module) -> bool:
    if type(module) is not nn.Conv or module.feature_group_count != 1:
        return False
    if module.mask is not None:
        return False
    pad = module.padding
    return pad in ("SAME", "VALID") or not isinstance(pad, str)


def _tuple(v, n: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(v)


def _patch_views(
    module: nn.Module,
    inputs,
    g: jax.Array,
    window_strides: tuple[int, ...],
    padding,
    lhs_dilation: tuple[int, ...],
) -> Unfolded:
    """The unfolded input of y = conv(a, W) written as ``lax.conv_general_dilated(a, W,
    window_strides, padding, lhs_dilation, rhs_dilation=kernel_dilation)`` in flax's
    channels-last layout (``Unfolded``): dL_i/dW[o] = view(o)_i^T gg_i. Slicing costs
    memory traffic only; ``lax.conv_general_dilated_patches`` would instead run a
    convolution with a one-hot kernel C_in * prod(kernel) channels wide."""
    kernel_size = tuple(module.kernel_size)
    n = len(kernel_size)
    rhs_dilation = _tuple(module.kernel_dilation, n)
    a, g = _operands(inputs[0], g)
    b = a.shape[0]
    a = a.reshape((-1, *a.shape[-(n + 1) :]))  # (B * copies, *spatial, C_in)
    spatial = a.shape[1:-1]
    dilated = tuple((s - 1) * d + 1 for s, d in zip(spatial, lhs_dilation))
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dilation))
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(dilated, extent, window_strides, padding)
    config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)]
    a = lax.pad(a, jnp.zeros((), a.dtype), [*config, (0, 0, 0)])
    out_sizes = tuple(
        (p - e) // st + 1 for p, e, st in zip(a.shape[1:-1], extent, window_strides)
    )
    starts = np.array(
        [[o * d for o, d in zip(offset, rhs_dilation)] for offset in np.ndindex(*kernel_size)],
        np.int32,
    )
    window = tuple((o - 1) * st + 1 for o, st in zip(out_sizes, window_strides))
    return Unfolded(a, starts, window, tuple(window_strides), b, g.reshape(b, -1, g.shape[-1]))


def patch_rule(module: nn.Module, unfolded: Unfolded) -> dict[str, jax.Array]:
    """Per-example kernel (and bias) gradients in float32: one batched matrix product per
    kernel offset, accumulated in float32 whatever the operands' dtype; the kernel comes
    out (B, offsets, C_in, C_out), the leaf's layout flattened."""
    gg = unfolded.gg
    f32 = jnp.float32
    w = unfolded.map(lambda v: jnp.einsum("btc,bto->bco", v, gg, preferred_element_type=f32))
    out = {"kernel": jnp.moveaxis(w, 0, 1)}
    if module.use_bias:
        out["bias"] = jnp.sum(gg, axis=1, dtype=f32)
    return out


def _explicit_padding(pad, n: int):
    if isinstance(pad, str):
        return pad
    return [
        (p, p) if isinstance(p, int) else tuple(p)
        for p in (pad if not isinstance(pad, int) else [pad] * n)
    ]


def conv_unfold(module: nn.Conv, inputs, g: jax.Array) -> Unfolded:
    n = len(tuple(module.kernel_size))
    return _patch_views(
        module,
        inputs,
        g,
        _tuple(module.strides, n),
        _explicit_padding(module.padding, n),
        _tuple(module.input_dilation, n),
    )


def conv_transpose_unfold(module: nn.ConvTranspose, inputs, g: jax.Array) -> Unfolded:
    """``lax.conv_transpose`` (transpose_kernel=False) is a stride-1 convolution of the
    input dilated by the strides, with the padding below; the patch rule applies."""
    kernel_size = tuple(module.kernel_size)
    n = len(kernel_size)
    strides = _tuple(module.strides, n)
    pad = module.padding
    pads = []  # lax.conv_transpose's padding of the dilated input, per spatial dim
    for k, d, st in zip(kernel_size, _tuple(module.kernel_dilation, n), strides):
        k = (k - 1) * d + 1  # the dilated kernel's extent
        if pad == "SAME":
            pad_len = k + st - 2
            pad_a = k - 1 if st > k - 1 else -(-pad_len // 2)
        else:  # 'VALID'
            pad_len = k + st - 2 + max(k - st, 0)
            pad_a = k - 1
        pads.append((pad_a, pad_len - pad_a))
    return _patch_views(module, inputs, g, (1,) * n, pads, strides)



def conv_transpose_supported(module: nn.Module) -> bool:
    return (
        type(module) is nn.ConvTranspose
        and not module.transpose_kernel
        and module.mask is None
        and module.padding in ("SAME", "VALID")
    )

