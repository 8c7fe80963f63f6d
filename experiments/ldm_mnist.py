"""DP-LDM / DP-LoRA, paper pair: public EMNIST letters -> private MNIST (via TFDS).

DP-LDM (Lyu et al., TMLR 2024) MNIST recipe (method_details.md 2.2-2.4): images resized
to 32x32; a KL autoencoder with f=8 (32x32x1 -> 4x4x3, ch 128, ch_mult (1, 2, 3, 5));
a class-conditional LDM on EMNIST letters (UNet width 64, ch_mult (1, 2), one residual
block per level, 4 heads, context width 5); then DP fine-tuning on MNIST with the
letters' class embedder (MNIST's labels 0-9 use its first rows): epsilon=10,
delta=1e-5, C=1e-3, batch 2000, 200 epochs. DP-LoRA (Tsai et al. 2025): rank 8 on the
attention projections, class embedder trained, K=12, lr 2e-5. Departures: EDM
diffusion instead of DDPM, no LPIPS/GAN loss in the autoencoder, no attention at 32, 16
and 8 in the autoencoder, no lr warm-up (the original's 10k physical steps of 256 are
about 1,280 of dpjax's logical steps of 2000: ``--config.optim.warmup_steps=1280``),
and those shared by every pair (``experiments/_ldm.py``).

TFDS's 'emnist/letters' labels letters 1-26 in a ClassLabel of 37 classes, hence
``num_classes=37`` (unused rows are harmless); like the original EMNIST files, its
images are transposed relative to MNIST (DP-LDM used them as they are, through
torchvision).

Commands (the first two are NON-private, on public data only)::

    python -m dpjax.main --config=experiments/ldm_mnist.py:stage=ae --workdir=runs/ae_emnist
    python -m dpjax.main --config=experiments/ldm_mnist.py:stage=public,ae=runs/ae_emnist \\
        --workdir=runs/ldm_mnist_public
    python -m dpjax.main \\
        --config=experiments/ldm_mnist.py:variant=ldm,public=runs/ldm_mnist_public \\
        --workdir=runs/dpldm_mnist
    python -m dpjax.main \\
        --config=experiments/ldm_mnist.py:variant=lora,public=runs/ldm_mnist_public \\
        --workdir=runs/dplora_mnist

Needs ``pip install 'dpjax[tfds]'`` and prepared TFDS 'emnist/letters' and 'mnist'.
Expected: epsilon <= 10 at delta=1e-5. Published: the DP-LDM paper's MNIST table was not
retrieved (../shared/reference/anchors_results.md, section 2); DPImageBench's re-run of
DP-LDM on MNIST gives FID 99.1 (same file). Ours: FID and time not measured yet.
"""

import ml_collections

from dpjax.methods import autoencoder
from experiments import _ldm, common

PAIR = _ldm.Pair(
    name="ldm_mnist",
    ae_name="ae_emnist",
    public_data={"source": "tfds", "name": "emnist/letters", "num_classes": 37, "image_size": 32},
    private_data={"source": "tfds", "name": "mnist", "num_classes": 10, "image_size": 32},
    image_size=32,
    channels=1,
    ae=autoencoder.Config(
        downsample=8, z_channels=3, ch=128, ch_mult=(1, 2, 3, 5), num_res_blocks=2
    ),
    ae_train={"batch": 256, "steps": 50_000, "lr": 4.5e-6 * 256},
    unet={
        "nf": 64,
        "ch_mult": (1, 2),
        "num_res_blocks": 1,
        "attn_resolutions": (4, 2),
        "cross_attention_heads": 4,
        "context_dim": 5,
        "num_steps": 50,
        "sample_batch": 256,
    },
    public_classes=37,
    public_train={"batch": 512, "steps": 50_000, "lr": 1e-4},
    private_dp={"eps": 10.0, "delta": 1e-5, "clip": 1e-3, "batch": 2000, "epochs": 200},
    ldm={"trainable": ("attn", "class_embed"), "lr": 1e-3, "K": 1},
    lora={"rank": 8, "targets": ("attn",), "trainable": ("class_embed",), "lr": 2e-5, "K": 12},
)

ARGS = _ldm.args_for(PAIR)


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return _ldm.get_config(PAIR, common.parse_args(arg, ARGS))
