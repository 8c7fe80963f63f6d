"""DP-LFlow on CelebA 32x32 (Jiang & Sun, TMLR 2023), conditional on gender.

The paper's CelebA-32 model: autoencoder h = 256 with three strided convolutions and
LeakyReLU, latent 32, 9-coupling RealNVP, C = 0.01, expected batch 5,000 from 50,000
images per gender (q = 0.1), sigma 8.5 for epsilon 1 (its README says 300 iterations, its
command line 102); CenterCrop 178, resize to 32.
dpjax trains ONE gender-conditional model (label: the 'Male' attribute) on the whole
train split at the same q = 0.1 for 300 steps, with one clip over both parts and sigma
calibrated to the target epsilon (RDP, delta = 1e-6: the paper's 1e-5 is below 1/N for each
of its 50,000-image models, but not for one model of all 162,770 images; dpjax refuses a delta
of 1/N or more).

Command::

    python -m dpjax.main --config=experiments/dplflow_celeba32.py:eps=10 --workdir=runs/lflow_ca

Needs ``pip install 'dpjax[tfds]'`` and a prepared TFDS 'celeb_a' (162,770 train images).

Expected: epsilon <= 10 at delta = 1e-6 (sigma 1.263 by RDP; PLD gives 9.23). Published:
DP-LFlow's CelebA tables were not retrieved (../shared/reference/anchors_results.md,
section 5), so there is no number to match here yet.
"""

import ml_collections

from dpjax.methods import dplflow
from experiments import common

ARGS = {"eps": 10.0, "smoke": False, "steps": 300, "q": 0.1, "microbatch": 500}
CELEBA_TRAIN = 162770


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, ARGS)
    c = common.base_config("dplflow", dplflow.Config(latent_dim=32, width=256))
    c.data.source = "tfds"
    c.data.name = "celeb_a"
    c.data.num_classes = 2
    c.data.tfds_label_key = "attributes/Male"
    c.data.center_crop = 178
    c.data.image_size = 32
    c.dp.epsilon = float(args["eps"])
    c.dp.delta = 1e-6
    c.dp.clip_norm = 0.01
    c.dp.batch_size = int(round(float(args["q"]) * CELEBA_TRAIN))
    c.dp.steps = int(args["steps"])
    c.dp.microbatch_size = int(args["microbatch"])
    c.optim.learning_rate = 5e-3
    c.optim.name = "adamw"
    c.optim.weight_decay = 1e-5
    c.train.ema_rate = 0.0
    c.train.log_every = 10
    c.train.ckpt_every = 50
    c.eval.bits_per_dim_images = 1000  # As dplflow_fmnist: the mode search per image.
    if args["smoke"]:
        common.smoke_overrides(c, num_classes=2, image_shape=(32, 32, 3))
        c.method_args.latent_dim = 4
        c.method_args.width = 8
        c.method_args.flow_layers = 2
        c.method_args.flow_hidden = 16
    return common.finalize(c)
