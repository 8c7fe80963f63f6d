"""A toy per-class Gaussian trained with DP-SGD on fake data: the engine's fastest run.

Command::

    python -m dpjax.main --config=experiments/toy_fake.py --workdir=/tmp/toy

Expected: sigma=1 for 20 steps at q=1/8 gives epsilon ~5.07 (RDP; 4.37 PLD) at delta=1e-5;
seconds on a CPU.
"""

import ml_collections

from dpjax.methods import toy
from experiments import common


@common.arguments_take_effect
def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, {"sigma": 1.0, "steps": 20, "smoke": False, "K": 2})
    c = common.base_config("toy", toy.Config(noise_multiplicity=int(args["K"])))
    c.data.source = "fake"
    c.data.fake_num_examples = 512
    c.dp.epsilon = None
    c.dp.noise_multiplier = float(args["sigma"])
    c.dp.batch_size = 64
    c.dp.steps = int(args["steps"])
    c.dp.microbatch_size = 16
    c.train.log_every = 5
    c.train.ckpt_every = 5
    c.train.grid_samples = 20
    if args["smoke"]:
        common.smoke_overrides(c)
        # The toy's sigma is always given (smoke's own reason to set one, avoiding a slow
        # calibration, does not apply), so a smoke sweep over sigma runs each sigma.
        c.dp.noise_multiplier = float(args["sigma"])
    return common.finalize(c)


def sweep() -> list[str]:
    """A grid for ``python -m launch.sweep experiments/toy_fake.py``: sigma x learning rate.

    Each string is the experiment argument, then optional ``--config.KEY=VALUE`` overrides.
    """
    return [
        f"sigma={sigma} --config.optim.learning_rate={lr}"
        for sigma in (0.5, 1.0, 2.0)
        for lr in (3e-4, 1e-3)
    ]
