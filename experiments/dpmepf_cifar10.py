"""DP-MEPF on CIFAR-10 through TFDS (Harder et al., TMLR 2023).

One release of the per-class mean embedding of the 50,000 training images' features
(network: experiments/features_imagenet32.py, trained on public ImageNet32; the paper
uses ImageNet VGG19 features), delta = 1e-5, then ``steps`` generator steps (the paper:
200k iterations at batch 128; default here 50k at batch 100). See
experiments/dpmepf_fmnist.py for the mechanism and dpjax/methods/dpmepf.py for the proof
of the sensitivity.

Commands::

    python -m dpjax.main --config=experiments/features_imagenet32.py --workdir=workdirs/in32
    python -m dpjax.main --config=experiments/dpmepf_cifar10.py:eps=10 --workdir=runs/mepf_c10
"""

import ml_collections

from experiments import common, dpmepf_fmnist

ARGS = {**dpmepf_fmnist.ARGS, "steps": 50000, "features": "workdirs/in32"}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, ARGS)
    c = dpmepf_fmnist.get_config(",".join(f"{k}={v!r}" for k, v in args.items()))
    c.unlock()
    if not args["smoke"]:
        c.data.source = "tfds"
        c.data.name = "cifar10"
        c.data.num_classes = 10
    else:
        common.smoke_overrides(c, num_classes=10, image_shape=(32, 32, 3))
    return common.finalize(c)
