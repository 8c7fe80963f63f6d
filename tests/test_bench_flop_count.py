"""The FLOP counter of the DP-step benchmark (benchmarks/flop_count.py).

Each count is checked against the multiply-adds written out by hand, and the structural
rules (scan trip counts, while loops, cond branches, dead code, calls) against the same
product counted without them.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from tests import bench_scripts

fc = bench_scripts.load("benchmarks/flop_count.py", "bench_flop_count")

F32 = jnp.float32


def _spec(*shape):
    return jax.ShapeDtypeStruct(shape, F32)


def _conv(groups=1):
    def conv(w, x):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        )  # fmt: skip

    return conv


def test_dot_general_is_two_multiply_adds_per_product():
    got = fc.count_flops(lambda a, b: a @ b, _spec(5, 7), _spec(7, 3))
    assert got.matmul_flops == 2 * 5 * 7 * 3 and got.other_flops == 0
    batched = fc.count_flops(
        lambda a, b: jnp.einsum("bij,bjk->bik", a, b), _spec(4, 5, 7), _spec(4, 7, 3)
    )
    assert batched.matmul_flops == 2 * 4 * 5 * 7 * 3
    assert dict(batched.by_primitive) == {"dot_general": batched.matmul_flops}


@pytest.mark.parametrize("groups", [1, 2])
def test_convolution_and_its_gradients(groups):
    w, x = _spec(3, 3, 4 // groups, 6), _spec(2, 5, 5, 4)
    conv = _conv(groups)
    forward = fc.count_flops(conv, w, x)
    # Each of the 2*5*5*6 outputs contracts over 3*3 taps of 4/groups input channels.
    assert forward.matmul_flops == 2 * (2 * 5 * 5 * 6) * (3 * 3 * 4 // groups)
    assert dict(forward.by_primitive) == {"conv_general_dilated": forward.matmul_flops}
    # Stride 1, SAME: the weight gradient (a batch-grouped convolution for groups > 1)
    # and the input gradient each cost what the forward pass costs, which the squared
    # loss keeps (a linear one would not need it).
    loss = lambda w, x: jnp.sum(conv(w, x) ** 2)  # noqa: E731
    weight_grad = fc.count_flops(jax.grad(loss), w, x)
    both = fc.count_flops(jax.grad(loss, argnums=(0, 1)), w, x)
    assert weight_grad.matmul_flops == 2 * forward.matmul_flops
    assert both.matmul_flops == 3 * forward.matmul_flops


def test_scan_counts_its_body_length_times_and_while_as_told():
    a = _spec(8, 8)
    one = 2 * 8**3

    def scanned(a):
        return lax.scan(lambda c, _: (c @ a, None), a, None, length=10)[0]

    def looped(a, n):
        return lax.fori_loop(0, n, lambda i, c: c @ a, a)  # n traced: a while loop.

    got = fc.count_flops(scanned, a)
    assert got.matmul_flops == 10 * one and got.unknown_trip_loops == 0
    n = jax.ShapeDtypeStruct((), jnp.int32)
    once = fc.count_flops(looped, a, n)
    assert once.matmul_flops == one and once.unknown_trip_loops == 1
    assumed = fc.count_flops(looped, a, n, while_trips=7)
    assert assumed.matmul_flops == 7 * one and assumed.unknown_trip_loops == 1
    # A static fori_loop is a scan: its trip count is known.
    static = fc.count_flops(lambda a: lax.fori_loop(0, 3, lambda i, c: c @ a, a), a)
    assert static.matmul_flops == 3 * one and static.unknown_trip_loops == 0


def test_cond_counts_its_dearest_branch_and_dead_code_nothing():
    a = _spec(8, 8)
    p = jax.ShapeDtypeStruct((), jnp.bool_)
    got = fc.count_flops(lambda p, a: lax.cond(p, lambda a: a @ a @ a, lambda a: a, a), p, a)
    assert got.matmul_flops == 2 * 2 * 8**3

    def dead(a):
        _ = a @ a  # Unused: XLA drops it, so does the count.
        return a + 1.0

    got = fc.count_flops(dead, a)
    assert got.matmul_flops == 0 and got.other_flops == 64


def test_calls_are_walked_and_elementwise_work_is_counted():
    @jax.custom_jvp
    def f(x):
        return x @ x

    f.defjvp(lambda primals, tangents: (f(*primals), tangents[0] @ primals[0]))
    a = _spec(4, 4)
    got = fc.count_flops(jax.jit(lambda a: jnp.tanh(f(a)) * 2.0), a)
    assert got.matmul_flops == 2 * 4**3
    assert got.other_flops == 2 * 16  # tanh and the product, one per element each.
    reduced = fc.count_flops(lambda a: jnp.sum(jnp.reshape(a, (16,))), a)
    assert reduced.matmul_flops == 0 and reduced.other_flops == 16
    as_json = got.as_dict()
    assert as_json["matmul_flops"] == got.matmul_flops
    assert as_json["by_primitive"] == {"dot_general": got.matmul_flops}


def test_a_shard_map_counts_every_shard():
    """The body of a shard_map holds one shard's shapes; the count is the whole mesh's
    (the four host devices of the test session)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("d",), axis_types=(AxisType.Explicit,))
    f = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
    x = jax.device_put(jnp.ones((4 * n, 8)), NamedSharding(mesh, P("d")))
    w = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P()))
    assert fc.count_flops(f, x, w).matmul_flops == 2 * (4 * n) * 8 * 8
