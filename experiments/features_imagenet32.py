"""The PUBLIC feature network of DP-MEPF for 32x32 RGB data: a classifier on ImageNet32.

DP-MEPF uses an ImageNet-pre-trained VGG19 for CIFAR-10 and CelebA; this is the same
idea at dpjax's scale: the FeatureCNN (widths 64, 128, 256) trained without DP on
downsampled ImageNet (TFDS 'imagenet_resized/32x32', 1.28M images, 1,000 classes), a
public dataset disjoint from the private one. Its workdir is ``features=`` of
experiments/dpmepf_cifar10.py and experiments/dpmepf_celeba32.py.

Command (needs ``pip install 'dpjax[tfds]'`` and the prepared TFDS dataset)::

    python -m dpjax.main --config=experiments/features_imagenet32.py --workdir=workdirs/in32
"""

import ml_collections

from dpjax.methods import classifier
from experiments import common

ARGS = {"smoke": False, "steps": 20000, "batch": 256}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, ARGS)
    c = common.base_config("classifier", classifier.Config(widths=(64, 128, 256)))
    c.data.source = "tfds"
    c.data.name = "imagenet_resized/32x32"
    c.data.num_classes = 1000
    c.dp.enabled = False  # Public data: plain training through the same loop.
    c.dp.epsilon = None
    c.dp.batch_size = int(args["batch"])
    c.dp.steps = int(args["steps"])
    c.dp.microbatch_size = int(args["batch"])
    c.optim.learning_rate = 1e-3
    c.train.ema_rate = 0.999
    c.train.log_every = 200
    c.train.ckpt_every = 2000
    c.train.grid_samples = 0  # A classifier makes no images.
    if args["smoke"]:
        common.smoke_overrides(c, num_classes=10, image_shape=(32, 32, 3))
        c.dp.enabled = False
        c.dp.noise_multiplier = None
        c.train.grid_samples = 0
        c.method_args.widths = (4, 8)
    return common.finalize(c)
