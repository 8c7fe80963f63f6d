"""eval.sampling: evaluating (or sampling) a trained diffusion run with another sampler.

Sampling post-processes the released weights, so a run trained with one sampler in its
config can be evaluated with another (DPDM's Churn samplers) at no privacy cost; the
samples of each sampler are kept apart, and the settings used are recorded.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from ml_collections import config_dict

from dpjax import sample as sample_lib
from dpjax import train
from dpjax.diffusion.samplers import SamplerOverrides
from dpjax.eval import report
from dpjax.typed_config import ConfigError, from_configdict, to_configdict
from experiments import dpdm_fmnist, toy_fake

_CFG = report.EvalConfig(num_samples=6, sample_batch=6, fid=False, downstream=False,
                         memorization=False, bits_per_dim=False)  # fmt: skip


@pytest.fixture(scope="module")
def dpdm_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("dpdm") / "run")
    train.train(dpdm_fmnist.get_config("smoke"), wd, log=lambda *_: None)
    return wd


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_optional_fields_become_typed_placeholders_that_round_trip():
    c = to_configdict(report.EvalConfig())
    assert c.sampling.s_churn is None and c.sampling.sampler is None
    c.sampling.s_churn = 50  # An int is taken as the float it stands for.
    c.sampling.sampler = "heun"
    with pytest.raises(TypeError):
        c.sampling.num_steps = "many"
    typed = from_configdict(report.EvalConfig, c, "eval")
    assert typed.sampling == SamplerOverrides(sampler="heun", s_churn=50.0)
    assert typed.sampling.given() == {"sampler": "heun", "s_churn": 50.0}
    assert isinstance(to_configdict(SamplerOverrides())._fields["rho"],
                      config_dict.FieldReference)
    with pytest.raises(ConfigError, match="Did you mean 's_churn'"):
        report.eval_config({"sampling": {"s_chrun": 1.0}})
    with pytest.raises(ConfigError, match="not one of"):
        report.eval_config({"sampling": {"sampler": "dpm"}})


def test_another_sampler_draws_other_samples_into_their_own_folder(dpdm_run, monkeypatch):
    wd = dpdm_run
    recipes = []
    generate = sample_lib.generate

    def recording_generate(*args, recipe=None, **kwargs):
        recipes.append(recipe)
        return generate(*args, recipe=recipe, **kwargs)

    monkeypatch.setattr(sample_lib, "generate", recording_generate)
    base = report.evaluate_workdir(wd, _CFG, log=lambda *_: None)
    # The run's own sampler: no sampler changes in the recipe, so that adding the
    # eval.sampling option did not restart the resumes of the evals before it.
    assert set(recipes[-1]) == {"sampler", "step", "backend"}
    run_sampler = sample_lib.load_run_config(wd).method_args
    assert base["sampler"]["sampler"] == run_sampler.sampler == "ddim"
    assert base["sampler"]["changed"] == []
    default_dir = sample_lib.samples_dir(wd, base["step"])
    default_npz = os.path.join(default_dir, "samples.npz")
    before = _npz(default_npz)

    # s_churn as an int, as code may give it: the same setting as 10.0 (one folder).
    churn = SamplerOverrides(sampler="heun", s_churn=10, num_steps=run_sampler.num_steps)
    msgs = []
    result = report.evaluate_workdir(wd, dataclasses.replace(_CFG, sampling=churn),
                                     log=msgs.append)
    # num_steps equals the run's: not a change, so not part of the folder's key.
    assert result["sampler"]["changed"] == ["s_churn", "sampler"]
    assert result["sampler"]["sampler"] == "heun" and result["sampler"]["s_churn"] == 10.0
    changes = {"sampler": "heun", "s_churn": 10.0}
    churn_dir = sample_lib.samples_dir(wd, base["step"], changes)
    assert churn_dir.startswith(default_dir + os.sep) and churn_dir != default_dir
    drawn = _npz(os.path.join(churn_dir, "samples.npz"))
    assert json.loads(str(drawn["sampler_changes"])) == changes
    assert not any("reusing" in m for m in msgs)
    assert recipes[-1]["sampler_changes"] == changes
    # Same key and labels, another sampler: other images; the run's samples untouched.
    np.testing.assert_array_equal(drawn["labels"], before["labels"])
    assert not np.array_equal(drawn["images"], before["images"])
    for k, v in _npz(default_npz).items():
        np.testing.assert_array_equal(v, before[k])
    with open(os.path.join(wd, "eval.json")) as f:
        saved = json.load(f)
    assert saved["sampler"]["sampler"] == "heun"

    # The run's own settings, given explicitly, are no change: its samples are reused.
    msgs.clear()
    same = SamplerOverrides(sampler="ddim", num_steps=run_sampler.num_steps)
    report.evaluate_workdir(wd, dataclasses.replace(_CFG, sampling=same), log=msgs.append)
    assert any(f"reusing {default_npz}" in m for m in msgs)


def test_bad_sampler_settings_fail_before_anything_is_sampled(dpdm_run, tmp_path):
    wd = dpdm_run
    bad = dataclasses.replace(_CFG, sampling=SamplerOverrides(sigma_min=100.0))
    with pytest.raises(ConfigError, match="eval.sampling: need 0 < sigma_min < sigma_max"):
        report.evaluate_workdir(wd, bad, log=lambda *_: None)
    toy = str(tmp_path / "toy")
    train.train(toy_fake.get_config("smoke"), toy, log=lambda *_: None)
    heun = dataclasses.replace(_CFG, sampling=SamplerOverrides(sampler="heun"))
    with pytest.raises(ConfigError, match="method 'toy' samples without a diffusion sampler"):
        report.evaluate_workdir(toy, heun, log=lambda *_: None)
    assert not os.path.exists(os.path.join(toy, "samples"))
    # A sampler setting that changes nothing is no error, whatever the method.
    report.evaluate_workdir(toy, _CFG, log=lambda *_: None)


def test_samples_of_another_eval_seed_are_drawn_again(tmp_path):
    wd = str(tmp_path)
    train.train(toy_fake.get_config("smoke"), wd, log=lambda *_: None)
    report.evaluate_workdir(wd, _CFG, log=lambda *_: None)
    npz = os.path.join(sample_lib.samples_dir(wd, 2), "samples.npz")
    first = _npz(npz)
    assert int(first["sample_seed"]) == 0
    msgs = []
    report.evaluate_workdir(wd, dataclasses.replace(_CFG, seed=1), log=msgs.append)
    assert any("drawn with eval.seed=0; sampling again" in m for m in msgs)
    second = _npz(npz)
    assert int(second["sample_seed"]) == 1
    assert not np.array_equal(first["images"], second["images"])


def test_sample_mode_takes_the_sampler_from_the_config(dpdm_run, tmp_path):
    from tests.test_export import cli

    result = cli("--mode=sample", f"--workdir={dpdm_run}", "--num=4",
                 f"--out={tmp_path / 'out'}",
                 "--config=experiments/dpdm_fmnist.py:smoke",
                 "--config.eval.sampling.sampler=euler_stochastic",
                 "--config.eval.sampling.s_churn=5")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = _npz(tmp_path / "out" / "samples.npz")
    assert json.loads(str(drawn["sampler_changes"])) == {"sampler": "euler_stochastic",
                                                         "s_churn": 5.0}
    assert drawn["images"].shape[0] == 4
    result = cli("--mode=sample", f"--workdir={dpdm_run}", "--num=4",
                 "--config=experiments/dpdm_fmnist.py:smoke",
                 "--config.eval.sampling.rho=-1")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "eval.sampling: rho must be > 0, got -1.0." in result.stderr
