"""DP-MEPF on CelebA 32x32 through TFDS, gender-conditional (Harder et al., TMLR 2023).

One release of the per-class (female / male) mean embedding of the 162,770 training
images' features (network: experiments/features_imagenet32.py, public ImageNet32), then
``steps`` generator steps. Crop 178 then resize to 32, as the DP-LFlow/DP-MEPF pipelines.

Commands::

    python -m dpjax.main --config=experiments/features_imagenet32.py --workdir=workdirs/in32
    python -m dpjax.main --config=experiments/dpmepf_celeba32.py:eps=10 --workdir=runs/mepf_ca32
"""

import ml_collections

from experiments import dpmepf_fmnist


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return dpmepf_fmnist.for_tfds(
        arg,
        {
            "source": "tfds",
            "name": "celeb_a",
            "num_classes": 2,
            "tfds_label_key": "attributes/Male",
            "center_crop": 178,
            "image_size": 32,
        },
        smoke_classes=2,
    )
