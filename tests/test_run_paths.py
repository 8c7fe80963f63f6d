"""A run's config names other runs and its data by path: stored absolute, read anywhere."""

from __future__ import annotations

import json
import os

import ml_collections
import pytest

from dpjax import run_paths, sample, train
from dpjax.typed_config import ConfigError
from experiments import dpdm_fmnist
from tests.config_overrides import with_overrides


def test_relative_local_paths_become_absolute_and_nothing_else_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict({
        "data": {"path": "data/{split}.npz", "tfds_data_dir": "gs://bucket/tfds",
                 "source": "npz", "name": "mine"},
        "method_args": {"init_from": "runs/public", "teacher_from": "", "features_from":
                        "/abs/features", "autoencoder_from": "~/ae", "trainable": "rel"},
        "seed": 0,
    })
    config.lock()
    assert run_paths.relative_source_paths(config) == {
        "data.path": "data/{split}.npz", "method_args.init_from": "runs/public",
        "method_args.autoencoder_from": "~/ae"}
    out = run_paths.absolute_source_paths(config)
    assert out.data.path == str(tmp_path / "data" / "{split}.npz")  # The placeholder stays.
    assert out.method_args.init_from == str(tmp_path / "runs" / "public")
    assert out.method_args.autoencoder_from == os.path.join(os.path.expanduser("~"), "ae")
    # A URL, an empty default, an absolute path and fields that hold no path: as given.
    assert out.data.tfds_data_dir == "gs://bucket/tfds" and out.method_args.teacher_from == ""
    assert out.method_args.features_from == "/abs/features"
    assert out.method_args.trainable == "rel" and out.data.name == "mine"
    assert out.is_locked and config.method_args.init_from == "runs/public"  # A copy.
    stored = json.loads(config.to_json())  # A config.json's dict: the same.
    assert run_paths.absolute_source_paths(stored) == json.loads(out.to_json())
    assert stored["method_args"]["init_from"] == "runs/public"
    assert run_paths.absolute_source_paths(json.loads(out.to_json())) == json.loads(out.to_json())


def test_a_run_that_names_its_source_by_a_relative_path_is_read_from_anywhere(
    tmp_path, monkeypatch
):
    """A private fine-tune started with ``init_from=runs/public`` (relative to where it was
    launched) stores the source absolute, so sampling it from another directory finds the
    source; it resumes from its own directory with the same relative command. A run
    stored relative (before paths were made absolute) still resumes there, and elsewhere
    fails with one message that names the relative path and the directory it resolved in."""
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    os.makedirs(launch / "runs")
    os.makedirs(elsewhere)
    monkeypatch.chdir(launch)
    quiet = lambda *_: None  # noqa: E731
    public = with_overrides(dpdm_fmnist.get_config("smoke"), {"dp.enabled": False})
    train.train(public, "runs/public", log=quiet)
    finetune = with_overrides(dpdm_fmnist.get_config("smoke"), {
        "method_args.init_from": "runs/public", "method_args.trainable": ("attn",),
        "data.fake_seed": 1})  # Other data than the public run's.
    private = str(launch / "runs" / "private")
    train.train(finetune, private, log=quiet)
    config_path = os.path.join(private, "config.json")
    with open(config_path) as f:
        stored = json.load(f)
    assert stored["method_args"]["init_from"] == str(launch / "runs" / "public")
    monkeypatch.chdir(elsewhere)
    method, _, _, cfg, step = sample.load_trained(private)
    assert step > 0 and cfg.method_args.init_from == str(launch / "runs" / "public")
    monkeypatch.chdir(launch)
    logs: list[str] = []
    train.train(finetune, private, log=logs.append)  # The same relative command: a resume.
    assert any("resumed from step" in line for line in logs), logs

    # A run stored before: its config.json holds the path as typed.
    stored["method_args"]["init_from"] = "runs/public"
    with open(config_path, "w") as f:
        json.dump(stored, f)
    train.train(finetune, private, log=quiet)  # Its resume compares the resolved paths.
    assert sample.load_trained(private)[4] == step  # From where it was started: found.
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError) as e:
        sample.load_trained(private)
    message = str(e.value)
    assert config_path in message and "init_from='runs/public'" in message
    assert str(elsewhere) in message and "directory the run was started in" in message
