"""DP-MEPF on CelebA 32x32 through TFDS, gender-conditional (Harder et al., TMLR 2023).

One release of the per-class (female / male) mean embedding of the 162,770 training
images' features (network: experiments/features_imagenet32.py, public ImageNet32), then
``steps`` generator steps. Crop 178 then resize to 32, as the DP-LFlow/DP-MEPF pipelines.

Commands::

    python -m dpjax.main --config=experiments/features_imagenet32.py --workdir=workdirs/in32
    python -m dpjax.main --config=experiments/dpmepf_celeba32.py:eps=10 --workdir=runs/mepf_ca32
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
        c.data.name = "celeb_a"
        c.data.num_classes = 2
        c.data.tfds_label_key = "attributes/Male"
        c.data.center_crop = 178
        c.data.image_size = 32
    else:
        common.smoke_overrides(c, num_classes=2, image_shape=(32, 32, 3))
        c.method_args.gen_batch = 20
    return common.finalize(c)
