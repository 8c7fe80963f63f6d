"""DPDM on CelebA 32x32, unconditional (Dockhorn et al., TMLR 2023).

Recipe (nv-tlabs/DPDM configs/celeba_32): DDPM++ with attention at 8 and 16 (1,804,451
parameters), EDM preconditioning, K=32, batch 2048, 300 epochs (N=162,770:
q = 2048/162770, T = int(300 / q) = 23843), C=1, Adam 3e-4, EMA 0.999, delta=1e-6. Images are
center-cropped to 140x140 and resized to 32x32 (``data.center_crop``/``image_size``);
the 140 crop is the usual CelebA-32 preprocessing of the DP generative literature, but
neither method_details.md nor the DPDM configs give it (DP-LDM and DP-LFlow crop the
central 178x178 square): treat it as this file's choice.
``res=64`` selects the 64x64 model (ch_mult (1,1,2,2), K=8; 1,999,907 parameters).

Command::

    python -m dpjax.main --config=experiments/dpdm_celeba32.py:eps=10 --workdir=runs/celeba32

Needs ``pip install 'dpjax[tfds]'`` and a prepared TFDS 'celeb_a' (manual download).
Expected: epsilon <= 10 / 1 at delta=1e-6 (RDP sigma 1.306 / 8.845 at q = 2048/162770,
about the paper's 1/80); paper FID 21.1 (epsilon=10), 71.8 (epsilon=1). Time on one GPU: not yet
measured.
"""

import ml_collections

from dpjax.methods import dpdm
from experiments import common


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, {"eps": 10.0, "smoke": False, "res": 32, "microbatch": 16})
    res = int(args["res"])
    if res not in (32, 64):
        raise ValueError(f"res must be 32 or 64, got {res}.")
    c = common.base_config("dpdm", dpdm.Config(noise_multiplicity=32 if res == 32 else 8))
    c.data.source = "tfds"
    c.data.name = "celeb_a"
    c.data.num_classes = 0
    c.data.tfds_label_key = ""
    c.data.center_crop = 140
    c.data.image_size = res
    c.dp.epsilon = float(args["eps"])
    c.dp.delta = 1e-6
    c.dp.batch_size = 2048
    c.dp.epochs = 300.0
    c.dp.microbatch_size = int(args["microbatch"])
    if args["smoke"]:
        common.smoke_overrides(c, num_classes=0, image_shape=(res, res, 3))
        common.small_dpdm_unet(c, nf=8, attn_resolutions=(16,), num_steps=2, sample_batch=10)
    return common.finalize(c)
