"""DP-LDM / DP-LoRA, paper pair: public ImageNet 32x32 -> private CelebA 32x32 (TFDS).

DP-LDM (Lyu et al., TMLR 2024) CelebA-32 recipe (method_details.md 2.2-2.4): the
ImageNet32 autoencoder of ``ldm_cifar10.py`` (f=2, 16x16x3 latents), an UNCONDITIONAL
LDM on ImageNet32 (UNet width 192, ch_mult (1, 2, 4), attention at 16, 8 and 4), then
DP fine-tuning of the attention blocks only (``attention_flag: self``) on CelebA
(the central 178x178 square, resized to 32): epsilon=1, delta=1e-6, C=5e-4, batch 2048,
lr 1e-3.
DP-LoRA: rank 16 on the attention projections (its ``qkv``/``proj_out``), K=4 (its
CelebA-64 value), with DP-LDM's batch, lr and delta; DP-LoRA's own CelebA-32 configs
(found in a review, 2026-12-06) use batch 8192, lr 5e-7 x batch, delta 1e-5 and K=2,
not matched yet. Shared departures: ``experiments/_ldm.py``.
The number of epochs is not in method_details.md: 20 here. Departures: EDM diffusion
instead of DDPM, no LPIPS/GAN loss in the autoencoder.

Commands (the first two are NON-private, on public data only; the autoencoder is the
one of ``ldm_cifar10.py:stage=ae``)::

    python -m dpjax.main --config=experiments/ldm_celeba32.py:stage=ae \\
        --workdir=runs/ae_imagenet32
    python -m dpjax.main --config=experiments/ldm_celeba32.py:stage=public,ae=runs/ae_imagenet32 \\
        --workdir=runs/ldm_celeba32_public
    python -m dpjax.main \\
        --config=experiments/ldm_celeba32.py:variant=ldm,public=runs/ldm_celeba32_public \\
        --workdir=runs/dpldm_celeba32
    python -m dpjax.main \\
        --config=experiments/ldm_celeba32.py:variant=lora,public=runs/ldm_celeba32_public \\
        --workdir=runs/dplora_celeba32

Needs ``pip install 'dpjax[tfds]'`` and prepared TFDS 'imagenet_resized/32x32' and
'celeb_a' (manual download). Expected: epsilon <= 1 at delta=1e-6. Published: the DP-LDM
paper's CelebA-32 table was not retrieved (../shared/reference/anchors_results.md, section
2); DPImageBench's re-run of DP-LDM on CelebA gives FID 40.4 (same file). Ours: FID and
time not measured yet.
"""

import ml_collections

from experiments import _ldm, common, ldm_cifar10

# Unconditional CelebA, centre-cropped to the central 178x178 square, as DP-LDM's
# ldm/data/celeba.py does (Resize to the side, then CenterCrop: the whole width of the
# 178x218 images); ldm_celeba64.py uses it at 64x64.
CELEBA_UNCONDITIONAL = {
    "source": "tfds",
    "name": "celeb_a",
    "num_classes": 0,
    "tfds_label_key": "",
    "center_crop": 178,
}

PAIR = _ldm.Pair(
    name="ldm_celeba32",
    ae_name="ae_imagenet32",
    # Unconditional public pre-training: ImageNet's labels are not read.
    public_data={**ldm_cifar10.IMAGENET32, "num_classes": 0, "tfds_label_key": ""},
    private_data={**CELEBA_UNCONDITIONAL, "image_size": 32},
    image_size=32,
    channels=3,
    ae=ldm_cifar10.AE_IMAGENET32,
    ae_train=ldm_cifar10.AE_TRAIN,
    unet={
        "nf": 192,
        "ch_mult": (1, 2, 4),
        "num_res_blocks": 2,
        "attn_resolutions": (16, 8, 4),
        "num_steps": 50,
        "sample_batch": 256,
    },
    public_classes=0,
    public_train={"batch": 512, "steps": 200_000, "lr": 1e-4},
    private_dp={"eps": 1.0, "delta": 1e-6, "clip": 5e-4, "batch": 2048, "epochs": 20},
    ldm={"trainable": ("attn",), "lr": 1e-3, "K": 1},
    lora={"rank": 16, "targets": ("attn",), "trainable": (), "lr": 1e-3, "K": 4},
)

ARGS = _ldm.args_for(PAIR)


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, ARGS)
    if args["stage"] == "ae":  # The same run as ldm_cifar10.py's (a shared workdir resumes).
        return ldm_cifar10.get_config(arg)
    return _ldm.get_config(PAIR, args)
