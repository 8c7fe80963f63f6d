"""DPDM on CIFAR-10 through TFDS (Dockhorn et al., TMLR 2023, class-conditional).

Recipe (nv-tlabs/DPDM configs/cifar10_32): DDPM++ with attention at 16x16 (1,754,499
parameters), EDM preconditioning, K=8, batch 2048, 500 epochs (q = 2048/50000,
T = 12207), C=1, Adam 3e-4, EMA 0.999, delta=1e-5.

Command::

    python -m dpjax.main --config=experiments/dpdm_cifar10.py:eps=10 --workdir=runs/dpdm_c10

Needs ``pip install 'dpjax[tfds]'`` and a prepared TFDS 'cifar10'.
Expected: epsilon <= 10 at delta=1e-5. Published FID: not retrieved for the TMLR
version (DPImageBench's re-run: FID 110.1, accuracy 36.8 at epsilon=10). Time on one
GPU: not yet measured.
"""

import ml_collections

from dpjax.methods import dpdm
from experiments import common


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(
        arg, {"eps": 10.0, "smoke": False, "quick": False, "K": 8, "microbatch": 32}
    )
    c = common.base_config("dpdm", dpdm.Config(noise_multiplicity=int(args["K"])))
    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.num_classes = 10
    c.dp.epsilon = float(args["eps"])
    c.dp.delta = 1e-5
    c.dp.batch_size = 2048
    c.dp.epochs = 500.0
    c.dp.microbatch_size = int(args["microbatch"])
    if args["quick"]:
        common.small_dpdm_unet(c, nf=16, attn_resolutions=(), num_steps=30, sample_batch=100)
        c.dp.batch_size = 64
        c.dp.steps = 40
        c.dp.microbatch_size = 16
    if args["smoke"]:
        common.smoke_overrides(c, num_classes=10, image_shape=(32, 32, 3))
        common.small_dpdm_unet(c, nf=8, attn_resolutions=(16,), num_steps=2, sample_batch=10)
    return common.finalize(c)
