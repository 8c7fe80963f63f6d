"""Counts the arithmetic of a traced JAX function, loops included: a hardware-free cost.

XLA's own ``cost_analysis()`` counts the body of a ``while`` loop once, whatever its trip
count (checked with jax 0.10.2: a 10-trip ``scan`` of a 64 x 64 matmul reports one
matmul's 524,288 FLOPs), and the DP step's fast paths run their convolution products in
9-trip scans and their micro-batches in loops. This module walks the step's jaxpr
instead, after dead-code elimination, and multiplies each scan body by its length.

What it counts:

* ``matmul_flops``: 2 x multiply-adds of every ``dot_general`` and
  ``conv_general_dilated``. A convolution with input dilation (the input gradient of a
  strided convolution) is counted as written, zeros included, on every path alike.
* ``other_flops``: one per output element of every other arithmetic primitive, one per
  input element of a reduction. A rough measure of the elementwise work, most of which
  XLA fuses into the matmuls' neighbours.
* ``unknown_trip_loops``: ``while`` loops whose trip count is not static; their bodies
  are counted ``while_trips`` times where the caller gives it, once otherwise. The DP
  step has one: its micro-batch ``fori_loop`` stops after the last micro-batch holding
  a real example, a trip count known only at run time (B / m when all rows are real, as
  in ``benchmarks/dp_step.py``). A ``fori_loop`` with static bounds is traced as a scan
  (its count is known); a ``while_loop`` never is.

``cond`` counts its most expensive branch. A ``shard_map`` body (one shard's shapes)
counts once per device of its manual mesh axes, so the count is the whole mesh's. Sub-jaxprs
of ``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat`` and the like are walked
where they are.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
from jax.extend import core as jex_core

try:  # The DCE pass is internal; without it the walk counts dead code too (an upper bound).
    from jax._src.interpreters.partial_eval import dce_jaxpr as _dce_jaxpr
except ImportError:  # pragma: no cover - other jax versions.
    _dce_jaxpr = None

# Data movement and bookkeeping: no arithmetic.
_MOVEMENT = frozenset(
    {
        "broadcast_in_dim",
        "reshape",
        "squeeze",
        "expand_dims",
        "transpose",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "gather",
        "scatter",
        "concatenate",
        "pad",
        "rev",
        "convert_element_type",
        "bitcast_convert_type",
        "copy",
        "copy_p",
        "iota",
        "device_put",
        "stop_gradient",
        "random_bits",
        "random_seed",
        "random_wrap",
        "random_unwrap",
        "threefry2x32",
        "sharding_constraint",
        "optimization_barrier",
    }
)
_REDUCTIONS = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "cumsum"}
)


@dataclasses.dataclass
class FlopCount:
    """Counts over one traced function (see the module docstring).

    Attributes:
      matmul_flops: 2 x multiply-adds of the dot products and convolutions.
      other_flops: elementwise outputs plus reduction inputs.
      unknown_trip_loops: ``while`` loops counted once for want of a static trip count.
      by_primitive: matmul FLOPs per primitive name ('dot_general', 'conv_general_dilated').
    """

    matmul_flops: float = 0.0
    other_flops: float = 0.0
    unknown_trip_loops: int = 0
    by_primitive: dict[str, float] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(float)
    )

    def add(self, other: FlopCount, times: float = 1.0) -> None:
        """Adds ``times`` copies of ``other`` to this count."""
        self.matmul_flops += times * other.matmul_flops
        self.other_flops += times * other.other_flops
        self.unknown_trip_loops += other.unknown_trip_loops
        for name, flops in other.by_primitive.items():
            self.by_primitive[name] += times * flops

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the counts (FLOPs)."""
        return {
            "matmul_flops": self.matmul_flops,
            "other_flops": self.other_flops,
            "unknown_trip_loops": self.unknown_trip_loops,
            "by_primitive": dict(sorted(self.by_primitive.items())),
        }


def _size(aval: Any) -> int:
    return math.prod(getattr(aval, "shape", ()))


def dot_general_flops(lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...], dims: Any) -> float:
    """2 x batch x M x K x N of a ``dot_general`` with dimension numbers ``dims``."""
    (_, rhs_contract), (_, rhs_batch) = dims
    shared = math.prod(rhs_shape[d] for d in (*rhs_contract, *rhs_batch))
    return 2.0 * math.prod(lhs_shape) * math.prod(rhs_shape) / max(shared, 1)


def conv_flops(out_shape: tuple[int, ...], rhs_shape: tuple[int, ...], rhs_out_dim: int) -> float:
    """2 x output elements x (kernel elements per output feature) of a convolution.

    Each output element contracts over the kernel's input features and spatial taps,
    ``prod(rhs_shape) / rhs_shape[rhs_out_dim]`` of them; this holds for feature and
    batch groups alike (the kernel's input-feature dimension is already per group).
    """
    return 2.0 * math.prod(out_shape) * math.prod(rhs_shape) / max(rhs_shape[rhs_out_dim], 1)


def _sub_jaxprs(value: Any) -> Iterable[Any]:
    """The jaxprs inside one equation parameter (a jaxpr, a closed jaxpr, or tuples)."""
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _eqn_count(eqn: Any, while_trips: int) -> FlopCount:
    """The count of one equation, its sub-jaxprs included."""
    name = eqn.primitive.name
    count = FlopCount()
    if name == "dot_general":
        lhs, rhs = (v.aval for v in eqn.invars[:2])
        flops = dot_general_flops(lhs.shape, rhs.shape, eqn.params["dimension_numbers"])
        count.matmul_flops += flops
        count.by_primitive[name] += flops
        return count
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        rhs_out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        flops = conv_flops(eqn.outvars[0].aval.shape, rhs.shape, rhs_out_dim)
        count.matmul_flops += flops
        count.by_primitive[name] += flops
        return count
    if name == "scan":
        count.add(jaxpr_count(eqn.params["jaxpr"].jaxpr, while_trips), times=eqn.params["length"])
        return count
    if name == "while":
        count.add(jaxpr_count(eqn.params["body_jaxpr"].jaxpr, while_trips), times=while_trips)
        count.add(jaxpr_count(eqn.params["cond_jaxpr"].jaxpr, while_trips), times=while_trips)
        count.unknown_trip_loops += 1
        return count
    if name == "cond":
        branches = [jaxpr_count(b.jaxpr, while_trips) for b in eqn.params["branches"]]
        count.add(max(branches, key=lambda c: c.matmul_flops + c.other_flops))
        return count
    if name == "shard_map":
        # The body holds one shard's shapes and runs on every device of its manual axes.
        mesh = eqn.params["mesh"]
        axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes") or ()
        shards = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in axes)
        count.add(jaxpr_count(eqn.params["jaxpr"], while_trips), times=shards)
        return count
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if subs:
        # A call-like primitive (pjit, custom_jvp_call, custom_vjp_call, remat, ...): its
        # first jaxpr is the one that runs (custom rules' other jaxprs are not called).
        count.add(jaxpr_count(subs[0], while_trips))
        return count
    if name in _REDUCTIONS:
        count.other_flops += sum(_size(v.aval) for v in eqn.invars)
    elif name not in _MOVEMENT:
        count.other_flops += sum(_size(v.aval) for v in eqn.outvars)
    return count


def jaxpr_count(jaxpr: Any, while_trips: int = 1) -> FlopCount:
    """The count of a (dead-code-eliminated) jaxpr, equation by equation."""
    count = FlopCount()
    for eqn in jaxpr.eqns:
        count.add(_eqn_count(eqn, while_trips))
    return count


def count_flops(fn: Callable[..., Any], *args: Any, while_trips: int = 1) -> FlopCount:
    """Traces ``fn(*args)`` (no compile, no run) and counts its arithmetic.

    Args:
      fn: the function, jitted or not.
      *args: its arguments, arrays or ``jax.ShapeDtypeStruct``s.
      while_trips: the trip count assumed for every ``while`` loop (counted in
        ``unknown_trip_loops`` all the same, so a reader knows it was assumed).

    The top-level jaxpr is dead-code-eliminated first (all outputs used), which also
    prunes the jaxprs of ``pjit``, ``scan``, ``while`` and ``cond`` inside it, as XLA would.
    """
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    if _dce_jaxpr is not None:
        jaxpr, _ = _dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return jaxpr_count(jaxpr, while_trips)
