"""--mode=eval on a smoke run: eval.json, the markdown report and its images."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from dpjax import train
from dpjax.eval import fid, report
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import report as report_lib
from dpjax.typed_config import ConfigError
from experiments import toy_fake


def _fake_features(images, batch_size=200, **kwargs):
    """A cheap stand-in for Inception: a fixed random projection of the pixels."""
    x = np.asarray(images, np.float32).reshape(len(images), -1)
    proj = np.random.default_rng(0).normal(size=(x.shape[1], 16)).astype(np.float32)
    return x @ proj


def test_eval_writes_json_and_report(tmp_path, monkeypatch):
    wd = str(tmp_path)
    train.train(toy_fake.get_config("smoke"), wd, log=lambda *_: None)
    monkeypatch.setattr(fid, "inception_features", _fake_features)
    monkeypatch.setenv("DPJAX_CACHE", str(tmp_path / "cache"))
    cfg = report.EvalConfig(
        num_samples=30,
        sample_batch=30,
        fid=True,
        downstream_models=("logreg",),
        downstream_epochs=1,
    )
    result = report.evaluate_workdir(wd, cfg, log=lambda *_: None)
    assert set(result["fid"]) == {"train", "test"}
    assert all(np.isfinite(v) and v >= 0 for v in result["fid"].values())
    assert 0.0 <= result["downstream"]["logreg"]["test_accuracy"] <= 1.0
    assert set(result["memorization"]) == {"pixel", "features"}
    assert "bits_per_dim" not in result  # the toy method has no exact likelihood
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["num_samples"] == 30 and saved["privacy"]["private"] is True
    assert saved["eval_config"]["sample_batch"] == 30  # The batch the samples came from,
    assert saved["eval_config"]["fid_batch"] == report.fid_batch_size(cfg)  # And Inception's.
    md = (tmp_path / "eval_report.md").read_text()
    assert "FID" in md and "logreg" in md and "eval_closest_pixel.png" in md
    # How many real images each FID reference holds is recorded and shown.
    n = saved["real_images"]
    assert set(n) == {"train", "test"} and min(n.values()) > 0, n
    run = json.loads((tmp_path / "config.json").read_text())["data"]
    assert saved["data"] == {k: run[k] for k in ("source", "name", "split")}  # No limit.
    assert f"| train | {n['train']} |" in md and "limited to their first" not in md
    assert md.splitlines()[2].startswith("**Not differentially private: do not publish.**")
    assert os.path.exists(tmp_path / "eval_closest_pixel.png")
    # The report shows the samples folder's grid: one grid per set of samples.
    grid = f"samples/step_{saved['step']}/samples_grid.png"
    assert saved["samples_grid"] == grid and f"![samples]({grid})" in md
    assert os.path.exists(tmp_path / grid)
    assert not os.path.exists(tmp_path / "eval_samples_grid.png")
    # A second evaluation reuses the stored samples, and redraws a lost grid.
    os.remove(tmp_path / grid)
    msgs = []
    again = report.evaluate_workdir(wd, dataclasses.replace(cfg, sample_batch=7),
                                    log=msgs.append)
    assert any("reusing" in m for m in msgs)
    assert again["eval_config"]["sample_batch"] == 30  # What made them, not the setting.
    assert os.path.exists(tmp_path / grid)


def test_the_sampler_digest_follows_the_method_and_its_arguments(tmp_path):
    base = {"method": "dpdm", "method_args": {"num_steps": 18}, "train": {"log_every": 1}}
    digests = []
    for cfg in (base, {**base, "train": {"log_every": 5}},
                {**base, "method_args": {"num_steps": 50}}, {**base, "method": "dpsad"}):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        digests.append(report.sampler_definition_digest(str(tmp_path)))
    assert digests[0] == digests[1] and len(set(digests)) == 3, digests


def test_eval_section_typos_are_errors():
    from dpjax.typed_config import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'num_samples'"):
        report.eval_config({"num_sample": 3})


def test_eval_states_the_guarantee_of_the_evaluated_checkpoint(tmp_path):
    """A killed invocation leaves privacy_report.json at an earlier step; the eval report
    must state the epsilon of the weights it evaluates, from the checkpoint itself."""
    wd = str(tmp_path)
    train.train(toy_fake.get_config("smoke"), wd, log=lambda *_: None)
    path = tmp_path / "privacy_report.json"
    final = json.loads(path.read_text())
    assert final["steps_done"] > 0
    stale = {**final, "steps_done": 0, "epsilon": {k: 0.0 for k in final["epsilon"]}}
    path.write_text(json.dumps(stale))
    cfg = report.EvalConfig(num_samples=20, sample_batch=20, fid=False, downstream_models=(),
                            memorization=False)  # fmt: skip
    result = report.evaluate_workdir(wd, cfg, log=lambda *_: None)
    assert result["privacy"]["steps_done"] == result["step"] == final["steps_done"]
    assert result["privacy"]["epsilon"] == final["epsilon"]


def test_report_says_when_the_real_splits_are_limited():
    """data.limit (a CPU run's first N examples) limits the test split too: FID against
    the first 5,000 test images is not the paper's FID against all 10,000."""
    result = {"step": 3, "num_samples": 100, "fid": {"train": 81.5, "test": 83.25},
              "real_images": {"train": 5000, "test": 5000},
              "data": {"source": "idx", "name": "fashion_mnist", "split": "train",
                       "limit": 5000}}
    md = report.report_markdown(result)
    assert "| test | 5000 | 83.25 |" in md
    assert "limited to their first 5000 images (the run's data.limit)" in md
    # An eval.json written before the data section: the limit among the splits.
    old = {**result, "real_images": {**result["real_images"], "data.limit": 5000}}
    del old["data"]
    assert "limited to their first 5000 images" in report.report_markdown(old)


def test_report_rounds_epsilon_and_counts():
    privacy = {
        "epsilon": {"rdp": 9.999809066130027, "pld": None},
        "delta": 1e-5,
        "noise_multiplier": 0.45590553689809266,
        "steps_done": 120,
    }
    result = {
        "step": 120,
        "num_samples": 10000,
        "privacy": privacy,
        "memorization": {"pixel": {"num_samples": 10000.0, "nn_distance_median": 13.240859}},
    }
    md = report.report_markdown(result)
    # Rounded UP to 4 significant digits, as every privacy report states an epsilon (a
    # nearest rounding, 9.9998 here, stated a bound below the computed one).
    assert "epsilon 10 (RDP) / n/a (PLD) at delta 1e-05, sigma 0.4559, 120 steps." in md
    assert "num_samples=10000, nn_distance_median=13.2409" in md
    # A non-finite epsilon is stored as a string (RDP under replace-one, a run without
    # DP): the report crashed on it, after eval.json was written (consistency review).
    privacy["epsilon"] = {"rdp": "nan", "pld": 8.300017}
    md = report.report_markdown(result)
    assert "epsilon nan (RDP) / 8.301 (PLD)" in md
    privacy["epsilon"] = {"rdp": "inf", "pld": "inf"}
    assert "epsilon inf (RDP) / inf (PLD)" in report.report_markdown(result)
    # A run whose privacy report says it has no guarantee: the eval report says so too.
    plan = plan_lib.make_plan(num_examples=100, batch_size=10, delta=1e-5, clip_norm=1.0,
                              steps=1, noise_multiplier=1.0)
    for loss, said in (("seed", True), ("secret", False)):
        result["privacy"] = report_lib.privacy_report(plan, 1, "toy", kinds=("rdp",),
                                                      noise_source="secret", loss_source=loss)
        md = report.report_markdown(result)
        assert ("Private: not for release: the per-example loss draws" in md) == said, md
        # Its epsilon is no guarantee, and the report does not call it one.
        assert ("The model's guarantee" in md) != said, md
        assert ("The model has no guarantee; the accountant gives epsilon" in md) == said, md


def test_each_image_set_goes_through_inception_once_and_a_killed_eval_resumes(
        tmp_path, monkeypatch):
    """Samples, train and test are embedded once (FID and memorization share them);
    a second eval embeds nothing; sampling killed mid-way resumes with the same images."""
    from dpjax import sample as sample_lib

    wd = str(tmp_path / "run")
    train.train(toy_fake.get_config("smoke"), wd, log=lambda *_: None)
    seen = []

    def counting_features(images, batch_size=200, **kwargs):
        seen.append(len(images))
        return _fake_features(images)

    monkeypatch.setattr(fid, "inception_features", counting_features)
    monkeypatch.setenv("DPJAX_CACHE", str(tmp_path / "cache"))
    cfg = report.EvalConfig(num_samples=30, sample_batch=10, fid=True, fid_batch=4,
                            downstream=False)
    method, params, spec, run_cfg, step = sample_lib.load_trained(wd)
    n_train = len(report.data_lib.load(run_cfg.data))
    n_test = len(report.data_lib.load(
        report.dataclasses.replace(run_cfg.data, split="test")))

    # Kill the sampler after two of its three batches (each batch ends in to_uint8).
    real_to_uint8, batches = sample_lib.to_uint8, []

    def dying_to_uint8(images):
        batches.append(1)
        if len(batches) > 2:
            raise KeyboardInterrupt
        return real_to_uint8(images)

    monkeypatch.setattr(sample_lib, "to_uint8", dying_to_uint8)
    with pytest.raises(KeyboardInterrupt):
        report.evaluate_workdir(wd, cfg, log=lambda *_: None)
    monkeypatch.setattr(sample_lib, "to_uint8", real_to_uint8)
    # A training resume meanwhile rewrote config.json's fields that do not define the
    # sampler (a train.* setting, a free dp field): the samples resume all the same.
    path = os.path.join(wd, "config.json")
    with open(path) as f:
        stored = json.load(f)
    before = report.sampler_definition_digest(wd)
    stored["train"]["log_every"] = 7
    stored["dp"]["microbatch_size"] = 1
    with open(path, "w") as f:
        json.dump(stored, f)
    assert report.sampler_definition_digest(wd) == before
    msgs = []
    result = report.evaluate_workdir(wd, cfg, log=msgs.append)
    assert any("resuming samples_in_progress.npy at row 20 of 30" in m for m in msgs)
    assert sum(seen) == 30 + n_train + n_test, seen
    out_dir = os.path.join(wd, "samples", f"step_{step}")
    assert sorted(os.listdir(out_dir)) == [
        "inception_pool3.json", "inception_pool3.lock", "inception_pool3.npy",
        "samples.lock", "samples.npz", "samples_grid.png", "samples_in_progress.lock"]
    # The resumed samples are the ones an uninterrupted run draws.
    key = report.jax.random.fold_in(report.Streams.from_seed(run_cfg.seed).sample, 1_000_000)
    expected, _ = sample_lib.generate(method, params, spec, key, 30, 10)
    with np.load(os.path.join(out_dir, "samples.npz")) as z:
        np.testing.assert_array_equal(z["images"], expected)
    # Everything is cached now: a second eval embeds no image.
    seen.clear()
    again = report.evaluate_workdir(wd, cfg, log=lambda *_: None)
    assert seen == []
    assert again["fid"] == result["fid"]
    assert again["memorization"] == result["memorization"]
    # A samples.npz cut short (by a kill under an older version) is sampled again.
    npz = os.path.join(out_dir, "samples.npz")
    with open(npz, "rb") as f:
        head = f.read(100)
    with open(npz, "wb") as f:
        f.write(head)
    msgs.clear()
    report.evaluate_workdir(wd, cfg, log=msgs.append)
    assert any("unreadable" in m for m in msgs)
    with np.load(npz) as z:
        np.testing.assert_array_equal(z["images"], expected)


def test_the_batch_sizes_are_chosen_for_the_backend_unless_set(monkeypatch):
    default = report.EvalConfig()
    assert default.fid_batch == default.sample_batch == 0
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert (report.fid_batch_size(default), report.sample_batch_size(default)) == (8, 50)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert (report.fid_batch_size(default), report.sample_batch_size(default)) == (200, 1000)
    chosen = report.EvalConfig(fid_batch=50, sample_batch=3)
    assert (report.fid_batch_size(chosen), report.sample_batch_size(chosen)) == (50, 3)
    with pytest.raises(ConfigError, match="fid_batch"):
        report.fid_batch_size(report.EvalConfig(fid_batch=-1))
    with pytest.raises(ConfigError, match="sample_batch"):
        report.sample_batch_size(report.EvalConfig(sample_batch=-1))


def test_the_batch_flags_reach_the_eval_and_a_bad_one_fails_before_sampling(tmp_path):
    from tests.test_export import cli

    wd = str(tmp_path)
    train.train(toy_fake.get_config("smoke"), wd, log=lambda *_: None)
    result = cli("--mode=eval", f"--workdir={wd}", "--fid_batch=-1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "eval.fid_batch must be >= 0" in result.stderr
    result = cli("--mode=eval", f"--workdir={wd}", "--sample_batch=-2")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "eval.sample_batch must be >= 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "eval.json")
    assert not os.path.exists(tmp_path / "samples")


def test_the_eval_flags_are_refused_in_other_modes(tmp_path):
    from tests.test_export import cli

    result = cli("--mode=sample", f"--workdir={tmp_path}", "--sample_batch=10")
    assert result.returncode != 0
    assert "--sample_batch applies to --mode=eval only" in result.stderr


def test_eval_skips_what_the_data_or_the_method_cannot_support(tmp_path, monkeypatch):
    """Review of 2026-12-06: an npz file without '{split}' has no test split (its "test"
    was the training file again: FID and accuracy "on the test set" were on the private
    training images), and a method whose samples ignore their labels got a chance-level
    accuracy reported as real. Both are skipped and said so; a TFDS name with a builder
    config is a valid cache key."""
    from dpjax.data.config import DataConfig
    from dpjax.methods import toy
    from tests.test_train_loop import _config

    monkeypatch.setattr(fid, "inception_features", _fake_features)
    monkeypatch.setenv("DPJAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    npz = tmp_path / "data.npz"
    np.savez(npz, images=rng.integers(0, 256, (64, 28, 28, 1), np.uint8),
             labels=np.arange(64) % 10)
    wd = str(tmp_path / "run")
    train.train(_config(steps=2, **{"data.source": "npz", "data.path": str(npz),
                                    "data.fake_num_examples": 64, "train.grid_samples": 0}),
                wd, log=lambda *_: None)
    cfg = report.EvalConfig(num_samples=20, sample_batch=20, fid=True,
                            downstream_models=("logreg",), downstream_epochs=1)
    result = report.evaluate_workdir(wd, cfg, log=lambda *_: None)
    assert set(result["fid"]) == {"train"} and "downstream" not in result
    assert "data has no test split" in result["skipped"][0]
    assert "skipped: FID vs test" in (tmp_path / "run" / "eval_report.md").read_text()
    monkeypatch.setattr(toy.Toy, "samples_follow_labels", False)
    wd2 = str(tmp_path / "run2")
    train.train(toy_fake.get_config("smoke"), wd2, log=lambda *_: None)
    result = report.evaluate_workdir(wd2, cfg, log=lambda *_: None)
    assert "downstream" not in result and set(result["fid"]) == {"train", "test"}
    assert "samples do not follow their labels" in result["skipped"][0]
    assert DataConfig(source="npz", path="x_{split}.npz").has_test_split()
    name = report.reference_name(DataConfig(source="tfds", name="emnist/letters"), "train", 5)
    assert name == "tfds-emnist_letters-train-n5"


def test_eval_that_needs_more_samples_replaces_a_sample_output_whole(tmp_path):
    """--mode=sample's 5 samples, with PNGs, in the checkpoint's samples folder; an eval
    of 20 draws 20 and replaces them. It says so, and the folder describes one set: the
    PNGs of the 5 are gone and the grid is the 20's (it stayed the 5's)."""
    from PIL import Image

    from dpjax import sample as sample_lib

    wd = str(tmp_path / "run")
    train.train(toy_fake.get_config("smoke"), wd, log=lambda *_: None)
    path = sample_lib.sample_from_workdir(wd, num=5, png=True, log=lambda *_: None)
    folder = os.path.dirname(path)
    assert os.path.isdir(os.path.join(folder, "png"))
    grid = os.path.join(folder, "samples_grid.png")
    with Image.open(grid) as im:
        small = im.size
    msgs = []
    cfg = report.EvalConfig(num_samples=20, sample_batch=20, fid=False, downstream_models=(),
                            memorization=False)  # fmt: skip
    result = report.evaluate_workdir(wd, cfg, log=msgs.append)
    assert result["num_samples"] == 20
    assert any("holds 5 samples, fewer than eval.num_samples=20" in m for m in msgs), msgs
    with np.load(path) as z:
        assert len(z["images"]) == 20
    assert not os.path.exists(os.path.join(folder, "png"))
    with Image.open(grid) as im:
        assert im.size != small  # Redrawn from the 20 (more per class row).


def test_eval_json_is_strict_json_whatever_the_numbers(tmp_path):
    """A sampler's s_max is inf and a memorization ratio over a zero median is inf:
    eval.json stores them as strings, as the privacy report stores a non-finite epsilon,
    so that strict parsers (JavaScript's JSON.parse) read the file."""
    import jax.numpy as jnp

    result = {"sampler": {"s_max": float("inf"), "s_churn": 0.0},
              "memorization": {"pixel": {"median_ratio_to_train": np.float32("inf"),
                                         "nn_distance_min": np.float64(1.5)}},
              "fid": {"train": jnp.float32(12.5)}, "nan": [float("nan"), -float("inf")],
              "count": np.int64(3), "ok": np.bool_(True)}
    report._write_json(str(tmp_path), result)  # Through atomic_file.json_safe.

    def reject(token):
        raise ValueError(f"not JSON: {token}")

    saved = json.loads((tmp_path / "eval.json").read_text(), parse_constant=reject)
    assert saved["sampler"] == {"s_max": "inf", "s_churn": 0.0}
    assert saved["memorization"]["pixel"] == {"median_ratio_to_train": "inf",
                                              "nn_distance_min": 1.5}
    assert saved["fid"] == {"train": 12.5} and saved["nan"] == ["nan", "-inf"]
    assert saved["count"] == 3 and saved["ok"] is True
