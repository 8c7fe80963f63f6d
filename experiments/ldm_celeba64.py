"""DP-LDM / DP-LoRA, paper pair: public ImageNet 64x64 -> private CelebA 64x64 (TFDS).

DP-LDM (Lyu et al., TMLR 2024) CelebA-64 recipe (anchors_results.md, DP-LDM table;
method_details.md 2.2): a KL autoencoder with f=2 on ImageNet64 (ch 192, ch_mult
(1, 2), z=3: 64x64x3 -> 32x32x3 latents), an UNCONDITIONAL LDM on those latents (UNet
width 128), then DP fine-tuning of the attention blocks only on CelebA (the central
178x178 square, resized to 64), without EMA: epsilon=10, delta=1e-6, C=5e-4, batch 8192, 70
epochs, lr 1e-7 x batch (DP-LDM scales its base lr by the batch). Published FID:
epsilon 1 / 5 / 10 = 21.1 / 16.1 / 14.3.
DP-LoRA (Tsai et al., ICCV 2025; method_details.md 3): rank 16 on the attention
projections, K=4, batch 8192, 20 epochs, lr 5e-7 x batch, C=5e-4, delta=1e-6.
Not in method_details.md, chosen here: the UNet's ch_mult (1, 2, 2, 4) and attention at
latent resolutions 16, 8 and 4 (the CIFAR-10 LDM's, one level lower because the latents
are 32x32), the public training length, and EDM diffusion instead of DDPM; no LPIPS/GAN
loss in the autoencoder. DP-LDM's own celeba64-dp-eps1.yaml (found in a review,
2026-12-06) uses ch_mult (1, 2, 4), attention at 32, 16 and 8 and 8 heads: a known
departure, as are those shared by every pair (``experiments/_ldm.py``).

Commands (the first two are NON-private, on public data only)::

    python -m dpjax.main --config=experiments/ldm_celeba64.py:stage=ae \\
        --workdir=runs/ae_imagenet64
    python -m dpjax.main --config=experiments/ldm_celeba64.py:stage=public,ae=runs/ae_imagenet64 \\
        --workdir=runs/ldm_celeba64_public
    python -m dpjax.main \\
        --config=experiments/ldm_celeba64.py:variant=ldm,public=runs/ldm_celeba64_public \\
        --workdir=runs/dpldm_celeba64
    python -m dpjax.main \\
        --config=experiments/ldm_celeba64.py:variant=lora,eps=1,public=runs/ldm_celeba64_public \\
        --workdir=runs/dplora_celeba64_eps1

Needs ``pip install 'dpjax[tfds]'`` and prepared TFDS 'imagenet_resized/64x64' and
'celeb_a' (manual download). Expected: epsilon <= 10 at delta=1e-6. FID and time: not
measured yet (no GPU in the session that wrote this file).
"""

import ml_collections

from dpjax.methods import autoencoder
from experiments import _ldm, common, ldm_celeba32, ldm_cifar10

IMAGENET64 = {
    "source": "tfds",
    "name": "imagenet_resized/64x64",
    # Unconditional public pre-training: ImageNet's labels are not read.
    "num_classes": 0,
    "tfds_label_key": "",
}
AE_IMAGENET64 = autoencoder.Config(downsample=2, z_channels=3, ch=192, ch_mult=(1, 2))

PAIR = _ldm.Pair(
    name="ldm_celeba64",
    ae_name="ae_imagenet64",
    public_data=IMAGENET64,
    private_data={**ldm_celeba32.CELEBA_UNCONDITIONAL, "image_size": 64},
    image_size=64,
    channels=3,
    ae=AE_IMAGENET64,
    ae_train=ldm_cifar10.AE_TRAIN,
    unet={
        "nf": 128,
        "ch_mult": (1, 2, 2, 4),
        "num_res_blocks": 2,
        "attn_resolutions": (16, 8, 4),
        "num_steps": 50,
        "sample_batch": 128,
    },
    public_classes=0,
    public_train={"batch": 256, "steps": 300_000, "lr": 1e-4},
    private_dp={"eps": 10.0, "delta": 1e-6, "clip": 5e-4, "batch": 8192, "epochs": 70},
    ldm={"trainable": ("attn",), "lr": 1e-7 * 8192, "K": 1, "ema": 0.0},
    lora={
        "rank": 16,
        "targets": ("attn",),
        "trainable": (),
        "lr": 5e-7 * 8192,
        "K": 4,
        "epochs": 20,
    },
)

ARGS = _ldm.args_for(PAIR)


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return _ldm.get_config(PAIR, common.parse_args(arg, ARGS))
