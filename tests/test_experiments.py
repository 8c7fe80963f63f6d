"""Every experiment file builds its configs and trains 2 smoke steps end to end; a
private one is exported and its export sampled again without the workdir."""

import glob
import os
import re

import numpy as np
import pytest

from dpjax import export, released, sample, train
from dpjax.typed_config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def _load(name):
    import importlib

    return importlib.import_module(f"experiments.{name}")


def test_there_are_experiments():
    assert {"dpdm_fmnist", "dpdm_mnist", "dpdm_cifar10", "dpdm_celeba32"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_docstring_gives_the_command_and_for_a_private_run_epsilon_and_the_paper(name):
    """What the README promises of every experiment file."""
    module = _load(name)
    doc = module.__doc__ or ""
    assert f"--config=experiments/{name}.py" in doc, name
    if module.get_config("smoke").dp.enabled and name != "toy_fake":
        assert re.search(r"epsilon|eps=", doc, re.I), name
        assert re.search(r"published|paper", doc, re.I), name


# The variants for other datasets run the same code as the Fashion-MNIST files on fake
# data of another shape; their smoke runs take up to a minute each on 2 cores, so they
# are 'slow'.
# Every experiment's config still builds in the default run (test below).
SLOW_SMOKE = {
    "dpdm_mnist",
    "dpdm_cifar10",
    "dpdm_celeba32",
    # The same for DP-MEPF, its feature networks and the LDM pairs on other shapes:
    "dpmepf_cifar10",
    "dpmepf_celeba32",
    "features_imagenet32",
    "ldm_cifar10",
    "ldm_mnist",
    "ldm_celeba32",
    "ldm_celeba64",
}
# Experiments whose smoke run needs a teacher workdir made first; their own test file
# builds one and runs the same smoke checks (tests/test_dpsad.py).
NEEDS_TEACHER = {"dpsad_fmnist": "tests/test_dpsad.py"}


def _smoke_param(name):
    if name in NEEDS_TEACHER:
        return pytest.param(name, marks=pytest.mark.skip(reason=f"in {NEEDS_TEACHER[name]}"))
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW_SMOKE else name


@pytest.mark.parametrize("name", [_smoke_param(n) for n in EXPERIMENTS])
def test_smoke_run(name, tmp_path):
    config = _load(name).get_config("smoke")
    assert config.dp.steps == 2
    state = train.train(config, str(tmp_path), log=lambda *_: None)
    assert int(state.step) == 2
    makes_images = config.train.grid_samples > 0  # 0: a public feature network, no images.
    for f in ("dp_plan.json", "privacy_report.json", "privacy_report.md", "metrics.jsonl"):
        assert os.path.exists(tmp_path / f), f
    assert os.path.exists(tmp_path / "config.json")
    assert os.path.exists(tmp_path / "samples_grid.png") == makes_images
    if not makes_images:
        with pytest.raises(NotImplementedError, match="generates no images"):
            sample.sample_from_workdir(str(tmp_path), 4, str(tmp_path / "s"))
        return
    path = sample.sample_from_workdir(str(tmp_path), 4, str(tmp_path / "s"))
    with np.load(path) as z:  # The batch the samples depend on, clamped to their count.
        assert z["images"].shape[0] == 4 and int(z["sample_batch"]) == 4
    if not config.dp.enabled:
        return
    # Every method rebuilds from its export alone (``make_released``), to the same draw.
    out = str(tmp_path / "release")
    export.export_run(str(tmp_path), out, num_samples=3, log=lambda *_: None)
    again = released.sample_from_export(out, str(tmp_path / "again"), log=lambda *_: None)
    with np.load(again) as a, np.load(os.path.join(out, "samples.npz")) as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_default_configs_build_and_reject_typos(name):
    module = _load(name)
    module.get_config("")
    with pytest.raises(ConfigError, match="Unknown experiment argument"):
        module.get_config("smoke,no_such_arg=1")
    # And an argument that a preset flag would silently override (arguments_take_effect).
    assert getattr(module.get_config, "arguments_take_effect", False) is True


# Training-split sizes of the datasets the experiment files name (TFDS and Debian).
_TRAIN_SIZES = {"fashion_mnist": 60000, "mnist": 60000, "cifar10": 50000, "celeb_a": 162770}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_private_default_config_has_delta_below_one_over_n(name):
    """make_plan refuses delta >= 1/N; an experiment must not ship a config it refuses
    (CelebA's 162,770 images need delta < 6.1e-6)."""
    c = _load(name).get_config("")
    if c.dp.enabled and c.data.name in _TRAIN_SIZES:
        assert c.dp.delta < 1.0 / _TRAIN_SIZES[c.data.name], (name, c.dp.delta)


def test_an_argument_a_preset_overrides_is_refused_with_the_override_that_works():
    """``dpdm_fmnist.py:quick,batch=64`` trained at quick's batch 32, and ``quick,cpu`` was
    the cpu run, silently (review of 2026-12-06)."""
    from experiments import dpdm_fmnist, toy_fake

    with pytest.raises(ConfigError, match=r"'batch=64' has no effect with \['quick'\].*"
                       r"--config.dp.batch_size=64"):
        dpdm_fmnist.get_config("quick,batch=64")
    with pytest.raises(ConfigError, match="'quick' has no effect with \\['cpu'\\]"):
        dpdm_fmnist.get_config("quick,cpu")
    assert dpdm_fmnist.get_config("quick,eps=1").dp.epsilon == 1.0  # Not a preset's key.
    assert dpdm_fmnist.get_config("quick,eps=10").dp.epsilon == 10.0  # The default: fine.
    with pytest.raises(ConfigError, match="'batch=64' has no effect"):
        dpdm_fmnist.get_config("quick=True,batch=64")  # A flag spelled as a value.
    with pytest.raises(ConfigError, match="--config.method_args.noise_multiplicity=4"):
        dpdm_fmnist.get_config("cpu,K=4")
    # smoke replaces the model and the DP settings by design: any point runs under it
    # (a sweep's smoke check over eps), and the toy's smoke keeps its given sigma.
    assert dpdm_fmnist.get_config("smoke,eps=1").dp.steps == 2
    assert toy_fake.get_config("smoke,sigma=0.5").dp.noise_multiplier == 0.5


def test_dpdm_paper_configs():
    from experiments import dpdm_fmnist

    for eps, precond in [(10.0, "edm"), (1.0, "edm"), (0.2, "v")]:
        c = dpdm_fmnist.get_config(f"eps={eps}")
        assert c.dp.epsilon == eps and c.method_args.precond == precond
        assert c.dp.batch_size == 4096 and c.method_args.noise_multiplicity == 32
        assert c.dp.epochs == 300 and c.dp.clip_norm == 1.0 and c.dp.delta == 1e-5


def test_dpdm_cpu_run_is_one_epoch_of_the_quick_unet_in_one_micro_batch():
    from dpjax.privacy.sampling import PoissonSampler
    from experiments import dpdm_fmnist

    quick, cpu = dpdm_fmnist.get_config("quick"), dpdm_fmnist.get_config("cpu,eps=1")
    # The demo's UNet, with one noise draw per example instead of two.
    assert cpu.method_args.noise_multiplicity == 1 and quick.method_args.noise_multiplicity == 2
    for key in ("unet", "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "num_steps"):
        assert cpu.method_args[key] == quick.method_args[key], key
    assert (cpu.dp.batch_size, cpu.dp.steps, cpu.dp.epsilon) == (512, 120, 1.0)
    assert 1.0 <= cpu.dp.batch_size * cpu.dp.steps / 60_000 < 1.1  # one epoch
    # The whole padded Poisson batch is one micro-batch on the ghost path.
    padded = PoissonSampler(60_000, 512 / 60_000, seed=0).base_size
    assert cpu.dp.microbatch_size == padded == 649 and cpu.dp.clipping == "ghost"
    assert quick.dp.microbatch_size == 67 and quick.dp.batch_size == 32
