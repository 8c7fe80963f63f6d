"""LoRA on 1x1 convolutions: which convolutions are adapted, and that the adapted
layer computes the convolution with the merged kernel W + (alpha / r) A B (Hu et al.
Eq. 3). The dense case runs inside the UNets in tests/test_finetune.py and test_ldm.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import lora


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (1, 1), name="proj")(x)  # adapted
        x = nn.Conv(6, (3, 3), name="spatial")(x)  # not a 1x1 conv
        x = nn.Conv(6, (1, 1), strides=(2, 2), name="strided")(x)  # strided: not adapted
        return nn.Conv(5, (1, 1), feature_group_count=1, name="out")(x)  # adapted


def test_lora_adapts_exactly_the_stride_1_pointwise_convolutions_with_the_merged_kernel():
    net = _Net()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    variables = net.init(jax.random.key(1), x)
    # "." matches every layer; only the two stride-1 pointwise convolutions are adapted.
    layers = lora.discover(lambda: net.apply(variables, x), ["."])
    assert layers == {
        "proj": lora.LayerShape("conv1x1", 4, 6),
        "out": lora.LayerShape("conv1x1", 6, 5),
    }
    for name in ("spatial", "strided"):
        with pytest.raises(ValueError, match=rf"\['{name}'\] match no dense or 1x1-conv"):
            lora.discover(lambda: net.apply(variables, x), [name])
    adapters = lora.init(jax.random.key(2), layers, rank=3)
    base = net.apply(variables, x)
    with lora.applied(adapters, 0.5):
        np.testing.assert_array_equal(net.apply(variables, x), base)  # B = 0 at init
    key = jax.random.key(3)
    adapters = {
        p: {"A": ad["A"], "B": jax.random.normal(jax.random.fold_in(key, i), ad["B"].shape)}
        for i, (p, ad) in enumerate(sorted(adapters.items()))
    }
    merged = jax.tree_util.tree_map(lambda v: v, variables)
    for p in ("proj", "out"):
        kernel = variables["params"][p]["kernel"]  # (1, 1, d_in, d_out)
        delta = 0.5 * adapters[p]["A"] @ adapters[p]["B"]
        merged["params"][p]["kernel"] = kernel + delta.reshape(kernel.shape)
    with lora.applied(adapters, 0.5):
        adapted = net.apply(variables, x)
    np.testing.assert_allclose(adapted, net.apply(merged, x), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2
    assert lora.count(adapters) == (4 * 3 + 3 * 6) + (6 * 3 + 3 * 5)
