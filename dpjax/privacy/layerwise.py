"""Per-example gradients layer by layer, from activations and output cotangents.

The fast clipping path (``clipping_impl='layerwise'``). For a layer y = f(a; W) applied
to the rows of one example, the example's gradient is dL_i/dW = J_W(a_i)^T g_i with
g_i = dL_i/dy_i. Because examples never interact (no BatchNorm), g_i is also the
gradient of the SUMMED loss w.r.t. y_i, so ONE ordinary backward pass of sum_i L_i,
taken w.r.t. zero "taps" added to every layer's output, yields every g_i; the inputs
a_i are recorded on the forward pass. Each layer's per-example gradient is then a
batched matrix product (dense: a_i^T g_i; convolution and transposed convolution:
patches(a_i)^T g_i; norms and embeddings: the layer's own VJP per example), the
book-keeping idea of Bu et al., "Differentially private optimization on large model at
small cost" (ICML 2023), and the per-sample-gradient hooks of Opacus, done in one pass.
The expensive part of ``vmap(grad)`` (per-example weight gradients as grouped
convolutions) is replaced by plain matrix products on the tensor cores.

Guarantees of ``per_example_grads``:
* It returns, for every trainable leaf, the (B, *leaf.shape) per-example gradients, equal
  to ``vmap(grad(loss_fn))`` up to floating-point rounding (tested against it).
* It fails closed: a trainable leaf that is not owned by a supported layer (Dense, Conv,
  Embed, GroupNorm, LayerNorm, ConvTranspose, ...) called through ``__call__``, or that is
  transformed before use (a merged update W + B A, a dtype cast), raises ValueError naming the leaf
  instead of silently getting a wrong gradient. Use ``clipping_impl='vmap'`` then.
* A trainable leaf used by the loss outside its layer (e.g. a weight-decay term in the
  loss) is detected at trace time and raises ValueError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class _Call:
    """One call of a layer that owns trainable leaves."""

    module: nn.Module  # unbound clone, for the generic rule
    names: tuple[str, ...]  # its trainable parameter names
    leaf_ids: tuple[int, ...]  # id() of those leaves, as seen inside the loss
    out_shape: tuple[int, ...]  # per-example output shape


def _direct(params: Mapping) -> dict[str, Any]:
    return {k: v for k, v in params.items() if not isinstance(v, Mapping)}


class _Recorder:
    """Flax method interceptor: taps layer outputs and records layer inputs.

    ``taps`` None means discovery (record calls and output shapes, change nothing).
    Otherwise ``taps[i]`` (zeros) is added to the i-th recorded call's output.
    """

    def __init__(self, trainable: PyTree, taps: list[jax.Array] | None, zero_params: bool = False):
        self.ids = {id(x): i for i, x in enumerate(jax.tree_util.tree_leaves(trainable))}
        self.taps = taps
        self.zero_params = zero_params
        self.calls: list[_Call] = []
        self.inputs: list[tuple[jax.Array, ...]] = []
        self.unsupported: list[str] = []

    def _trainable_direct(self, module: nn.Module) -> dict[str, jax.Array]:
        params = module.variables.get("params", {}) if module.scope is not None else {}
        return {k: v for k, v in params.items() if not isinstance(v, Mapping) and id(v) in self.ids}

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        own = self._trainable_direct(module)
        if not own or (context.method_name == "setup" and _rule_for(module) is not None):
            # The library layers' setup only declares parameters.
            return next_fun(*args, **kwargs)
        where = "/".join(module.path) or type(module).__name__
        supported = (
            context.method_name == "__call__"
            and not kwargs
            and all(isinstance(a, jax.Array) for a in args)
            and _rule_for(module) is not None
            and (
                _rule_for(module) != "generic"
                or len(own) == len(_direct(module.variables.get("params", {})))
            )
        )
        if not supported:
            self.unsupported.append(f"{where} ({type(module).__name__}.{context.method_name})")
            return next_fun(*args, **kwargs)
        clone = module.clone(parent=None)
        if self.zero_params:
            # Used by the outside-use check: the layer sees constants, so any remaining
            # dependence of the loss on a trainable leaf is a use outside its layer.
            params = {
                k: (jnp.zeros(v.shape, v.dtype) if k in own else v)
                for k, v in module.variables["params"].items()
            }
            return clone.apply({"params": params}, *args)
        out = next_fun(*args, **kwargs)
        index = len(self.calls)
        self.calls.append(
            _Call(clone, tuple(own), tuple(self.ids[id(v)] for v in own.values()), tuple(out.shape))
        )
        self.inputs.append(tuple(args))
        if self.taps is not None:
            out = out + self.taps[index].astype(out.dtype)
        return out


# ---------------------------------------------------------------------------------------
# Per-layer rules. Unfold: (module, inputs (B, ...), cotangent (B, ...)) -> Unfolded;
# the patch and generic rules: -> {name: (B, *shape)}.


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


def _dense_unfold(module: nn.Dense, inputs, g: jax.Array) -> Unfolded:
    """A dense layer over the last axis is a 1-offset patch layer: T = all other positions."""
    del module
    a = inputs[0].astype(jnp.float32)
    g = g.astype(jnp.float32)
    b = a.shape[0]
    a = a.reshape(b, -1, a.shape[-1])
    return Unfolded(
        a, np.zeros((1, 1), np.int32), a.shape[1:2], (1,), b, g.reshape(b, -1, g.shape[-1])
    )


def _conv_supported(module: nn.Module) -> bool:
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
    a = inputs[0].astype(jnp.float32)
    g = g.astype(jnp.float32)
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


def _patch_rule(module: nn.Module, unfolded: Unfolded) -> dict[str, jax.Array]:
    """Per-example kernel (and bias) gradients: one batched matrix product per kernel
    offset; the kernel comes out (B, offsets, C_in, C_out), the leaf's layout flattened."""
    gg = unfolded.gg
    w = unfolded.map(lambda v: jnp.einsum("btc,bto->bco", v, gg))
    out = {"kernel": jnp.moveaxis(w, 0, 1)}
    if module.use_bias:
        out["bias"] = jnp.sum(gg, axis=1)
    return out


def _explicit_padding(pad, n: int):
    if isinstance(pad, str):
        return pad
    return [
        (p, p) if isinstance(p, int) else tuple(p)
        for p in (pad if not isinstance(pad, int) else [pad] * n)
    ]


def _conv_unfold(module: nn.Conv, inputs, g: jax.Array) -> Unfolded:
    n = len(tuple(module.kernel_size))
    return _patch_views(
        module,
        inputs,
        g,
        _tuple(module.strides, n),
        _explicit_padding(module.padding, n),
        _tuple(module.input_dilation, n),
    )


def _conv_transpose_unfold(module: nn.ConvTranspose, inputs, g: jax.Array) -> Unfolded:
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


def _generic_rule(module: nn.Module, inputs, g: jax.Array, names, params) -> dict[str, jax.Array]:
    """Any self-contained layer: vmap over examples of the layer's own VJP w.r.t. its params.

    Cheap for layers whose parameter gradient is elementwise or a reduction (norm
    scales/offsets, embeddings); exact for any layer that uses its parameters only inside
    ``__call__``. Only used when ALL of the layer's parameters are trainable (``params``).
    """
    del names

    def one(args_i, g_i):
        out, vjp = jax.vjp(lambda p: module.apply({"params": p}, *args_i), params)
        (grads,) = vjp(g_i.astype(out.dtype))
        return grads

    return jax.vmap(one)(inputs, g)


def _conv_transpose_supported(module: nn.Module) -> bool:
    return (
        type(module) is nn.ConvTranspose
        and not module.transpose_kernel
        and module.mask is None
        and module.padding in ("SAME", "VALID")
    )


def _rule_for(module: nn.Module):
    if type(module) is nn.Dense:
        return _dense_unfold
    if type(module) is nn.Conv and _conv_supported(module):
        return _conv_unfold
    if _conv_transpose_supported(module):
        return _conv_transpose_unfold
    # Any other layer that has no submodules and whose parameters live in 'params' only.
    if isinstance(
        module,
        (
            nn.GroupNorm,
            nn.LayerNorm,
            nn.Embed,
            nn.ConvTranspose,
            nn.Conv,
            nn.DenseGeneral,
            nn.RMSNorm,
        ),
    ):
        return "generic"
    return None


# ---------------------------------------------------------------------------------------


def _paths(trainable: PyTree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]


def _check_no_outside_use(loss_fn: LossFn, trainable, frozen, example, key) -> None:
    """Raises if the loss depends on a trainable leaf other than through its layer.

    Traces the loss with every supported layer fed constant (zero) parameters; the
    trainable leaves that the traced program still reads are used outside their layers,
    where the layerwise rules would miss their gradient.
    """

    def f(t):
        rec = _Recorder(t, None, zero_params=True)
        with nn.intercept_methods(rec):
            loss, _ = loss_fn(t, frozen, example, key)
        return loss

    jaxpr = jax.make_jaxpr(f)(trainable)
    used = _used_invars(jaxpr.jaxpr)
    bad = [p for p, v in zip(_paths(trainable), jaxpr.jaxpr.invars) if v in used]
    if bad:
        raise ValueError(
            "clipping_impl='layerwise' cannot be used: the loss reads these trainable "
            f"parameters outside their layers: {bad[:5]}. Use clipping_impl='vmap'."
        )


def _used_invars(jaxpr) -> set:
    """Variables of ``jaxpr`` that reach its outputs (dead code ignored)."""
    is_var = lambda v: not hasattr(v, "val")  # Literals carry a value, Vars do not.
    live = {v for v in jaxpr.outvars if is_var(v)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars) or eqn.effects:
            live.update(v for v in eqn.invars if is_var(v))
    return live


@dataclasses.dataclass
class Recording:
    """What one ordinary backward pass gives the per-layer rules (``record``).

    Attributes:
      loss: (B,) per-example losses; aux: their auxiliary scalars {name: (B,)}.
      calls: every call of a layer owning trainable leaves, in call order.
      inputs: per call, its inputs with a leading example axis (B, ...).
      cotangents: per call, dL_i/dy_i of its output (B, ...), for every example i.
      leaves: the trainable leaves, in ``tree_leaves`` order (``_Call.leaf_ids`` index it).
      treedef: the trainable tree's structure.
    """

    loss: jax.Array
    aux: dict[str, jax.Array]
    calls: list[_Call]
    inputs: list[tuple[jax.Array, ...]]
    cotangents: list[jax.Array]
    leaves: list[jax.Array]
    treedef: Any


def record(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
) -> Recording:
    """Layer inputs and output cotangents of every example, from one backward pass.

    Guarantees: the returned calls cover every trainable leaf through a supported layer,
    and the loss reads no trainable leaf outside its layer, or ValueError is raised (see
    the module docstring). Rows with mask False have zero cotangents.
    """
    ex0 = jax.tree_util.tree_map(lambda x: x[0], examples)

    def discover(t):
        rec = _Recorder(t, None)
        with nn.intercept_methods(rec):
            loss_fn(t, frozen, ex0, keys[0])
        return rec

    holder = {}

    def shapes(t):
        holder["rec"] = discover(t)
        return 0

    jax.eval_shape(shapes, trainable)
    found: _Recorder = holder["rec"]
    paths = _paths(trainable)
    if found.unsupported:
        raise ValueError(
            "clipping_impl='layerwise' does not support these layers owning trainable "
            f"parameters: {sorted(set(found.unsupported))[:5]}. Use clipping_impl='vmap'."
        )
    covered = {i for c in found.calls for i in c.leaf_ids}
    missing = [paths[i] for i in range(len(paths)) if i not in covered]
    if missing:
        raise ValueError(
            "clipping_impl='layerwise' needs every trainable leaf to be a parameter of a "
            f"supported layer used as is; these are not: {missing[:5]}. "
            "Use clipping_impl='vmap'."
        )
    _check_no_outside_use(loss_fn, trainable, frozen, ex0, keys[0])

    size = mask.shape[0]
    taps = [jnp.zeros((size, *c.out_shape), jnp.float32) for c in found.calls]

    def total(taps_, t):
        def one(tap_i, ex_i, key_i):
            rec = _Recorder(t, tap_i)
            with nn.intercept_methods(rec):
                loss, aux = loss_fn(t, frozen, ex_i, key_i)
            return loss, aux, rec.inputs

        loss, aux, inputs = jax.vmap(one)(taps_, examples, keys)
        return jnp.sum(jnp.where(mask, loss, 0.0)), (loss, aux, inputs)

    cotangents, (loss, aux, inputs) = jax.grad(total, has_aux=True)(taps, trainable)
    return Recording(
        loss=loss,
        aux=aux,
        calls=found.calls,
        inputs=list(inputs),
        cotangents=list(cotangents),
        leaves=jax.tree_util.tree_leaves(trainable),
        treedef=jax.tree_util.tree_structure(trainable),
    )


def unfold(rec: Recording, j: int) -> Unfolded | None:
    """The ``Unfolded`` input of call ``j`` for Dense, Conv and ConvTranspose; None for a
    layer handled by the generic rule."""
    rule = _rule_for(rec.calls[j].module)
    if rule == "generic":
        return None
    return rule(rec.calls[j].module, rec.inputs[j], rec.cotangents[j])


def call_grads(rec: Recording, j: int, unfolded: Unfolded | None = None) -> dict[str, jax.Array]:
    """Per-example gradients {name: (B, *leaf.shape)} (float32) of call ``j``'s leaves."""
    call = rec.calls[j]
    unfolded = unfold(rec, j) if unfolded is None else unfolded
    if unfolded is None:
        params = {name: rec.leaves[i] for name, i in zip(call.names, call.leaf_ids)}
        per = _generic_rule(call.module, rec.inputs[j], rec.cotangents[j], call.names, params)
    else:
        per = _patch_rule(call.module, unfolded)
    size = rec.loss.shape[0]
    return {
        name: per[name].astype(jnp.float32).reshape((size, *rec.leaves[i].shape))
        for name, i in zip(call.names, call.leaf_ids)
    }


def per_example_grads(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    examples: PyTree,
    mask: jax.Array,
    keys: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
    """Per-example losses, aux values and gradients w.r.t. ``trainable``, layer by layer.

    Args:
      loss_fn: ``loss_fn(trainable, frozen, example, key) -> (loss, aux)`` for ONE example;
        it must apply flax modules to its parameters unchanged.
      trainable, frozen, examples, mask, keys: as in ``clipping.clipped_grad_sum``.

    Returns:
      (loss (B,), aux {name: (B,)}, grads with leaves (B, *leaf.shape) in float32). Rows
      with mask False have zero gradient; rows with a non-finite loss may have non-finite
      gradients (the caller drops them).

    Raises:
      ValueError: a trainable leaf is not covered by a supported layer, or is used
        outside it (see the module docstring).
    """
    rec = record(loss_fn, trainable, frozen, examples, mask, keys)
    grads: dict[int, jax.Array] = {}
    for j, call in enumerate(rec.calls):
        per = call_grads(rec, j)
        for name, i in zip(call.names, call.leaf_ids):
            grads[i] = grads[i] + per[name] if i in grads else per[name]
    leaves = [grads[i] for i in range(len(rec.leaves))]
    return rec.loss, rec.aux, jax.tree_util.tree_unflatten(rec.treedef, leaves)
