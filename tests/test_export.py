"""--mode=export: only publishable files, only from a private run; clear errors otherwise."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import atomic_file, export, export_manifest, released, run_config, sample, train
from dpjax import checkpoint as ckpt_lib
from dpjax.methods import get_method_module
from dpjax.methods.base import DataSpec
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import report as report_lib
from dpjax.randomness import Streams
from dpjax.state import TrainState
from experiments import toy_fake
from tests.config_overrides import with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = [
    "ema_params.npz",
    "manifest.json",
    "model_card.md",
    "model_config.json",
    "privacy_report.json",
    "privacy_report.md",
    "samples.npz",
    "samples_grid.png",
]
# Strings that only non-publishable artifacts contain.
FORBIDDEN = [b"metrics", b"opt_state", b"private_loss", b"nonprivate", b"tensorboard"]


def toy_config(steps: int = 3, **over):
    """The toy experiment, shrunk (as tests/test_train_loop.py does)."""
    c = toy_fake.get_config(f"steps={steps}")
    c.unlock()
    c.train.progress = False
    c.train.log_every = 1
    c.train.ckpt_every = steps
    c.train.grid_samples = 0
    c.data.fake_num_examples = 128
    c.dp.batch_size = 16
    c.dp.microbatch_size = 16
    return with_overrides(c, over)


def fake_run(directory, steps: int = 3, releases=(), **over) -> str:
    """A workdir as training leaves it (config, plan, spec, one checkpoint), with no training.

    The checkpoint holds the initial parameters, with EMA weights deliberately different
    from the trainable ones. ``over`` overrides config keys, e.g. ``{'dp.enabled': False}``.
    """
    c = toy_config(steps, **over)
    cfg = run_config.from_configdict(c)
    wd = str(directory)
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "config.json"), "w") as f:
        f.write(run_config.config_to_json(c))
    plan = train.resolve_plan(cfg, cfg.data.fake_num_examples, wd)  # Writes dp_plan.json.
    spec = DataSpec(tuple(cfg.data.fake_image_shape), cfg.data.num_classes)
    sample.save_spec(wd, spec)
    method = get_method_module(cfg.method).make(cfg.method_args, spec)
    params = method.init(Streams.from_seed(cfg.seed).init, spec)
    opt = train.make_optimizer(cfg.optim)
    state = TrainState(
        jnp.asarray(steps, jnp.int32),
        params.trainable,
        params.frozen,
        opt.init(params.trainable),
        jax.tree_util.tree_map(lambda x: x + 0.25, params.trainable),
    )
    meta = {
        "plan": plan.to_dict(),
        "steps_done": steps,
        "epsilon_spent": {},
        "releases": list(releases),
        "method": cfg.method,
        # As training records it (privacy/noise_secret.py); export refuses 'seed' runs.
        "noise_source": "secret" if cfg.dp.secret_noise else "seed",
        "loss_source": "secret" if cfg.dp.secret_noise else "seed",
    }
    checkpointer = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"))
    checkpointer.save(steps, state, meta)
    checkpointer.close()
    return wd


def corrupt_latest_checkpoint(workdir: str, how: str = "truncate") -> None:
    """Damages the latest checkpoint: truncates its array files or deletes its manifest."""
    latest = max(glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")), key=os.path.getmtime)
    if how == "truncate":
        files = glob.glob(os.path.join(latest, "state", "**", "d", "*"), recursive=True)
        assert files
        for path in files:
            open(path, "w").close()
    else:
        files = glob.glob(os.path.join(latest, "state", "**", "manifest.ocdbt"), recursive=True)
        assert files
        for path in files:
            os.remove(path)


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dpjax.main", *args]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _no_forbidden_content(out: str) -> None:
    for name in os.listdir(out):
        with open(os.path.join(out, name), "rb") as f:
            data = f.read()
        for word in FORBIDDEN:
            assert word not in data, f"{name} contains {word!r}"


def test_export_of_a_trained_toy_run_writes_exactly_the_allowed_files(tmp_path):
    wd = str(tmp_path / "run")
    train.train(toy_config(3), wd, log=lambda *_: None)
    assert os.path.exists(os.path.join(wd, "metrics.jsonl"))  # What must NOT be exported.
    out = str(tmp_path / "release")
    # The workdir as typed relative to the current directory, the export absolute.
    command = f"python -m dpjax.main --mode=export --workdir={os.path.relpath(wd)} --out={out}/"
    names = export.export_run(wd, out, num_samples=20, command=command, log=lambda *_: None)
    assert names == EXPECTED == sorted(os.listdir(out))
    _no_forbidden_content(out)
    # The weights are the EMA weights, not the trainable ones, and nothing else.
    _, state, _, _ = sample.restore_state(wd)
    with np.load(os.path.join(out, "ema_params.npz")) as z:
        assert sorted(z.files) == ["log_scale", "mean"]
        np.testing.assert_array_equal(z["mean"], np.asarray(state.ema["mean"]))
        assert not np.array_equal(z["mean"], np.asarray(state.trainable["mean"]))
    with np.load(os.path.join(out, "samples.npz")) as z:
        assert sorted(z.files) == ["images", "labels"]
        assert z["images"].shape == (20, 28, 28, 1) and z["images"].dtype == np.uint8
    with open(os.path.join(out, "privacy_report.json")) as f:
        report = json.load(f)
    assert report["private"] and report["steps_done"] == 3
    assert 0 < report["epsilon"]["rdp"] < 10
    with open(os.path.join(out, "model_card.md")) as f:
        card = f.read()
    for section in ("## Data", "## Privacy guarantee", "## Intended use", "## Limitations"):
        assert section in card
    assert ("- The noise, the batches and the per-example loss draws came from a secret "
            "that the export does not contain") in card
    assert report["loss_source"] == report["noise_source"] == "secret"
    # The stated epsilon is the computed one rounded UP to 4 digits, delta as set.
    eps = report["epsilon"][report["calibrated_with"]]
    stated = re.search(r"- \(([0-9.e+-]+), ([0-9.e+-]+)\)-differential privacy", card)
    assert stated, card
    assert eps <= float(stated.group(1)) <= eps * (1 + 1e-3), (eps, stated.group(1))
    assert float(stated.group(2)) == report["delta"]
    # Where the run and the export lie on the trainer's disk is not released.
    assert ("Exported with: `python -m dpjax.main --mode=export --workdir=<the run's workdir> "
            "--out=<this export>/`") in card
    assert str(tmp_path) not in card
    assert "Evaluations of this model against the real data" in card
    assert "one example (an image with its label)" in card and "before its planned" not in card
    # An existing, non-empty output is never overwritten.
    with pytest.raises(export.ExportError, match="not empty"):
        export.export_run(wd, out, num_samples=2, log=lambda *_: None)


def test_non_private_runs_are_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "release"
    public = fake_run(tmp_path / "public", **{"dp.enabled": False})
    with pytest.raises(export.NotPrivateError, match="not differentially private"):
        export.export_run(public, str(out), num_samples=2, log=lambda *_: None)
    no_noise = fake_run(tmp_path / "no_noise", **{"dp.noise_multiplier": 0.0})
    with pytest.raises(export.NotPrivateError, match="epsilon is inf"):
        export.export_run(no_noise, str(out), num_samples=2, log=lambda *_: None)
    leaked = fake_run(
        tmp_path / "leak", releases=[{"kind": "non_private", "description": "a raw mean"}]
    )
    with pytest.raises(export.NotPrivateError, match="epsilon is inf"):
        export.export_run(leaked, str(out), num_samples=2, log=lambda *_: None)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export")]


def test_a_run_that_began_with_a_data_spec_now_refused_is_not_exported(tmp_path):
    """A private run from before a check of run_config.check_private_data_spec (it
    trained on a source's first rows, or measured a folder's image shape): its stated
    guarantee does not hold per contributor, so export refuses it, writing nothing."""
    out = tmp_path / "release"
    limited = fake_run(tmp_path / "limited", **{"data.limit": 100})
    with pytest.raises(export.NotPrivateError,
                       match="data.limit=100 is refused.*This run began with that"):
        export.export_run(limited, str(out), num_samples=2, log=lambda *_: None)
    measured = fake_run(tmp_path / "folder", **{"data.source": "folder", "data.path": "/x"})
    with pytest.raises(export.NotPrivateError, match="needs data.image_size and data.channels"):
        export.export_run(measured, str(out), num_samples=2, log=lambda *_: None)
    assert not out.exists()


def test_the_privacy_report_says_when_a_run_is_not_private(tmp_path):
    """'private: True' with epsilon inf (sigma 0), and 'sigma calibrated' for a sigma the
    config gave, misled (review of 2026-12-06)."""
    from dpjax.privacy import report as report_lib

    def markdown(name, **over):
        plan = export.read_plan(fake_run(tmp_path / name, **over))
        return report_lib.report_markdown(report_lib.privacy_report(plan, 3, "toy"))

    given = markdown("given")  # toy_config gives sigma.
    assert "- private: yes" in given
    assert "- target epsilon: none (the config gave sigma" in given
    assert "calibrated" not in given
    calibrated = markdown("calibrated", **{"dp.epsilon": 5.0, "dp.noise_multiplier": None})
    assert "- target epsilon: 5.0 (sigma calibrated with RDP)" in calibrated
    assert "- private: no (sigma 0: clipped but not noised" in markdown(
        "no_noise", **{"dp.noise_multiplier": 0.0})
    assert "- private: no (dp.enabled=False" in markdown("public", **{"dp.enabled": False})


def test_the_manifest_lists_every_file_and_how_the_samples_were_drawn(tmp_path, capsys):
    wd = fake_run(tmp_path / "run")
    out = str(tmp_path / "release")
    export.export_run(wd, out, num_samples=7, png=True, seed=3, log=lambda *_: None)
    manifest = export_manifest.read_manifest(out)
    on_disk = sorted(
        os.path.relpath(os.path.join(r, n), out) for r, _, ns in os.walk(out) for n in ns)
    assert sorted(manifest["files"]) == [n for n in on_disk if n != "manifest.json"]
    assert sum(n.startswith("png/") for n in manifest["files"]) == 7  # One per sample.
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == atomic_file.sha256_file(os.path.join(out, name))
        assert entry["bytes"] == os.path.getsize(os.path.join(out, name))
    cfg = sample.load_run_config(wd)
    assert manifest["data"] == {"source": "fake", "name": cfg.data.name, "split": "train",
                                "name_is_a_label": False, "image_shape": [28, 28, 1],
                                "num_classes": cfg.data.num_classes}
    with open(os.path.join(out, "privacy_report.json")) as f:
        report = json.load(f)
    assert manifest["privacy"]["epsilon"] == report["guarantee_epsilon"] > 0
    assert manifest["privacy"]["guarantee"] is True
    assert manifest["audit"] == {"status": "none"}
    assert manifest["step"] == manifest["planned_steps"] == 3
    # The recorded derivation draws samples.npz again from the exported EMA weights.
    s = manifest["samples"]
    assert (s["num"], s["export_seed"], s["config_seed"]) == (7, 3, cfg.seed)
    method, params, spec, _, _ = sample.load_trained(wd)
    with np.load(os.path.join(out, "ema_params.npz")) as z:
        np.testing.assert_array_equal(z["mean"], np.asarray(params.trainable["mean"]))
    images, labels = sample.generate(method, params, spec,
                                     export.sample_key(s["config_seed"], s["export_seed"]),
                                     s["num"], s["batch_size"])
    with np.load(os.path.join(out, "samples.npz")) as z:
        np.testing.assert_array_equal(z["images"], images)
        np.testing.assert_array_equal(z["labels"], labels)
    # The card names the data as the config does, and how to check the files.
    card = (tmp_path / "release" / "model_card.md").read_text()
    assert f"source `fake`, dataset `{cfg.data.name}`, split `train`" in card
    assert "python -m dpjax.export_manifest DIR" in card
    assert export_manifest.verify(out) == []
    assert export_manifest.main([out]) == 0
    assert "all " in capsys.readouterr().out


def test_the_manifest_check_finds_changed_missing_and_added_files(tmp_path, capsys):
    wd = fake_run(tmp_path / "run")
    out = tmp_path / "release"
    export.export_run(wd, str(out), num_samples=2, log=lambda *_: None)
    grid = (out / "samples_grid.png").read_bytes()
    (out / "samples_grid.png").write_bytes(grid[:-1] + bytes([grid[-1] ^ 1]))  # Same size.
    (out / "privacy_report.md").unlink()
    (out / "notes.txt").write_text("added later")
    problems = export_manifest.verify(str(out))
    assert [p.split(":")[0] for p in problems] == [
        "notes.txt", "privacy_report.md", "samples_grid.png"]
    assert "changed" in problems[2] and "missing" in problems[1]
    assert "not in the manifest" in problems[0]
    assert export_manifest.main([str(out)]) == 1
    assert "does NOT match" in capsys.readouterr().err
    os.symlink(os.path.join(wd, "config.json"), out / "link.json")
    assert any("not a regular file" in p for p in export_manifest.verify(str(out)))
    # No manifest, or one of another kind: a clear error, exit code 2.
    (out / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a dpjax export manifest"):
        export_manifest.verify(str(out))
    (out / "manifest.json").unlink()
    assert export_manifest.main([str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_run_whose_audit_flagged_it_is_refused(tmp_path):
    wd = fake_run(tmp_path / "run")
    plan = export.read_plan(wd)
    details = {k: getattr(plan, k) for k in
               ("noise_multiplier", "clip_norm", "sampling_rate", "num_examples", "delta")}
    audit = {"flagged": True, "epsilon_lower_bound": 9.0, "accountant_epsilon": 3.0}

    def write(**d):
        with open(os.path.join(wd, "audit.json"), "w") as f:
            json.dump({**audit, "details": {**details, "data": "fake", **d}}, f)

    write(faults={})
    with pytest.raises(export.NotPrivateError, match="flags this run"):
        export.export_run(wd, str(tmp_path / "out"), num_samples=2, log=lambda *_: None)
    # An audit made under another plan says nothing about this run: refused, not quoted.
    write(faults={}, noise_multiplier=2 * plan.noise_multiplier)
    with pytest.raises(export.ExportError, match="another plan"):
        export.export_run(wd, str(tmp_path / "out"), num_samples=2, log=lambda *_: None)
    # A flagged audit with an injected fault is the audit's self-test, not a finding.
    write(faults={"noise_scale": 0.0})
    assert "ema_params.npz" in export.export_run(
        wd, str(tmp_path / "out"), num_samples=2, log=lambda *_: None
    )
    assert export_manifest.read_manifest(str(tmp_path / "out"))["audit"] == {
        "status": "fault_injection"}
    # A passing audit on the stand-in is quoted; one on the private rows is not.
    audit.update(flagged=False, epsilon_lower_bound=0.5)
    # (That an audit on the private rows passed is a bit of them: not even that is said.)
    for data, status in (("fake", "passed"), ("config", "none")):
        write(faults={}, data=data, confidence=0.95, num_canaries=100, steps=3)
        out = str(tmp_path / f"out_{data}")
        export.export_run(wd, out, num_samples=2, log=lambda *_: None)
        quoted = export_manifest.read_manifest(out)["audit"]
        assert quoted["status"] == status
        assert ("epsilon_lower_bound" in quoted) == (status == "passed")
        card = (tmp_path / f"out_{data}" / "model_card.md").read_text()
        assert ("Empirical audit" in card) == (status == "passed")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupt_or_missing_runs_are_clear_errors(tmp_path, how):
    with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
        export.export_run(str(tmp_path / "nope"), str(tmp_path / "o"), log=lambda *_: None)
    wd = fake_run(tmp_path / "run")
    corrupt_latest_checkpoint(wd, how)
    with pytest.raises(ckpt_lib.CheckpointError, match="corrupt"):
        export.export_run(wd, str(tmp_path / "o"), num_samples=2, log=lambda *_: None)
    os.remove(os.path.join(wd, "dp_plan.json"))
    with pytest.raises(ckpt_lib.CheckpointError, match="dp_plan.json is missing"):
        export.export_run(wd, str(tmp_path / "o"), num_samples=2, log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_cli_export_and_audit_bad_inputs_give_one_line(tmp_path):
    out = cli("--mode=export", f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'o'}")
    assert out.returncode == 2, out.stderr
    assert "dpjax error:" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    wd = fake_run(tmp_path / "run")
    corrupt_latest_checkpoint(wd, "truncate")
    for mode in ("export", "audit"):
        out = cli(f"--mode={mode}", f"--workdir={wd}", f"--out={tmp_path / 'o'}")
        assert out.returncode == 2, out.stdout + out.stderr
        assert "dpjax error:" in out.stderr and "corrupt" in out.stderr
        assert "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "o").exists()


def test_model_card_names_the_mechanism_that_touched_the_data():
    """DP-MEPF's data access is one release; its card must not describe DP-SGD steps."""
    from types import SimpleNamespace

    from dpjax.model_card import _mechanism_line

    common = dict(sampling_rate=0.01, expected_batch_size=600.0, clip_norm=1.0,
                  noise_multiplier=2.5)
    release = _mechanism_line(SimpleNamespace(mechanism="release", **common), 500,
                              {"releases": [{}]})
    assert "one Gaussian release" in release and "Poisson" not in release
    assert "500 training steps after it read only the release" in release
    dpsgd = _mechanism_line(SimpleNamespace(mechanism="dpsgd", **common), 500,
                            {"releases": []})
    assert "DP-SGD with Poisson sampling q = 0.01" in dpsgd and "500 steps" in dpsgd


def test_a_run_exported_before_its_planned_end_says_so(tmp_path):
    """Step 3 of 6: the card states it, and its epsilon is that of the 3 steps done."""
    wd = fake_run(tmp_path / "run", steps=3, **{"dp.steps": 6})
    msgs = []
    out = str(tmp_path / "out")
    export.export_run(wd, out, num_samples=2, log=msgs.append)
    with open(os.path.join(out, "model_card.md")) as f:
        card = f.read()
    assert "exported at step 3, before its planned 6" in card
    assert "step 3 of 6 planned DP-SGD steps" in card
    assert any("exporting step 3 of 6 planned" in m for m in msgs), msgs
    with open(os.path.join(out, "privacy_report.json")) as f:
        report = json.load(f)
    full = report_lib.epsilon_spent(export.read_plan(wd), 6, [], ("rdp",))["rdp"]
    assert report["steps_done"] == 3 and report["epsilon"]["rdp"] < full


def test_sampling_a_run_without_a_guarantee_warns(tmp_path):
    """Samples are post-processing: they carry the run's guarantee, or a warning."""
    for name, over, warned in (("private", {}, False), ("off", {"dp.enabled": False}, True),
                               ("sigma0", {"dp.epsilon": None, "dp.noise_multiplier": 0.0},
                                True)):
        wd = fake_run(tmp_path / name, **over)
        msgs = []
        sample.sample_from_workdir(wd, 2, str(tmp_path / f"{name}_out"), log=msgs.append)
        assert any("no differential privacy guarantee" in m for m in msgs) == warned, msgs
    # Where the plan file records the run's randomness (as training writes it).
    wd = str(tmp_path / "private")
    plan_path = os.path.join(wd, "dp_plan.json")
    plan = export.read_plan(wd)
    for record, why in (({"noise_source": "secret", "loss_source": "secret"}, None),
                        ({"noise_source": "seed", "loss_source": "seed"}, "noise and batches"),
                        ({"noise_source": "secret"}, "per-example loss draws")):
        plan_lib.save_plan(plan_path, plan, {"steps_done": 3, **record})
        warning = sample.not_private_warning(wd)
        assert (warning is None) if why is None else (why in warning), (record, warning)


def test_source_paths_are_redacted_in_every_form(tmp_path, monkeypatch):
    """A teacher named by its absolute path and mentioned relative to the current
    directory (as a user types it) was left in the export's notes."""
    import dataclasses

    from dpjax import model_card

    @dataclasses.dataclass
    class Args:
        teacher_from: str
        steps: int = 3

    monkeypatch.chdir(tmp_path)
    args = Args(teacher_from=str(tmp_path / "runs" / "teacher"))
    notes = {"notes": ["teacher trained in runs/teacher (epsilon 3), then ./runs/teacher/x",
                       f"at {tmp_path}/runs/teacher."],
             "teacher_from": args.teacher_from, "steps": 3}
    got = model_card.redact_source_paths(notes, args)
    label = "<teacher_from: a local workdir, not part of this release>"
    assert got["teacher_from"] == label and got["steps"] == 3
    assert "runs/teacher" not in json.dumps(got) and str(tmp_path) not in json.dumps(got)
    assert got["notes"][1] == f"at {label}."
    # The command line's placeholders come from the same forms, as whole paths only.
    cmd = f"dpjax --workdir=runs/teacher --out={tmp_path}/runs/teacher_export"
    assert model_card.redact_command(cmd, "runs/teacher", f"{tmp_path}/runs/teacher_export") == (
        "dpjax --workdir=<the run's workdir> --out=<this export>")


def test_the_card_rounds_epsilon_up():
    """4 significant digits, never below the computed bound (7.3293 was stated 7.329)."""
    from dpjax import model_card

    assert [model_card._fmt(x) for x in (7.329334702, 7.33, 8.0, 9.99999, 0.0123456)] == [
        "7.33", "7.33", "8", "10", "0.01235"]
    assert model_card._fmt(float("inf")) == "inf" and model_card._fmt(3) == "3"
    assert model_card._fmt(np.float64(7.329334702)) == "7.33"


def test_samples_of_a_method_that_ignores_labels_are_not_published_as_classes(
        tmp_path, monkeypatch):
    """An unconditional DP-LFlow (or any method with samples_follow_labels False) had its
    samples exported with balanced class labels, a grid labelled by class, PNG folders per
    class and a card saying 'class-balanced' (extension review, 2026-12-07)."""
    from dpjax.methods import toy

    monkeypatch.setattr(toy.Toy, "samples_follow_labels", False)
    wd = fake_run(tmp_path / "run")
    out = str(tmp_path / "release")
    export.export_run(wd, out, num_samples=20, png=True, log=lambda *_: None)
    with np.load(os.path.join(out, "samples.npz")) as z:
        assert z["labels"].shape == (20,) and not z["labels"].any()
    assert os.listdir(os.path.join(out, "png")) == ["0"]
    with open(os.path.join(out, "model_card.md")) as f:
        card = f.read()
    assert "does not draw samples by class, so their labels are all 0" in card
    assert "class-balanced" not in card
    path = sample.sample_from_workdir(wd, 12, str(tmp_path / "s"), log=lambda *_: None)
    with np.load(path) as z:
        assert not z["labels"].any()
    monkeypatch.setattr(toy.Toy, "samples_follow_labels", True)  # A conditional method.
    path = sample.sample_from_workdir(wd, 12, str(tmp_path / "s2"), log=lambda *_: None)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["labels"], np.arange(12) % 10)


def test_a_method_outside_dpjax_by_import_path_trains_samples_and_exports(
        tmp_path, monkeypatch):
    """A new method needs no change to dpjax: config.method may be a module's import
    path; every mode imports it again from config.json (extension review, 2026-12-07:
    a method registered at run time trained, but sample/eval/export said 'Unknown')."""
    pkg = tmp_path / "my_lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scaled_toy.py").write_text(
        '"""The toy method under another name, with its own sample scale."""\n'
        "from dpjax.methods import toy\n"
        "Config = toy.Config\n\n\n"
        "class ScaledToy(toy.Toy):\n"
        "    def sample(self, params, key, n, labels):\n"
        "        return 0.5 * super().sample(params, key, n, labels)\n\n\n"
        "def make(config, spec):\n"
        "    return ScaledToy(config, spec)\n")
    (pkg / "broken.py").write_text("Config = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    wd = str(tmp_path / "run")
    train.train(toy_config(3, method="my_lab.scaled_toy"), wd, log=lambda *_: None)
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["method"] == "my_lab.scaled_toy"
    # Read back from the stored run, a module outside dpjax must be trusted first.
    monkeypatch.delenv("DPJAX_TRUSTED_METHODS", raising=False)
    with pytest.raises(ValueError, match="DPJAX_TRUSTED_METHODS=my_lab.scaled_toy"):
        sample.restore_state(wd)
    monkeypatch.setenv("DPJAX_TRUSTED_METHODS", "other.module, my_lab.scaled_toy")
    method, _, _, _ = sample.restore_state(wd)
    assert type(method).__name__ == "ScaledToy"
    names = export.export_run(wd, str(tmp_path / "out"), num_samples=4, log=lambda *_: None)
    assert "model_card.md" in names
    from dpjax.typed_config import ConfigError

    for name, needle in (("my_lab.broken", r"lacks \['make'\]"),
                         ("my_lab.nowhere", "cannot be imported"),
                         ("toyy", "Unknown method 'toyy'")):
        with pytest.raises(ConfigError, match=needle):
            train.train(toy_config(3, method=name), str(tmp_path / name), log=lambda *_: None)


def test_a_method_module_shipped_inside_a_workdir_is_not_imported(tmp_path, monkeypatch):
    """A run handed over by someone else named a module it ships itself as its method:
    sample, eval, export (and a private run loading it as a source) imported and ran it
    (``python -m`` puts the current directory on sys.path; untrusted-input review,
    2026-12-07). A module a stored run names must be listed in DPJAX_TRUSTED_METHODS (so
    deleting the workdir's dp_plan.json does not help), and one inside a workdir, or
    below one, is refused even when listed; no code runs either way."""
    wd = fake_run(tmp_path / "foreign")
    ran = tmp_path / "PAYLOAD_RAN"
    payload = f"open({str(ran)!r}, 'w').close()\nfrom dpjax.methods.toy import Config, make\n"
    (tmp_path / "foreign" / "payload.py").write_text(payload)
    (tmp_path / "foreign" / "pkg").mkdir()
    (tmp_path / "foreign" / "pkg" / "__init__.py").write_text(payload)
    (tmp_path / "foreign" / "pkg" / "mod.py").write_text(payload)
    monkeypatch.syspath_prepend(str(tmp_path))
    config_path = os.path.join(wd, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    for name in ("foreign.payload", "foreign.pkg.mod"):
        with open(config_path, "w") as f:
            json.dump({**config, "method": name}, f)
        monkeypatch.delenv("DPJAX_TRUSTED_METHODS", raising=False)
        for open_run in (sample.restore_state,
                         lambda w: export.export_run(w, str(tmp_path / "out"))):
            with pytest.raises(ValueError, match=f"DPJAX_TRUSTED_METHODS={name}"):
                open_run(wd)
        monkeypatch.setenv("DPJAX_TRUSTED_METHODS", name)  # Trusted by mistake.
        with pytest.raises(ValueError, match="lies inside the dpjax workdir"):
            sample.restore_state(wd)
    os.remove(os.path.join(wd, "dp_plan.json"))  # No marker left: still not trusted.
    monkeypatch.delenv("DPJAX_TRUSTED_METHODS", raising=False)
    with pytest.raises(ValueError, match="DPJAX_TRUSTED_METHODS"):
        sample.restore_state(wd)
    assert not ran.exists()


def test_the_card_of_a_command_line_export_names_only_the_export_flags(tmp_path):
    """The card quoted the whole command line: another flag (a cache directory named
    after the private data) went into the release (release-boundary review, 2026-12-07)."""
    wd = fake_run(tmp_path / "run")
    out = cli("--mode=export", f"--workdir={wd}", f"--out={tmp_path / 'o'}", "--num=4",
              f"--compilation_cache={tmp_path / 'hospital_scans_cache'}")
    assert out.returncode == 0, out.stdout + out.stderr
    card = (tmp_path / "o" / "model_card.md").read_text()
    assert "hospital_scans" not in card and str(tmp_path) not in card
    assert ("Exported with: `python -m dpjax.main --mode=export --workdir=<the run's workdir> "
            "--out=<this export> --num=4`") in card


def test_an_export_samples_again_without_its_workdir_and_refuses_edits(tmp_path, monkeypatch):
    wd = str(tmp_path / "run")
    train.train(toy_config(3), wd, log=lambda *_: None)
    out = str(tmp_path / "release")
    export.export_run(wd, out, num_samples=9, log=lambda *_: None)
    os.rename(wd, str(tmp_path / "gone"))  # The recipient has the export only.
    model = released.load_export(out)
    with np.load(os.path.join(out, "ema_params.npz")) as z:
        np.testing.assert_array_equal(np.asarray(model.params.trainable["mean"]), z["mean"])
    again = released.sample_from_export(out, str(tmp_path / "again"), log=lambda *_: None)
    with np.load(again) as a, np.load(os.path.join(out, "samples.npz")) as b:
        np.testing.assert_array_equal(a["images"], b["images"])  # The export's own draw.
        np.testing.assert_array_equal(a["labels"], b["labels"])
    other = released.sample_from_export(out, str(tmp_path / "other"), num=9, seed=1,
                                        log=lambda *_: None)
    with np.load(other) as a, np.load(again) as b:
        assert not np.array_equal(a["images"], b["images"])
    with pytest.raises(sample.SampleOutputError, match="inside the export"):
        released.sample_from_export(out, os.path.join(out, "s"), log=lambda *_: None)
    # The command line, as a recipient runs it.
    result = cli("--mode=sample", f"--export={out}", f"--out={tmp_path / 'cli'}", "--num=3")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "cli" / "samples.npz") as z:
        assert z["images"].shape == (3, 28, 28, 1)
    result = cli("--mode=sample", f"--export={out}", f"--workdir={wd}", f"--out={tmp_path}/x")
    assert result.returncode != 0 and "--workdir does not apply to --export" in result.stderr
    # Weights changed after the export (and the manifest with them, to fit): refused.
    with np.load(os.path.join(out, "ema_params.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(os.path.join(out, "ema_params.npz"), **arrays, extra=np.zeros(2))
    with pytest.raises(released.ExportLoadError, match="does not match its manifest"):
        released.load_export(out)
    export_manifest.write_manifest(out, {})
    with pytest.raises(released.ExportLoadError, match=r"unexpected \['extra'\]"):
        released.load_export(out)
    result = cli("--mode=sample", f"--export={out}", f"--out={tmp_path / 'cli2'}")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1


def test_a_damaged_or_foreign_export_is_one_clear_error_and_never_black_images(
        tmp_path, monkeypatch):
    """Review of the loader (2026-12-08): a non-zero export seed, an output reached
    through a link into the export, files no export writes, NaN weights (the uint8
    conversion drew them as black pixels), a truncated npz and a missing rebuild record."""
    wd = fake_run(tmp_path / "run")
    out = tmp_path / "release"
    export.export_run(wd, str(out), num_samples=5, seed=5, log=lambda *_: None)
    facts = {k: v for k, v in export_manifest.read_manifest(str(out)).items()
             if k not in ("format", "format_version", "dpjax_version", "files")}
    quiet = {"log": lambda *_: None}
    again = released.sample_from_export(str(out), str(tmp_path / "again"), **quiet)
    with np.load(again) as a, np.load(out / "samples.npz") as b:  # The export's seed, 5.
        np.testing.assert_array_equal(a["images"], b["images"])
    os.symlink(out, tmp_path / "link")
    with pytest.raises(sample.SampleOutputError, match="inside the export"):
        released.sample_from_export(str(out), str(tmp_path / "link" / "s"), **quiet)
    assert export_manifest.verify(str(out)) == []

    def damaged(change, match):
        copy = tmp_path / f"copy{len(os.listdir(tmp_path))}"
        shutil.copytree(out, copy)
        change(copy)
        export_manifest.write_manifest(str(copy), facts)  # Made to fit: not caught there.
        with pytest.raises(released.ExportLoadError, match=match):
            released.sample_from_export(str(copy), str(tmp_path / "s"), **quiet)

    def nan_weights(d):
        with np.load(d / "ema_params.npz") as z:
            arrays = {k: np.full_like(z[k], np.nan) for k in z.files}
        np.savez(d / "ema_params.npz", **arrays)

    damaged(nan_weights, "non-finite values")
    damaged(lambda d: (d / "model.py").write_text("print('hi')"), "no dpjax export writes")
    damaged(lambda d: (d / "ema_params.npz").write_bytes(
        (d / "ema_params.npz").read_bytes()[:100]), "ema_params.npz is unreadable")

    def no_rebuild(d):
        cfg = json.loads((d / "model_config.json").read_text())
        (d / "model_config.json").write_text(json.dumps({**cfg, "rebuild": None}))

    damaged(no_rebuild, "lacks what a rebuild needs")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["model_card.md"] = "abc"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert export_manifest.verify(str(out)) == [
        "model_card.md: the manifest's entry is not a record ('abc')"]
    # A method module shipped inside an export is never imported, trusted or not.
    (out / "shipped").mkdir()
    for name in ("__init__.py", "method.py"):
        (out / "shipped" / name).write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(out))
    monkeypatch.setenv("DPJAX_TRUSTED_METHODS", "shipped.method")
    with pytest.raises(ValueError, match="inside the dpjax workdir or export"):
        get_method_module("shipped.method")
