"""Every DP-SGD method: a run stopped after 2 of 4 steps and resumed ends bit-identical
to an uninterrupted one; the same run on 4 devices ends within float rounding of it,
with the same privacy report (the toy's are in test_train_loop and test_multidevice,
DP-MEPF's in test_dpmepf; DP-MEPF refuses several devices).

Until the replay audit of 2026-12-07 only the toy and DP-MEPF had such a test. The
default run keeps the two that exercise their own DP-step paths under sharding (DP-
LFlow's per-class routed clipping, DP-LoRA's adapters over frozen weights); the others
take 15-100 s each on 2 cores and are 'slow'.

Needs >= 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4, as the Makefile
sets)."""

import importlib
import json

import jax
import numpy as np
import pytest

from dpjax import train
from tests.config_overrides import with_overrides
from tests.test_dpsad import teachers  # noqa: F401 (its module-scoped fixture, used below)

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason="needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)",
)
SLOW = pytest.mark.slow
CASES = [
    ("dplflow_fmnist", "smoke,per_class=True"),  # Routed (per-class) clipping.
    ("ldm_fmnist", "smoke,variant=lora"),
    pytest.param("ldm_fmnist", "smoke", marks=SLOW),
    pytest.param("ldm_fmnist", "smoke,stage=public", marks=SLOW),  # dp.enabled=False.
    pytest.param("ae_mnist", "smoke", marks=SLOW),
    pytest.param("features_mnist", "smoke", marks=SLOW),
    pytest.param("dpdm_fmnist", "smoke", marks=SLOW),
]


def replay_config(config, **over):
    return with_overrides(config, {"dp.steps": 4, "train.ckpt_every": 2,
                                   "train.grid_samples": 0, **over})


def leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.as_dict())]


def check_replay(make_config, tmp_path):
    """``make_config(**over)``: the run's config with ``over`` set. Stopped after 2 steps
    (``train.max_steps_per_run``, a free field: the same run) and resumed, it ends with
    every leaf of the state equal to an uninterrupted run's."""
    quiet = lambda *_: None  # noqa: E731
    ref = train.train(make_config(), str(tmp_path / "ref"), log=quiet)
    wd = str(tmp_path / "resumed")
    first = train.train(make_config(**{"train.max_steps_per_run": 2}), wd, log=quiet)
    assert int(first.step) == 2
    resumed = train.train(make_config(), wd, log=quiet)
    for a, b in zip(leaves(ref), leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    four = train.train(make_config(**{"train.num_devices": 4}), str(tmp_path / "four"), log=quiet)
    assert len(jax.tree_util.tree_leaves(four.trainable)[0].sharding.device_set) == 4
    for a, b in zip(leaves(ref), leaves(four), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    reports = [json.loads((tmp_path / d / "privacy_report.json").read_text())
               for d in ("ref", "resumed", "four")]
    assert reports[0]["epsilon"] == reports[1]["epsilon"] == reports[2]["epsilon"]
    assert reports[0]["steps_done"] == reports[1]["steps_done"] == reports[2]["steps_done"] == 4


@pytest.mark.parametrize("name,arg", CASES)
def test_every_method_resumes_bit_identically_and_trains_alike_on_four_devices(
        name, arg, tmp_path, same_noise_secret):
    module = importlib.import_module(f"experiments.{name}")
    check_replay(lambda **over: replay_config(module.get_config(arg), **over), tmp_path)


@SLOW  # 44 s and the teachers' 9 s on 2 cores.
def test_a_dpsad_student_resumes_bit_identically_and_trains_alike_on_four_devices(
        teachers, tmp_path, same_noise_secret):  # noqa: F811 (the fixture)
    from experiments import dpsad_fmnist

    arg = f"smoke,teacher={teachers['dp']}"
    check_replay(lambda **over: replay_config(dpsad_fmnist.get_config(arg), **over), tmp_path)
