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

from dpjax.privacy import unfolding
from dpjax.typed_config import ConfigError

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class _Call:
    """One call of a layer that owns trainable leaves."""

    module: nn.Module  # unbound clone, for the generic rule
    names: tuple[str, ...]  # its trainable parameter names
    leaf_ids: tuple[int, ...]  # id() of those leaves, as seen inside the loss
    out_shape: tuple[int, ...]  # per-example output shape
    out_dtype: Any  # the output's dtype: its tap's, hence its cotangent's


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
            _Call(
                clone,
                tuple(own),
                tuple(self.ids[id(v)] for v in own.values()),
                tuple(out.shape),
                out.dtype,
            )
        )
        self.inputs.append(tuple(args))
        if self.taps is not None:
            out = out + self.taps[index]
        return out


# ---------------------------------------------------------------------------------------
# Per-layer rules: dense, convolution and transposed convolution unfold (``unfolding``);
# any other self-contained layer takes the generic rule -> {name: (B, *shape)}.


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



def _rule_for(module: nn.Module):
    if type(module) is nn.Dense:
        return unfolding.dense_unfold
    if type(module) is nn.Conv and unfolding.conv_supported(module):
        return unfolding.conv_unfold
    if unfolding.conv_transpose_supported(module):
        return unfolding.conv_transpose_unfold
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


# A user's choice (dp.clipping) that does not fit the model: a ConfigError, one line.
_FAST_PATHS = "The fast clipping paths (clipping_impl / dp.clipping 'layerwise' and 'ghost')"
_USE_VMAP = "Use clipping_impl='vmap' (dp.clipping='vmap', the reference path)."


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
        raise ConfigError(
            f"{_FAST_PATHS} cannot be used: the loss reads these trainable parameters "
            f"outside their layers: {bad[:5]}. {_USE_VMAP}"
        )


def _used_invars(jaxpr) -> set:
    """Variables of ``jaxpr`` that reach its outputs differentiably (dead code ignored).

    A value read only through ``stop_gradient`` contributes no gradient, so that use is
    no use here: e.g. DP-SAD's adversarial term applies the discriminator with stopped
    parameters, and the gradients of those parameters come from its other call alone.
    """
    is_var = lambda v: not hasattr(v, "val")  # Literals carry a value, Vars do not.
    live = {v for v in jaxpr.outvars if is_var(v)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.primitive.name == "stop_gradient":
            continue
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
      cotangents: per call, dL_i/dy_i of its output (B, ...), for every example i, in
        the output's dtype (bfloat16 for a bfloat16 layer).
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
    the module docstring). Rows with mask False have zero cotangents where their inputs
    are finite (a NaN in a padding row can reach its cotangent as 0 * NaN); the sums
    never read such rows (``clipping._finish`` weights them 0 and zeroes them first).
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
        raise ConfigError(
            f"{_FAST_PATHS} do not support these layers owning trainable parameters: "
            f"{sorted(set(found.unsupported))[:5]}. {_USE_VMAP}"
        )
    covered = {i for c in found.calls for i in c.leaf_ids}
    missing = [paths[i] for i in range(len(paths)) if i not in covered]
    if missing:
        raise ConfigError(
            f"{_FAST_PATHS} need every trainable leaf to be a parameter of a supported "
            f"layer used as is; these are not: {missing[:5]}. {_USE_VMAP}"
        )
    _check_no_outside_use(loss_fn, trainable, frozen, ex0, keys[0])

    size = mask.shape[0]
    # Each tap in its layer's output dtype, so that a bfloat16 layer's cotangent comes
    # back as the bfloat16 array the backward pass computed (not widened to float32,
    # which would double the memory and the traffic of the per-example products).
    taps = [jnp.zeros((size, *c.out_shape), c.out_dtype) for c in found.calls]

    def total(taps_, t):
        def one(tap_i, ex_i, key_i):
            rec = _Recorder(t, tap_i)
            with nn.intercept_methods(rec):
                loss, aux = loss_fn(t, frozen, ex_i, key_i)
            return loss, aux, rec.inputs

        loss, aux, inputs = jax.vmap(one)(taps_, examples, keys)
        return jnp.sum(jnp.where(mask, loss, 0.0)), (loss, aux, inputs)

    # Under jit even when called eagerly: the recorder knows a trainable leaf by identity,
    # and eagerly ``stop_gradient`` of a concrete array IS that array, so a call with
    # stopped parameters (DP-SAD's adversarial term) would be recorded here but not in
    # the discovery above (traced: a new value), and the taps would not line up.
    grad_fn = jax.jit(jax.grad(total, has_aux=True))
    cotangents, (loss, aux, inputs) = grad_fn(taps, trainable)
    return Recording(
        loss=loss,
        aux=aux,
        calls=found.calls,
        inputs=list(inputs),
        cotangents=list(cotangents),
        leaves=jax.tree_util.tree_leaves(trainable),
        treedef=jax.tree_util.tree_structure(trainable),
    )


def unfold(rec: Recording, j: int) -> unfolding.Unfolded | None:
    """The ``unfolding.Unfolded`` input of call ``j`` for Dense, Conv and ConvTranspose;
    None for a layer handled by the generic rule."""
    rule = _rule_for(rec.calls[j].module)
    if rule == "generic":
        return None
    return rule(rec.calls[j].module, rec.inputs[j], rec.cotangents[j])


def call_grads(
    rec: Recording, j: int, unfolded: unfolding.Unfolded | None = None
) -> dict[str, jax.Array]:
    """Per-example gradients {name: (B, *leaf.shape)} (float32) of call ``j``'s leaves."""
    call = rec.calls[j]
    unfolded = unfold(rec, j) if unfolded is None else unfolded
    if unfolded is None:
        params = {name: rec.leaves[i] for name, i in zip(call.names, call.leaf_ids)}
        per = _generic_rule(call.module, rec.inputs[j], rec.cotangents[j], call.names, params)
    else:
        per = unfolding.patch_rule(call.module, unfolded)
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
      with mask False and finite inputs have zero gradient; rows with a non-finite loss
      or input may have non-finite gradients (the caller drops them).

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
