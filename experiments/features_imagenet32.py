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

from experiments import common, features_mnist

ARGS = {"smoke": False, "steps": 20000, "batch": 256}


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return features_mnist.public_classifier(
        arg,
        ARGS,
        widths=(64, 128, 256),
        data={"source": "tfds", "name": "imagenet_resized/32x32", "num_classes": 1000},
        ema_rate=0.999,
        log_every=200,
        ckpt_every=2000,
        smoke_shape=(32, 32, 3),
    )
