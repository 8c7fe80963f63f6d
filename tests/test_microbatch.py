"""The micro-batch size chosen from the memory, and training with it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpjax import train
from dpjax.methods import base, toy
from dpjax.privacy import microbatch
from experiments import toy_fake
from tests.config_overrides import with_overrides


@pytest.mark.parametrize(
    ("per_example", "budget", "max_size", "want"),
    [
        (100.0, 10_000, 1024, 64),  # 128 * 100 > 10_000
        (100.0, 10_000, 32, 32),  # capped
        (100.0, 50, 1024, 1),  # nothing fits: one example at a time
        (0.0, 1, 48, 32),  # no temporaries: the largest power of two <= max
    ],
)
def test_largest_fitting_size(per_example, budget, max_size, want):
    assert microbatch.largest_fitting_size(per_example, budget, max_size) == want


def test_probe_measures_memory_that_grows_with_the_model():
    spec = base.DataSpec((4, 4, 1), 2)
    sizes = []
    for noise_draws in (1, 16):
        method = toy.make(toy.Config(noise_multiplicity=noise_draws), spec)
        params = method.init(jax.random.PRNGKey(0), spec)
        choice = microbatch.auto_microbatch_size(
            method, params.trainable, params.frozen, spec.image_shape, "vmap",
            max_size=512, budget_bytes=1 << 20,
        )  # fmt: skip
        assert choice.bytes_per_example > 0
        assert choice.size * choice.bytes_per_example <= 1 << 20
        assert 1 <= choice.size <= 512 and choice.size & (choice.size - 1) == 0
        sizes.append(choice.size)
    assert sizes[1] < sizes[0]  # 16 noise draws per example need more memory per example
    # The probe compiles the step the run will use, bf16 compute included.
    bf16 = microbatch.auto_microbatch_size(
        method, params.trainable, params.frozen, spec.image_shape, "vmap",
        max_size=512, budget_bytes=1 << 20, compute_dtype="bfloat16",
    )  # fmt: skip
    assert bf16.bytes_per_example > 0 and bf16.size * bf16.bytes_per_example <= 1 << 20
    with pytest.raises(ValueError, match="Unknown compute dtype"):
        microbatch.auto_microbatch_size(
            method, params.trainable, params.frozen, spec.image_shape, "vmap",
            max_size=512, budget_bytes=1 << 20, compute_dtype="half",
        )  # fmt: skip


def test_training_with_auto_microbatch_matches_a_fixed_size(tmp_path, same_noise_secret):
    """Size 0 trains; the micro-batch size never changes the result beyond rounding."""

    def run(workdir, mb):
        c = toy_fake.get_config("steps=3")
        c.unlock()
        c.train.progress = False
        c.train.grid_samples = 0
        c.data.fake_num_examples = 128
        c.dp.batch_size = 32
        c = with_overrides(c, {"dp.microbatch_size": mb})
        logs = []
        state = train.train(c, str(workdir), log=logs.append)
        return state, logs

    auto, logs = run(tmp_path / "auto", 0)
    fixed, _ = run(tmp_path / "fixed", 4)
    chosen = [int(line.split("micro-batch size ")[1].split()[0]) for line in logs
              if "micro-batch size" in line and "auto" in line]
    # A tiny model fits any size: the choice is the cap, a quarter of the expected batch
    # per device (32 on one device, or on each of the test's 4 CPU devices 8), rounded
    # down to a power of two.
    assert chosen in ([8], [2]), logs
    for a, b in zip(jax.tree_util.tree_leaves(auto.trainable),
                    jax.tree_util.tree_leaves(fixed.trainable), strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
