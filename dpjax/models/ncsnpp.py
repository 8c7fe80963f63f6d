"""The DDPM++/NCSN++ denoiser UNet used by DPDM, in flax.linen.

Architecture of Song et al. (ICLR 2021, "Score-Based Generative Modeling through SDEs",
DDPM++ / NCSN++ with BigGAN residual blocks) in the small configuration that DPDM
(Dockhorn et al., TMLR 2023, Section 4 and Appendix) trains with DP-SGD: ``nf=32``,
``ch_mult=(1, 2, 2)``, two residual blocks per level, about 1.75M parameters.

Layout (NHWC throughout)::

    conv_in
    per level l: num_res_blocks x [ResBlock (+ Attn if res in attn_resolutions)]
                 then a down-sampling ResBlock (except at the last level)
    mid: ResBlock, Attn, ResBlock
    per level l (reversed): (num_res_blocks + 1) x ResBlock on [h, skip] concatenated
                 (+ Attn), then an up-sampling ResBlock (except at level 0)
    GroupNorm, SiLU, conv_out

Privacy note: every normalisation is a GroupNorm (statistics of one example only); there
is no BatchNorm and no other operation that mixes examples of a batch, so the network can
be used inside a per-example DP-SGD loss (it also runs under ``jax.vmap`` with a batch
axis of 1).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import group_norm

_SQRT2 = math.sqrt(2.0)


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM initialisation: uniform variance scaling with fan_avg (Ho et al. 2020).

    A scale of 0 is replaced by 1e-10, as in the DDPM++ code, so that the layer starts as
    (almost) zero, making each residual block start (almost) as the identity.
    """
    scale = 1e-10 if scale == 0 else scale
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the NCSN++ UNet.

    Attributes:
      nf: base channel count; the noise embedding has ``nf`` and the MLP ``4 nf`` units.
      ch_mult: channel multiplier per resolution level (level 0 = full resolution).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes at which a self-attention block is inserted.
      dropout: dropout rate inside residual blocks (DPDM: 0).
      num_classes: number of classes; 0 for an unconditional model. A conditional model
        has ``num_classes + 1`` label embeddings, index ``num_classes`` being the null
        class used for classifier-free guidance.
      image_size: height (= width) of the input images.
      channels: number of image channels.
      cross_attention: latent-diffusion class conditioning (Rombach et al., CVPR 2022,
        Sec. 3.3; DP-LDM, Lyu et al., TMLR 2024): the label is embedded by a learned
        class embedder ``class_embed`` into ``context_tokens`` tokens of width
        ``context_dim``, and every attention block is followed by a cross-attention
        block (``*_xattn*``) whose queries are the feature map and whose keys/values are
        those tokens. The label then enters ONLY through this context (no
        ``label_embed`` in the noise embedding). Off by default: with False the
        parameters and outputs are exactly DPDM's.
      context_dim: width of the class context tokens; 0 means 4 * nf.
      context_tokens: number of context tokens per label (LDM's ClassEmbedder: 1).
      cross_attention_heads: heads of the cross-attention blocks (must divide the
        channel count at every attention resolution).
    """

    nf: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    num_classes: int = 0
    image_size: int = 32
    channels: int = 3
    cross_attention: bool = False
    context_dim: int = 0
    context_tokens: int = 1
    cross_attention_heads: int = 1

    def __post_init__(self) -> None:
        if self.nf < 4 or self.nf % 2:
            raise ValueError(f"nf must be even and >= 4, got {self.nf}.")
        if self.cross_attention and self.num_classes == 0:
            raise ValueError("cross_attention conditions on class labels; num_classes is 0.")
        if self.context_dim < 0 or self.context_tokens < 1 or self.cross_attention_heads < 1:
            raise ValueError(
                "context_dim must be >= 0, context_tokens and cross_attention_heads >= 1; got "
                f"{self.context_dim}, {self.context_tokens}, {self.cross_attention_heads}."
            )
        if not self.ch_mult:
            raise ValueError("ch_mult must have at least one level.")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}.")
        size = self.image_size
        for level in range(len(self.ch_mult) - 1):
            if size % 2:
                raise ValueError(
                    f"image_size {self.image_size} cannot be halved at level {level} "
                    f"(size {size}) for ch_mult {self.ch_mult}."
                )
            size //= 2
        unknown = set(self.attn_resolutions) - set(self.resolutions)
        if unknown:
            raise ValueError(
                f"attn_resolutions {sorted(unknown)} are not among the UNet's resolutions "
                f"{list(self.resolutions)} (the image side, halved per level); e.g. "
                f"--config.method_args.attn_resolutions='({self.resolutions[-1]},)', or '()' "
                "for none."
            )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Spatial size at each level."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    @property
    def context_width(self) -> int:
        """Width of the class context tokens of the cross-attention blocks."""
        return self.context_dim or 4 * self.nf


# The DPDM configurations (configs/<dataset>/train_*.yaml of nv-tlabs/DPDM), with their
# parameter counts (method_details.md 1.1), checked in tests/test_ncsnpp.py.
PRESETS: dict[str, UNetConfig] = {
    "mnist_28": UNetConfig(attn_resolutions=(7,), num_classes=10, image_size=28, channels=1),
    "fmnist_28": UNetConfig(attn_resolutions=(7,), num_classes=10, image_size=28, channels=1),
    "cifar10_32": UNetConfig(attn_resolutions=(16,), num_classes=10, image_size=32, channels=3),
    "celeba_32": UNetConfig(attn_resolutions=(8, 16), num_classes=0, image_size=32, channels=3),
    "celeba_64": UNetConfig(
        ch_mult=(1, 1, 2, 2), attn_resolutions=(8, 16), num_classes=0, image_size=64, channels=3
    ),
}


def preset(name: str) -> UNetConfig:
    """The UNetConfig of a DPDM dataset configuration; a clear error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"Unknown UNet preset '{name}'. Known presets: {sorted(PRESETS)}.")
    return PRESETS[name]


def sinusoidal_embedding(c_noise: jax.Array, dim: int, max_positions: int = 10000) -> jax.Array:
    """Transformer positional embedding of a scalar per example (Vaswani et al. 2017).

    Args:
      c_noise: (N,) noise conditioning values.
      dim: embedding size (even).
      max_positions: the largest wavelength, 10000 as in DDPM.

    Returns:
      (N, dim) array, [sin(c w_i), cos(c w_i)] with w_i = max_positions^(-i / (dim/2 - 1)).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = c_noise.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _group_norm(channels: int, name: str) -> nn.GroupNorm:
    # DDPM++: min(C // 4, 32) groups (group_norm.num_groups), eps 1e-6. Statistics are per
    # example (GroupNorm only).
    return nn.GroupNorm(num_groups=group_norm.num_groups(channels), epsilon=1e-6, name=name)


def _conv(features: int, kernel: int, name: str, init_scale: float = 1.0) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        padding="SAME",
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        name=name,
    )


def _upsample(x: jax.Array) -> jax.Array:
    """Naive 2x nearest-neighbour up-sampling (fir=False)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample(x: jax.Array) -> jax.Array:
    """Naive 2x2 average pooling (fir=False)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """BigGAN-style residual block of DDPM++ (Song et al. 2021), skip_rescale=True.

    h = Conv_1(Dropout(act(GN(Conv_0(resample(act(GN(x)))) + Dense(act(temb)))))),
    out = (resample(x) [-> 1x1 Conv_2] + h) / sqrt(2).
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False) -> jax.Array:
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = nn.silu(_group_norm(in_ch, "GroupNorm_0")(x))
        if self.up:
            h, x = _upsample(h), _upsample(x)
        elif self.down:
            h, x = _downsample(h), _downsample(x)
        h = _conv(out_ch, 3, "Conv_0")(h)
        # The noise/label embedding enters as a per-channel bias.
        temb_proj = nn.Dense(
            out_ch, kernel_init=default_init(), bias_init=nn.initializers.zeros, name="Dense_0"
        )(nn.silu(temb))
        h = h + temb_proj[:, None, None, :]
        h = nn.silu(_group_norm(out_ch, "GroupNorm_1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(h)
        h = _conv(out_ch, 3, "Conv_1", init_scale=0.0)(h)
        if in_ch != out_ch or self.up or self.down:
            x = _conv(out_ch, 1, "Conv_2")(x)
        return (x + h) / _SQRT2


class AttnBlock(nn.Module):
    """Single-head spatial self-attention of DDPM++ (AttnBlockpp), skip_rescale=True."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, height, width, c = x.shape
        h = _group_norm(c, "GroupNorm_0")(x)

        def nin(name: str, scale: float) -> nn.Dense:
            # A 1x1 "network in network" projection over channels.
            return nn.Dense(
                c, kernel_init=default_init(scale), bias_init=nn.initializers.zeros, name=name
            )

        q = nin("NIN_0", 0.1)(h).reshape(n, height * width, c)
        k = nin("NIN_1", 0.1)(h).reshape(n, height * width, c)
        v = nin("NIN_2", 0.1)(h).reshape(n, height * width, c)
        # Softmax(q k^T / sqrt(C)) over the HW key positions, per example.
        logits = jnp.einsum("nqc,nkc->nqk", q, k) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1)
        h = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(n, height, width, c)
        h = nin("NIN_3", 0.0)(h)
        return (x + h) / _SQRT2


class CrossAttnBlock(nn.Module):
    """Cross-attention from the feature map to a context sequence, skip_rescale=True.

    The attention of LDM's SpatialTransformer (``attn2`` of Rombach et al. 2022,
    ldm/modules/attention.py): queries from the GroupNorm-ed features, keys and values
    from the context tokens (no bias, as LDM's ``to_q/to_k/to_v``), softmax over the
    tokens, output projection ``to_out`` initialised at (almost) zero so the block
    starts as the identity, residual divided by sqrt(2) as in AttnBlock. Everything is
    per example (the context of example n is only seen by example n).
    """

    num_heads: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        n, height, width, c = x.shape
        heads = self.num_heads
        if c % heads:
            raise ValueError(f"cross_attention_heads={heads} does not divide {c} channels.")
        d = c // heads
        h = _group_norm(c, "GroupNorm_0")(x).reshape(n, height * width, c)

        def proj(name: str, bias: bool, scale: float = 0.1) -> nn.Dense:
            return nn.Dense(
                c,
                use_bias=bias,
                kernel_init=default_init(scale),
                bias_init=nn.initializers.zeros,
                name=name,
            )

        q = proj("to_q", False)(h).reshape(n, height * width, heads, d)
        k = proj("to_k", False)(context).reshape(n, context.shape[1], heads, d)
        v = proj("to_v", False)(context).reshape(n, context.shape[1], heads, d)
        # Softmax(q k^T / sqrt(d)) over the context tokens, per example and head.
        weights = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) * (d**-0.5), axis=-1)
        h = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, height, width, c)
        h = proj("to_out", True, 0.0)(h)
        return (x + h) / _SQRT2


class NCSNpp(nn.Module):
    """The DDPM++/NCSN++ UNet F(x, c_noise, y) of DPDM.

    Call with ``x`` (N, H, W, C), ``c_noise`` (N,) and integer ``labels`` (N,) (ignored when
    ``config.num_classes == 0``; the value ``num_classes`` is the null class). Returns an
    array shaped like ``x``. With ``config.cross_attention`` the labels condition the
    network through cross-attention to a learned class embedding (``CrossAttnBlock``)
    instead of the noise embedding.
    """

    config: UNetConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, c_noise: jax.Array, labels: jax.Array | None, train: bool = False
    ) -> jax.Array:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ValueError(
                f"NCSNpp expects (N, {cfg.image_size}, {cfg.image_size}, {cfg.channels}) "
                f"images, got {x.shape}."
            )
        nf = cfg.nf
        temb = sinusoidal_embedding(c_noise, nf)
        context = None
        if cfg.num_classes > 0 and labels is None:
            raise ValueError("A class-conditional NCSNpp needs labels.")
        if cfg.num_classes > 0 and cfg.cross_attention:
            # LDM's ClassEmbedder: a learned embedding per class (num_classes + 1 rows, the
            # last one the null class) read as context_tokens tokens of context_width.
            tokens, width = cfg.context_tokens, cfg.context_width
            context = nn.Embed(
                cfg.num_classes + 1,
                tokens * width,
                embedding_init=nn.initializers.normal(1.0),
                name="class_embed",
            )(labels).reshape(labels.shape[0], tokens, width)
        elif cfg.num_classes > 0:
            # num_classes + 1 rows: the last one is the null class of classifier-free guidance.
            temb = temb + nn.Embed(
                cfg.num_classes + 1,
                nf,
                embedding_init=nn.initializers.normal(1.0),
                name="label_embed",
            )(labels)
        dense = lambda feats, name: nn.Dense(
            feats, kernel_init=default_init(), bias_init=nn.initializers.zeros, name=name
        )
        temb = dense(4 * nf, "temb_dense_0")(temb)
        temb = dense(4 * nf, "temb_dense_1")(nn.silu(temb))

        def res(h: jax.Array, name: str, out_ch: int | None = None, **kw: bool) -> jax.Array:
            block = ResBlock(out_ch=out_ch, dropout=cfg.dropout, name=name, **kw)
            return block(h, temb, train)

        def attn(h: jax.Array, name: str, xname: str) -> jax.Array:
            # Self-attention, then (LDM only) cross-attention to the class context, the
            # order of LDM's SpatialTransformer.
            h = AttnBlock(name=name)(h)
            if context is not None:
                h = CrossAttnBlock(cfg.cross_attention_heads, name=xname)(h, context)
            return h

        levels = len(cfg.ch_mult)
        # Down path; every intermediate output is kept as a skip connection.
        hs = [_conv(nf, 3, "conv_in")(x)]
        for level in range(levels):
            for i in range(cfg.num_res_blocks):
                h = res(hs[-1], f"down_{level}_res_{i}", nf * cfg.ch_mult[level])
                if cfg.resolutions[level] in cfg.attn_resolutions:
                    h = attn(h, f"down_{level}_attn_{i}", f"down_{level}_xattn_{i}")
                hs.append(h)
            if level != levels - 1:
                hs.append(res(hs[-1], f"down_{level}_downsample", down=True))

        h = res(hs[-1], "mid_res_0")
        h = attn(h, "mid_attn", "mid_xattn")
        h = res(h, "mid_res_1")

        # Up path; each block consumes one skip connection.
        for level in reversed(range(levels)):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res(h, f"up_{level}_res_{i}", nf * cfg.ch_mult[level])
            if cfg.resolutions[level] in cfg.attn_resolutions:
                h = attn(h, f"up_{level}_attn", f"up_{level}_xattn")
            if level != 0:
                h = res(h, f"up_{level}_upsample", up=True)
        assert not hs, "every skip connection must be consumed"

        h = nn.silu(_group_norm(h.shape[-1], "norm_out")(h))
        return _conv(cfg.channels, 3, "conv_out", init_scale=0.0)(h)


def init_params(config: UNetConfig, key: jax.Array) -> dict:
    """Initial parameters of ``NCSNpp(config)`` (a batch of one dummy input)."""
    s = config.image_size
    x = jnp.zeros((1, s, s, config.channels), jnp.float32)
    return NCSNpp(config).init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]


def param_shapes(config: UNetConfig) -> dict:
    """Parameter shapes of ``NCSNpp(config)`` without computing anything (jax.eval_shape)."""
    return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
