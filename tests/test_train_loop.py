"""The train loop: resume after SIGKILL, the budget, NaN handling, bad input, artifacts."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import checkpoint as ckpt_lib
from dpjax import export, metrics_log, sample, train, workdir_guard
from dpjax.checkpoint import CheckpointError
from dpjax.data import DataError
from dpjax.privacy import report as report_lib
from dpjax.privacy.accounting import PrivacyError
from dpjax.typed_config import ConfigError
from experiments import toy_fake
from tests.config_overrides import with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps=12, **over):
    c = toy_fake.get_config(f"steps={steps}")
    c.unlock()
    c.train.progress = False
    c.train.log_every = 1
    c.train.ckpt_every = 3
    c.train.grid_samples = 10
    c.data.fake_num_examples = 128
    c.dp.batch_size = 16
    c.dp.microbatch_size = 8
    return with_overrides(c, over)


def _cli(workdir, *args, config="experiments/toy_fake.py:steps=12", wait=True):
    cmd = [sys.executable, "-m", "dpjax.main", f"--workdir={workdir}", *args]
    if config:
        cmd.insert(3, f"--config={config}")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _flat_state(workdir):
    _, state, _, _ = sample.restore_state(workdir)
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.as_dict())]


def _place_secret(ref, workdir):
    """Gives ``workdir`` (new) the noise secret of the finished run ``ref``, so that the
    run there replays it (noise_secret.py): a kill before the first checkpoint restarts
    from step 0 with the same secret, a later one resumes with it."""
    workdir.mkdir()
    shutil.copy(ref / "noise_secret.json", workdir)


def test_sigkill_then_resume_is_bit_identical(tmp_path, record_tried):
    args = [
        "--config.train.ckpt_every=3",
        "--config.train.log_every=1",
        "--config.train.progress=False",
        "--config.train.grid_samples=0",
    ]
    ref = tmp_path / "ref"
    out = _cli(ref, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    killed = tmp_path / "killed"
    _place_secret(ref, killed)
    kill_at = random.Random(time.time()).randint(2, 10)
    proc = _cli(killed, *args, wait=False)
    log = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(metrics_log.read(str(killed))) >= kill_at:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record_tried("faults", f"SIGKILL after {kill_at} logged steps, then resume")
    rows = metrics_log.read(str(killed))
    assert rows and rows[-1]["step"] < 12, "the run finished before it was killed"
    out = _cli(killed, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    for a, b in zip(_flat_state(ref), _flat_state(killed), strict=True):
        np.testing.assert_array_equal(a, b)
    # The epsilon log continues: one row per step, increasing epsilon, no restart.
    rows = metrics_log.read(str(killed))
    assert [r["step"] for r in rows] == list(range(1, 13))
    eps = [r["epsilon_rdp"] for r in rows]
    assert all(b > a for a, b in zip(eps, eps[1:]))
    ref_eps = [r["epsilon_rdp"] for r in metrics_log.read(str(ref))]
    np.testing.assert_allclose(eps, ref_eps)
    plan = json.loads((killed / "dp_plan.json").read_text())
    assert plan["steps_done"] == 12


def test_budget_is_never_exceeded(tmp_path):
    wd = str(tmp_path)
    train.train(_config(steps=4), wd, log=lambda *_: None)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    # The toy config gives sigma, not epsilon: the message states the sigma.
    with pytest.raises(train.BudgetExceededError, match=r"allows 4 steps \(sigma 1\); "):
        train.train(_config(steps=6), wd, log=lambda *_: None)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    # Re-running the same plan does nothing more, but brings a plan file that lags the
    # checkpoint (a kill between the two writes) up to date.
    plan_path = tmp_path / "dp_plan.json"
    complete = json.loads(plan_path.read_text())
    assert complete["steps_done"] == 4
    plan_path.write_text(json.dumps({**complete, "steps_done": 2,
                                     "epsilon_spent": {"rdp": 0.0}}))
    msgs = []
    state = train.train(_config(steps=4), wd, log=msgs.append)
    assert int(state.step) == 4 and any("nothing to do" in m for m in msgs)
    assert json.loads(plan_path.read_text()) == complete


def test_a_replace_one_run_logs_its_epsilon_with_the_accountant_that_can(tmp_path):
    """RDP cannot account for Poisson sampling under replace-one: the log's epsilon_rdp
    was NaN on every line of such a (PLD) run; it now logs epsilon_pld (fuzz review)."""
    wd = str(tmp_path)
    train.train(_config(steps=2, **{"dp.neighbouring": "replace_one", "dp.accountant": "pld"}),
                wd, log=lambda *_: None)
    rows = metrics_log.read(wd)
    assert rows and all("epsilon_rdp" not in r for r in rows)
    # (PLD is logged at most every 30 s: the first line and the last step's.)
    eps = [r["epsilon_pld"] for r in rows if "epsilon_pld" in r]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] < float("inf")


def test_a_run_stopped_by_max_steps_per_run_says_so(tmp_path):
    msgs = []
    train.train(_config(steps=4, **{"train.max_steps_per_run": 3}), str(tmp_path),
                log=msgs.append)
    assert any("stopping at step 3 of 4: train.max_steps_per_run=3; run the same command "
               "again" in m for m in msgs), msgs
    # The report of the unfinished run says so, to programs and to people.
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert (report["steps_done"], report["complete"]) == (3, False)
    assert "the run is not finished" in (tmp_path / "privacy_report.md").read_text()
    msgs.clear()
    state = train.train(_config(steps=4, **{"train.max_steps_per_run": 3}), str(tmp_path),
                        log=msgs.append)
    assert int(state.step) == 4 and not any("stopping" in m for m in msgs)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert (report["steps_done"], report["complete"]) == (4, True)
    assert "not finished" not in (tmp_path / "privacy_report.md").read_text()


def test_resume_under_another_privacy_config_is_refused(tmp_path):
    wd = str(tmp_path)
    train.train(_config(steps=3), wd, log=lambda *_: None)
    with pytest.raises(PrivacyError, match="noise_multiplier=1.0 but the config gives 0.5"):
        train.train(_config(steps=3, **{"dp.noise_multiplier": 0.5}), wd, log=lambda *_: None)


def test_with_config_json_lost_the_stored_plan_still_refuses_another_sigma_or_step_count(
        tmp_path):
    """config.json (where check_resume_config sees a change) deleted: the plan file's
    check alone must refuse another sigma or fewer steps; a run trained on silently with
    the stored sigma to the stored 6 steps (crash review, 2026-12-07)."""
    wd = str(tmp_path)
    silent = lambda *_: None  # noqa: E731
    train.train(_config(steps=6, **{"train.max_steps_per_run": 3}), wd, log=silent)
    os.remove(os.path.join(wd, "config.json"))
    with pytest.raises(PrivacyError, match="noise_multiplier=1.0 but the config gives 2.0"):
        train.train(_config(steps=6, **{"dp.noise_multiplier": 2.0}), wd, log=silent)
    with pytest.raises(PrivacyError, match="plans 6 steps but the config asks for 4"):
        train.train(_config(steps=4), wd, log=silent)
    assert not os.path.exists(os.path.join(wd, "config.json"))  # Refused: nothing written.
    # dp_plan.json lost too: a refused resume must not write the new plan (it was
    # written before the checkpoint's own plan refused it, and then blocked the right one).
    # Other data of the same size with config.json lost: the digest still refuses it (the
    # resume trained on, and overwrote the digest).
    rng = np.random.default_rng(5)
    with pytest.raises(CheckpointError, match="differs from the data that the run"):
        train.train(_config(steps=6, **_npz_data(tmp_path / "other.npz", rng.integers(
            0, 255, (128, 28, 28, 1), dtype=np.uint8))), wd, log=silent)
    os.remove(os.path.join(wd, "dp_plan.json"))
    with pytest.raises(CheckpointError, match="not under the plan of dp_plan.json and this"):
        train.train(_config(steps=6, **{"dp.noise_multiplier": 2.0}), wd, log=silent)
    assert not os.path.exists(os.path.join(wd, "dp_plan.json"))
    assert not os.path.exists(os.path.join(wd, "config.json"))
    train.train(_config(steps=6), wd, log=silent)  # The run's own config resumes it.
    assert json.loads((tmp_path / "dp_plan.json").read_text())["steps_done"] == 6


def test_records_are_written_before_their_checkpoint_and_a_resume_brings_them_back(
        tmp_path, monkeypatch):
    """A kill between a checkpoint and its records left a privacy report below the
    latest checkpoint's epsilon; now the records go first (a report ahead of the
    checkpoints overstates, which is safe) and a resume rewrites them for its step."""
    wd = tmp_path
    train.train(_config(steps=6, **{"train.max_steps_per_run": 3}), str(wd), log=lambda *_: None)
    real_save = ckpt_lib.Checkpointer.save

    def save_after_checking_the_records(self, step, state, meta):
        report = json.loads((wd / "privacy_report.json").read_text())
        assert report["steps_done"] == step  # Already written for this checkpoint.
        if step == 6:
            raise OSError("killed before the checkpoint was written")
        real_save(self, step, state, meta)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_after_checking_the_records)
    with pytest.raises(OSError, match="killed before"):
        train.train(_config(steps=6), str(wd), log=lambda *_: None)
    assert json.loads((wd / "dp_plan.json").read_text())["steps_done"] == 6  # Ahead.
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", real_save)
    # A resume first brings the records back to its checkpoint (3), then trains on.
    seen = []
    monkeypatch.setattr(train, "dpsgd_advance", lambda run, dataset: seen.append(
        json.loads((wd / "dp_plan.json").read_text())["steps_done"]) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.train(_config(steps=6), str(wd), log=lambda *_: None)
    assert seen == [3]
    assert "- steps: 3 done of 6 planned" in (wd / "privacy_report.md").read_text()


def test_a_finished_run_without_its_grid_draws_it_when_run_again(tmp_path):
    """A kill after the last checkpoint left no samples_grid.png; the rerun that has
    nothing to train draws it."""
    train.train(_config(steps=2), str(tmp_path), log=lambda *_: None)
    os.remove(tmp_path / "samples_grid.png")
    lines = []
    train.train(_config(steps=2), str(tmp_path), log=lines.append)
    assert any("nothing to do" in line for line in lines)
    assert (tmp_path / "samples_grid.png").exists()


def _npz_data(path, images):
    np.savez(path, images=images, labels=np.arange(len(images)) % 10)
    return {"data.source": "npz", "data.path": str(path)}


def test_a_prior_release_that_changed_before_the_first_checkpoint_is_refused(
        tmp_path, monkeypatch):
    """A target epsilon's sigma is calibrated with the prior releases (a DP teacher, a DP
    feature network). A run that died before its first checkpoint, restarted after its
    source trained further, must not compose the larger prior over the old sigma (it
    silently spent epsilon 16 of a target 8: review of 2026-12-06)."""
    from dpjax.methods import toy

    prior_steps = [100]

    def prior(self):
        return [{"kind": "dpsgd", "noise_multiplier": 1.0, "sampling_rate": 0.1,
                 "steps": prior_steps[0], "neighbouring": "add_or_remove_one",
                 "description": f"a DP source run, {prior_steps[0]} steps"}]

    monkeypatch.setattr(toy.Toy, "prior_releases", prior)
    cfg = _config(steps=6, **{"dp.epsilon": 8.0, "dp.noise_multiplier": None,
                              "train.grid_samples": 0})
    wd = str(tmp_path / "w")
    # The plan is written, then the run dies before its first step (e.g. out of memory).
    def dies(run, dataset):
        raise MemoryError("out of memory while compiling the first step")

    with monkeypatch.context() as m:
        m.setattr(train, "dpsgd_advance", dies)
        with pytest.raises(MemoryError):
            train.train(cfg, wd, log=lambda *_: None)
    assert os.path.exists(os.path.join(wd, "dp_plan.json"))
    assert not os.path.exists(os.path.join(wd, "checkpoints", "3"))
    prior_steps[0] = 400  # The source trained further.
    with pytest.raises(PrivacyError, match="planned with the prior releases"):
        train.train(cfg, wd, log=lambda *_: None)
    prior_steps[0] = 100  # The same prior again: the run resumes and meets its target.
    train.train(cfg, wd, log=lambda *_: None)
    with open(os.path.join(wd, "privacy_report.json")) as f:
        rep = json.load(f)
    assert rep["epsilon"]["rdp"] <= 8.0 + 1e-9


def test_the_privacy_report_follows_the_checkpoints_of_a_killed_run(tmp_path, monkeypatch):
    """A run stopped between checkpoints (a kill, a pre-emption) leaves a report for its
    latest checkpoint, not the last finished invocation's (review of 2026-12-06: it said
    6 steps while the checkpoint held 9)."""
    wd = str(tmp_path)
    train.train(_config(steps=12, **{"train.max_steps_per_run": 6, "train.grid_samples": 0}),
                wd, log=lambda *_: None)
    advance = train.dpsgd_advance

    def killed_at_10(run, dataset):
        step = advance(run, dataset)

        def run_step(state, t):
            if t == 10:
                raise KeyboardInterrupt("pre-empted")
            return step(state, t)

        return run_step

    with monkeypatch.context() as m:
        m.setattr(train, "dpsgd_advance", killed_at_10)
        with pytest.raises(KeyboardInterrupt):
            train.train(_config(steps=12, **{"train.grid_samples": 0}), wd, log=lambda *_: None)
    with open(os.path.join(wd, "privacy_report.json")) as f:
        rep = json.load(f)
    with open(os.path.join(wd, "dp_plan.json")) as f:
        plan = json.load(f)
    assert rep["steps_done"] == plan["steps_done"] == 9
    assert rep["epsilon"] == plan["epsilon_spent"]  # The plan's accountant (RDP) only.
    with open(os.path.join(wd, "privacy_report.md")) as f:
        md = f.read()
    assert "epsilon (PLD): not computed at this checkpoint" in md
    # The stated guarantee, rounded up, and the unit of privacy (walkthrough, 2026-12-07).
    assert (f"- guarantee: ({report_lib.format_epsilon(rep['epsilon']['rdp'])}, 1e-05)-DP "
            "after 9 steps (RDP accountant)" in md
            and "for one training example (an image with its label) added or removed" in md)
    train.train(_config(steps=12, **{"train.grid_samples": 0}), wd, log=lambda *_: None)
    with open(os.path.join(wd, "privacy_report.json")) as f:
        rep = json.load(f)
    assert rep["steps_done"] == 12 and set(rep["epsilon"]) == {"rdp", "pld"}


def test_resume_may_change_how_the_sum_is_computed_and_where_the_same_data_lies(
        tmp_path, same_noise_secret):
    """A resume on another machine: a smaller micro-batch, another loop, the data moved.
    It trains what the uninterrupted run trains (up to float rounding) and records the
    new settings once they ran; a setting that fails, other data under the new path or
    the old one, or a move of a run without a data digest is refused, and then nothing
    in the workdir changes."""
    images = np.random.default_rng(0).integers(0, 256, (128, 28, 28, 1), np.uint8)
    first = _npz_data(tmp_path / "a.npz", images)
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
    train.train(_config(steps=9, **first), ref, log=lambda *_: None)
    stop = {"train.max_steps_per_run": 3}
    train.train(_config(steps=9, **first, **stop), wd, log=lambda *_: None)
    moved = _npz_data(tmp_path / "b.npz", images)
    how = {"dp.microbatch_size": 4, "dp.microbatch_loop": "loop"}  # (Toy: vmap clipping.)
    msgs = []
    state = train.train(_config(steps=9, **moved, **how, **stop), wd, log=msgs.append)
    assert int(state.step) == 6
    for change in ("dp.microbatch_size: 8 -> 4", "dp.microbatch_loop: 'auto' -> 'loop'",
                   f"data.path: '{tmp_path}/a.npz' -> '{tmp_path}/b.npz'"):
        assert any(f"resuming with {change}" in m for m in msgs), (change, msgs)
    config_path = os.path.join(wd, "config.json")
    with open(config_path) as f:  # Eval and sample find the data; the new loop is recorded.
        stored = json.load(f)
    assert stored["data"]["path"] == str(tmp_path / "b.npz")
    assert (stored["dp"]["microbatch_size"], stored["dp"]["microbatch_loop"]) == (4, "loop")

    def files():
        return (sorted(os.listdir(os.path.join(wd, "checkpoints"))),
                open(config_path).read(), open(os.path.join(wd, "data_digest.json")).read())

    before = files()
    with pytest.raises(ConfigError, match="layerwise"):  # The toy has no supported layers.
        train.train(_config(steps=9, **moved, **{"dp.clipping": "layerwise"}), wd,
                    log=lambda *_: None)
    assert files() == before
    other = images.copy()
    other[5, 0, 0, 0] ^= 1  # One pixel of one example.
    with pytest.raises(CheckpointError, match=r"c\.npz\) differs from the data that the run "
                                              f"in {re.escape(wd)} was trained on"):
        train.train(_config(steps=9, **_npz_data(tmp_path / "c.npz", other)), wd,
                    log=lambda *_: None)
    os.remove(tmp_path / "b.npz")  # Other data under the run's own path: refused too.
    _npz_data(tmp_path / "b.npz", other)
    with pytest.raises(CheckpointError, match="differs from the data that the run"):
        train.train(_config(steps=9, **moved), wd, log=lambda *_: None)
    assert files() == before

    _npz_data(tmp_path / "b.npz", images)
    assert int(train.train(_config(steps=9, **moved), wd, log=lambda *_: None).step) == 9
    for a, b in zip(_flat_state(ref), _flat_state(wd), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # A run from before data digests: the same data elsewhere is not enough.
    os.remove(os.path.join(ref, workdir_guard.DATA_DIGEST_FILE))
    with pytest.raises(CheckpointError, match="different config.*data.path"):
        train.train(_config(steps=9, **moved), ref, log=lambda *_: None)
    train.train(_config(steps=9, **first), ref, log=lambda *_: None)  # Records its digest.
    assert os.path.exists(os.path.join(ref, workdir_guard.DATA_DIGEST_FILE))


def test_a_float_npz_run_from_before_float_range(tmp_path):
    """Float npz images need data.float_range now. A run without DP begun before the
    setting (its config.json has none) resumes with it, accepted because the data digest
    shows the declared range reads the same images, and recorded for eval and sample
    (diff review, 2026-12-07); a range that reads other pixels is refused as other data.
    A private one is refused on resume and at export: its steps scaled the images by the
    whole-array rule, outside the guarantee, whatever it declares now."""
    images = np.random.default_rng(0).uniform(0.0, 1.0, (64, 28, 28, 1)).astype(np.float32)
    data = _npz_data(tmp_path / "f.npz", images)
    for dp in (True, False):
        wd = str(tmp_path / f"wd_dp_{dp}")
        over = {**data, "dp.enabled": dp}
        unit = {**over, "data.float_range": "0,1", "train.max_steps_per_run": 3}
        train.train(_config(steps=6, **unit), wd, log=lambda *_: None)
        config_path = os.path.join(wd, "config.json")
        with open(config_path) as f:
            stored = json.load(f)
        del stored["data"]["float_range"]  # As a run from before the setting stored it.
        with open(config_path, "w") as f:
            json.dump(stored, f)
        with pytest.raises(DataError, match="A run without DP begun before this setting"):
            train.train(_config(steps=6, **over), wd, log=lambda *_: None)
        if dp:
            with pytest.raises(DataError, match="neither resumed nor exported"):
                train.train(_config(steps=6, **unit), wd, log=lambda *_: None)
            with pytest.raises(export.NotPrivateError, match="neither resumed nor exported"):
                export.export_run(wd, str(tmp_path / "out"), log=lambda *_: None)
            assert not os.path.exists(tmp_path / "out")
            continue
        with pytest.raises(CheckpointError, match="differs from the data"):
            train.train(_config(steps=6, **over, **{"data.float_range": "-1,1"}), wd,
                        log=lambda *_: None)
        state = train.train(_config(steps=6, **unit), wd, log=lambda *_: None)
        assert int(state.step) == 6
        with open(config_path) as f:
            assert json.load(f)["data"]["float_range"] == "0,1"


def test_a_second_training_process_in_a_workdir_is_refused(tmp_path):
    """Two processes training one workdir would write the same checkpoints: the second
    fails before writing anything; the lock goes with its holder (a killed run resumes)."""
    wd = str(tmp_path)
    train.train(_config(steps=6, **{"train.max_steps_per_run": 3}), wd, log=lambda *_: None)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('4242@elsewhere'); f.flush(); "
         "print('locked', flush=True); time.sleep(60)",
         os.path.join(wd, workdir_guard.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
        with pytest.raises(train.WorkdirError, match=r"pid 4242@elsewhere\) is training"):
            train.train(_config(steps=6), wd, log=lambda *_: None)
        assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock is gone, and the run resumes; its own lock is freed after.
    assert int(train.train(_config(steps=6), wd, log=lambda *_: None).step) == 6
    assert int(train.train(_config(steps=6), wd, log=lambda *_: None).step) == 6


def test_nan_loss_is_reported_with_its_step_and_not_checkpointed(tmp_path, record_tried):
    cfg = _config(steps=12, **{"optim.learning_rate": 1e30, "optim.name": "sgd"})
    record_tried("faults", "NaN loss")
    with pytest.raises(train.NonFiniteError, match=r"at step \d+"):
        train.train(cfg, str(tmp_path), log=lambda *_: None)
    # Whatever was saved before the NaN restores to finite values.
    if os.listdir(tmp_path / "checkpoints"):
        assert all(np.isfinite(x).all() for x in _flat_state(str(tmp_path)))


def test_examples_left_out_for_a_non_finite_loss_are_reported(tmp_path, monkeypatch):
    """A non-finite example adds 0 to the clipped sum (the step goes on); the loop says
    how many were left out, instead of showing it only in metrics.jsonl."""
    from dpjax.methods import toy

    finite_loss = toy.Toy.loss_per_example

    def nan_for_half_the_classes(self, trainable, frozen, example, key):
        loss, aux = finite_loss(self, trainable, frozen, example, key)
        return jnp.where(example["label"] < 5, jnp.nan, loss), aux

    monkeypatch.setattr(toy.Toy, "loss_per_example", nan_for_half_the_classes)
    msgs = []
    train.train(_config(steps=4, **{"train.log_every": 2}), str(tmp_path), log=msgs.append)
    rows = metrics_log.read(str(tmp_path))  # Steps 2 and 4: each row counts its own step.
    warned = [m for m in msgs if "non-finite loss or gradient were left out" in m]
    assert [r["step"] for r in rows] == [2, 4] and len(warned) == 2, msgs
    for row, message, window in zip(rows, warned, ("steps 1-2", "steps 3-4"), strict=True):
        assert row["nonfinite_examples"] > 0 and window in message, (row, message)
        count = int(message.split("warning: ")[1].split(" example(s)")[0])
        assert count >= row["nonfinite_examples"], (row, message)  # Its window's sum.
    # A stop between log steps (the time limit) reports its window as well.
    msgs.clear()
    train.train(_config(steps=4, **{"train.log_every": 100,
                                    "train.max_seconds_per_run": 1e-9}),
                str(tmp_path / "timed"), log=msgs.append)
    warned = [m for m in msgs if "non-finite loss or gradient were left out of step 1 " in m]
    assert len(warned) == 1 and any("stopping at step 1 of 4" in m for m in msgs), msgs


def test_a_private_loss_that_overflows_does_not_stop_the_run(tmp_path, monkeypatch):
    """Every example's loss (2e38) and gradient are finite, but their float32 sum is not.
    The loop stopped on it: whether a private run went on depended on the private data
    (non-finite review, 2026-12-07). It stops on the noisy update only; a run without DP
    still stops on its loss, and the error says that a resume would replay the step."""
    from dpjax.methods import toy

    finite_loss = toy.Toy.loss_per_example

    def huge(self, trainable, frozen, example, key):
        loss, aux = finite_loss(self, trainable, frozen, example, key)
        return loss + 2e38, aux

    monkeypatch.setattr(toy.Toy, "loss_per_example", huge)
    msgs = []
    state = train.train(_config(steps=3), str(tmp_path / "dp"), log=msgs.append)
    assert int(state.step) == 3
    rows = metrics_log.read(str(tmp_path / "dp"))
    assert all(np.isinf(float(r["private_loss_nonprivate"])) for r in rows if r["batch_size"] > 0)
    assert all(np.isfinite(float(r["update_norm"])) for r in rows)
    assert sum("the private loss at step" in m for m in msgs) == 1, msgs
    with pytest.raises(train.NonFiniteError, match="no checkpoint was written.*new --workdir"):
        train.train(_config(steps=3, **{"dp.enabled": False}), str(tmp_path / "public"),
                    log=lambda *_: None)


def test_a_step_without_rows_reports_no_loss_and_goes_on(tmp_path):
    """An empty Poisson batch (E[B] = 1 here; batches from the seed, so the same steps are
    empty every time) has no loss: NaN, not the 0.0 it reported, and neither a run with
    DP nor one without stops or warns on it."""
    for dp in (True, False):
        wd, msgs = str(tmp_path / f"dp_{dp}"), []
        over = {"dp.batch_size": 1, "dp.microbatch_size": 1, "dp.secret_noise": False,
                "dp.enabled": dp}
        assert int(train.train(_config(steps=8, **over), wd, log=msgs.append).step) == 8
        rows = metrics_log.read(wd)
        empty = [r for r in rows if r["batch_size"] == 0]
        assert empty and all(np.isnan(float(r["private_loss_nonprivate"])) for r in empty)
        assert all(np.isfinite(float(r["private_loss_nonprivate"]))
                   for r in rows if r["batch_size"] > 0)
        assert not [m for m in msgs if "warning" in m], msgs


def test_unwritable_workdir_fails_before_training(tmp_path, record_tried):
    record_tried("faults", "unwritable workdir")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(train.WorkdirError, match="not writable"):
        train.train(_config(), str(blocker / "run"), log=lambda *_: None)


def test_cli_bad_inputs_give_one_line(tmp_path):
    # A mistyped config key.
    out = _cli(tmp_path / "a", "--config.dp.clip_nrom=2")
    assert out.returncode != 0 and "clip_nrom" in out.stderr
    # A mistyped experiment argument.
    out = _cli(tmp_path / "b", config="experiments/toy_fake.py:stesp=3")
    assert out.returncode != 0 and "Did you mean 'steps'" in (out.stderr + out.stdout)
    # A missing dataset path: one line, no traceback.
    out = _cli(tmp_path / "c", "--config.data.source=idx", "--config.data.path=/nonexistent")
    assert out.returncode == 2, out.stderr
    assert "dpjax error:" in out.stderr and "/nonexistent" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_partly_truncated_checkpoint_is_one_line_that_says_how_to_go_on(tmp_path):
    """A checkpoint whose array files were cut short (a full disk, a copy stopped midway)
    printed its TensorStore spec and up to 578 lines of orbax's unawaited coroutines
    (review of 2026-12-06). Now: one line, naming the checkpoint to go on from."""
    import glob
    import shutil

    wd = str(tmp_path / "run")
    train.train(_config(steps=6, **{"train.grid_samples": 0}), wd, log=lambda *_: None)
    for path in glob.glob(os.path.join(wd, "checkpoints", "6", "state", "**", "d", "*"),
                          recursive=True):
        with open(path, "r+b") as f:
            f.truncate(min(os.path.getsize(path), 1000))
    for mode in ("sample", "eval"):
        out = _cli(wd, f"--mode={mode}", "--num=4", config=None)
        assert out.returncode == 2, out.stderr[-2000:]
        lines = [x for x in out.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, out.stderr[-3000:]
        assert lines[0].startswith("dpjax error: Cannot restore checkpoint 6"), lines[0]
        assert "TensorStore" not in lines[0]
        assert f"To go on from checkpoint 3, move {wd}/checkpoints/6 out of" in lines[0]
    shutil.move(os.path.join(wd, "checkpoints", "6"), str(tmp_path / "checkpoint_6"))
    path = sample.sample_from_workdir(wd, 2, str(tmp_path / "s"), log=lambda *_: None)
    assert os.path.exists(path)


def test_command_line_mistakes_around_a_trained_run_give_one_line(tmp_path, monkeypatch):
    """Review of 2026-12-06: usage errors printed the whole flag list; --config's sample
    overrides were ignored at --mode=sample, another experiment's --config was applied
    silently, --config.KEY without --config was an 'unknown flag', and a workdir that is
    a file was 'not writable'."""
    wd = str(tmp_path / "run")
    train.train(_config(steps=3, **{"train.grid_samples": 0}), wd, log=lambda *_: None)
    cases = [
        (("--mode=export",), None, "--out is required for --mode=export."),
        (("--mode=sample", "--config.sample.num=3"), None,
         "--config.KEY=VALUE overrides need --config=FILE"),
        # A key the experiment leaves None (ml_collections: 'Type NoneType ... overriding').
        (("--config.dp.epsilon=3",), "experiments/toy_fake.py:steps=12",
         "--config.dp.epsilon cannot be set: this experiment leaves dp.epsilon unset"),
        # Given before --config (absl: 'Found ... in argv before a value for --config').
        (("--config.train.progress=false", "--config=experiments/toy_fake.py:steps=12"), None,
         "--config.train.progress=false comes before --config=FILE: give --config first"),
        (("--mode=sample",), "experiments/dpdm_fmnist.py:smoke",
         "its method is 'dpdm', the run's is 'toy'"),
        (("--mode=export", f"--out={tmp_path}/o"), "experiments/toy_fake.py:steps=12",
         "--config does not apply to --mode=export"),
    ]
    for args, config, needle in cases:
        out = _cli(wd, *args, config=config)
        lines = [x for x in out.stderr.splitlines() if x.strip()]
        assert out.returncode == 2 and len(lines) == 1, (args, out.stderr[-2000:])
        assert needle in lines[0], (args, lines[0])
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = _cli(str(afile), config="experiments/toy_fake.py:steps=12")
    assert out.returncode == 2 and f"--workdir {afile} is a file, not a directory" in out.stderr
    # A quoted '~' (launch/tpu quotes its paths) is the home folder, not a folder '~'.
    monkeypatch.setenv("HOME", str(tmp_path))
    out = _cli("~/afile", config="experiments/toy_fake.py:steps=12")
    assert out.returncode == 2 and f"--workdir {afile} is a file, not a directory" in out.stderr
    out = _cli(wd, "--mode=sample", f"--compilation_cache={afile}", config=None)
    assert out.returncode == 2 and f"--compilation_cache {afile} is a file" in out.stderr
    # The run's own experiment: its sample overrides apply.
    out = _cli(wd, "--mode=sample", f"--out={tmp_path}/s", "--config.sample.num=3",
               config="experiments/toy_fake.py:steps=12")
    assert out.returncode == 0, out.stderr[-2000:]
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert len(z["labels"]) == 3
    # Samples never overwrite an export (its model card describes its own samples).
    release = tmp_path / "release"
    release.mkdir()
    (release / "model_card.md").write_text("card")
    with pytest.raises(sample.SampleOutputError, match="holds other files .model_card.md"):
        sample.sample_from_workdir(wd, 2, str(release), log=lambda *_: None)
    with pytest.raises(sample.SampleOutputError, match="is a file, not a folder"):
        sample.sample_from_workdir(wd, 2, str(afile), log=lambda *_: None)
    # A folder of earlier samples takes new ones; their old PNGs go with them.
    sample.sample_from_workdir(wd, 4, str(tmp_path / "s"), png=True, log=lambda *_: None)
    sample.sample_from_workdir(wd, 2, str(tmp_path / "s"), log=lambda *_: None)
    assert not (tmp_path / "s" / "png").exists()
    (tmp_path / "s" / ".samples.npz.123.abcd.tmp").write_text("")  # A killed write's.
    sample.check_sample_out(str(tmp_path / "s"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "s" / "png").symlink_to(tmp_path / "elsewhere")  # Never written through.
    with pytest.raises(sample.SampleOutputError, match="png .a link or a file"):
        sample.check_sample_out(str(tmp_path / "s"))


def test_a_run_whose_checkpoints_were_deleted_says_it_starts_again(tmp_path):
    import shutil

    wd = str(tmp_path)
    train.train(_config(steps=3, **{"train.grid_samples": 0}), wd, log=lambda *_: None)
    shutil.rmtree(os.path.join(wd, "checkpoints"))
    lines = []
    train.train(_config(steps=3, **{"train.grid_samples": 0}), wd, log=lines.append)
    assert any("records 3 steps done, but" in x and "starting again from step 0" in x
               for x in lines), lines


def test_checkpointer_finishes_its_cleanup_before_it_is_used(tmp_path):
    """A stale temporary directory (a write killed midway) is gone once the Checkpointer
    exists: orbax removes it in a thread that only ``save`` waits for, and a run that
    failed before its first save used to end with that thread's traceback."""
    stale = tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1700000000"
    stale.mkdir(parents=True)
    (stale / "part").write_text("partial write")
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
    assert not stale.exists()
    assert checkpointer.latest_step() is None
    checkpointer.close()


def test_a_checkpoint_with_non_finite_values_is_refused_as_corrupt(tmp_path):
    """A flipped byte restored silently as NaN, was trained on (its examples dropped as
    non-finite) and exported (crash review, 2026-12-07)."""
    from dpjax.state import TrainState

    good = TrainState(jnp.asarray(2, jnp.int32), {"w": jnp.ones((3,))}, {"f": jnp.zeros((2,))},
                      {"mu": jnp.zeros((3,))}, {"w": jnp.ones((3,))})
    bad = TrainState(jnp.asarray(4, jnp.int32), {"w": jnp.array([1.0, jnp.nan, 1.0])},
                     {"f": jnp.zeros((2,))}, {"mu": jnp.zeros((3,))}, {"w": jnp.ones((3,))})
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(2, good, {})
    checkpointer.save(4, bad, {})
    with pytest.raises(CheckpointError, match=r"Checkpoint 4 .* non-finite values in "
                                              r"\[\"\['trainable'\]\['w'\]\"\].*move"):
        checkpointer.restore(good)
    state, _ = checkpointer.restore(good, 2)  # The earlier one, as the message says.
    np.testing.assert_array_equal(state.trainable["w"], np.ones(3))
    checkpointer.close()


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device", "/w/checkpoints/3.orbax-checkpoint-tmp"),
    # What TensorStore raised on a full tmpfs (diff review, 2026-12-07).
    ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.mu/0" in OCDBT database at '
               'local file "/w/checkpoints/3.orbax-checkpoint-tmp/": No space left on '
               "device [os_error_code=28]"),
])
def test_a_full_disk_is_one_checkpoint_error_not_the_log_closing_error(
        tmp_path, monkeypatch, error):
    """A full disk failed the checkpoint, then the metrics log's close in the loop's
    ``finally``: the second OSError replaced the first in 110 lines of traceback."""

    def no_space(*args, **kwargs):
        raise error

    def log_file_error(*args, **kwargs):  # Writing a log file: an OSError.
        raise OSError(28, "No space left on device", "/w/metrics.jsonl")

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", no_space)
    monkeypatch.setattr(metrics_log.MetricsLog, "close", log_file_error)
    with pytest.raises(CheckpointError, match=r"Cannot write checkpoint 3 .*No space left on "
                                              r"device.*saved before are intact"):
        train.train(_config(steps=3), str(tmp_path / "w"), log=lambda *_: None)
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # Not a storage error: not disguised as one.
        train.train(_config(steps=3), str(tmp_path / "w2"), log=lambda *_: None)


@pytest.mark.parametrize("error, storage", [
    (OSError(28, "No space left on device"), True),
    (OSError(30, "Read-only file system"), True),
    (OSError(13, "Permission denied"), True),
    (ValueError("RESOURCE_EXHAUSTED: Error writing ... [os_error_code=28]"), True),
    (ValueError("PERMISSION_DENIED: Error opening ..."), True),
    # A directory removed under a running job, a bug: not "free space or fix the
    # permissions" (checkpoint save and main's handler used two different rules before).
    (OSError(2, "No such file or directory"), False),
    (ValueError("NOT_FOUND: Error opening ... [os_error_code=2]"), False),
    (ValueError("Shapes do not match"), False),
])
def test_which_errors_are_storage_errors(error, storage):
    assert ckpt_lib.is_storage_error(error) is storage


@pytest.mark.parametrize("errno_", [28, 30])
def test_main_reports_a_storage_error_in_one_line_and_not_another_oserror(
        monkeypatch, capsys, errno_):
    """A full or read-only disk outside a checkpoint save (a log, a sample file) is one
    line and exit 2; another OSError (a bug, a removed directory) keeps its traceback."""
    from types import SimpleNamespace

    from dpjax import main as cli_main

    def fail(argv):
        raise OSError(errno_, os.strerror(errno_), "/w/metrics.jsonl")

    monkeypatch.setattr(cli_main, "run", fail)
    monkeypatch.setattr(cli_main, "_DEBUG", SimpleNamespace(value=False))
    with pytest.raises(SystemExit) as exit_:
        cli_main.main(["dpjax"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/w/metrics.jsonl" in err and "intact" in err
    monkeypatch.setattr(cli_main, "run", lambda argv: os.close(-1))  # EBADF: a bug.
    with pytest.raises(OSError):
        cli_main.main(["dpjax"])


def test_bad_data_is_a_clear_error(tmp_path):
    np.savez(
        tmp_path / "d.npz", images=np.zeros((20, 28, 28, 1), np.uint8), labels=np.full((20,), 12)
    )
    cfg = _config(**{"data.source": "npz", "data.path": str(tmp_path / "d.npz")})
    from dpjax.data import DataError

    with pytest.raises(DataError, match="out of range"):
        train.train(cfg, str(tmp_path / "w"), log=lambda *_: None)
    cfg = _config(**{"dp.batch_size": 500})
    with pytest.raises(PrivacyError, match="exceeds the dataset size"):
        train.train(cfg, str(tmp_path / "w2"), log=lambda *_: None)


def test_typos_in_config_are_errors():
    c = toy_fake.get_config("")
    with pytest.raises(AttributeError):
        c.dp.clip_nrom = 1.0
    with pytest.raises(ConfigError, match="Did you mean 'smoke'"):
        toy_fake.get_config("smok")


def test_sampling_from_checkpoint_writes_files_and_never_reads_data(tmp_path, monkeypatch):
    wd = str(tmp_path / "run")
    train.train(_config(steps=3), wd, log=lambda *_: None)
    assert os.path.exists(os.path.join(wd, "samples_grid.png"))
    assert os.path.exists(os.path.join(wd, "privacy_report.md"))

    def no_data(*a, **k):
        raise AssertionError("sampling read the private data")

    monkeypatch.setattr("dpjax.data.load", no_data)
    path = sample.sample_from_workdir(wd, 25, str(tmp_path / "out"), png=True)
    with np.load(path) as z:
        assert z["images"].shape == (25, 28, 28, 1) and z["images"].dtype == np.uint8
        assert sorted(set(z["labels"].tolist())) == list(range(10))
    assert os.path.exists(tmp_path / "out" / "samples_grid.png")
    assert len(os.listdir(tmp_path / "out" / "png")) == 10


def test_five_kills_including_during_checkpoint_writes(tmp_path, record_tried):
    """SIGKILL 5 times (twice while a checkpoint is being written), then finish."""
    args = ["--config.train.ckpt_every=2", "--config.train.log_every=1",
            "--config.train.progress=False", "--config.train.grid_samples=0"]
    config = "experiments/toy_fake.py:steps=16"
    ref = tmp_path / "ref"
    assert _cli(ref, *args, config=config).returncode == 0
    wd = tmp_path / "faulty"
    _place_secret(ref, wd)
    rng = random.Random(1234)
    steps_done_seen, kills_during_write = [], 0
    for attempt in range(5):
        proc = _cli(wd, *args, config=config, wait=False)
        ckpt_dir = wd / "checkpoints"
        during_write = attempt in (1, 3)
        target = rng.randint(1, 3)
        deadline = time.time() + 300
        killed = False
        while time.time() < deadline and proc.poll() is None:
            if during_write and ckpt_dir.exists() and any(
                "tmp" in p.name for p in ckpt_dir.iterdir()
            ):
                proc.send_signal(signal.SIGKILL)
                kills_during_write += 1
                killed = True
                break
            if not during_write and (wd / "metrics.jsonl").exists():
                # The run may be writing a row right now (a cut row once failed here).
                rows = metrics_log.read(str(wd))
                if rows and rows[-1]["step"] >= min(15, target + 3 * attempt):
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.01)
        if not killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        record_tried(
            "faults",
            f"SIGKILL {attempt + 1}/5 " + ("during a checkpoint write" if during_write and killed
                                           else "between steps")
        )
        plan_file = wd / "dp_plan.json"
        if plan_file.exists():
            steps_done_seen.append(json.loads(plan_file.read_text()).get("steps_done", 0))
        # The checkpoint directory is never corrupt: the latest checkpoint restores.
        if (wd / "checkpoints").exists() and any(
            p.name.isdigit() for p in (wd / "checkpoints").iterdir()
        ):
            assert all(np.isfinite(x).all() for x in _flat_state(str(wd)))
    assert steps_done_seen == sorted(steps_done_seen), "epsilon/steps went backwards"
    out = _cli(wd, *args, config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    for a, b in zip(_flat_state(ref), _flat_state(wd), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = metrics_log.read(str(wd))
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert json.loads((wd / "dp_plan.json").read_text())["steps_done"] == 16


def test_wall_time_limit_checkpoints_and_reruns_resume_bit_identically(
        tmp_path, same_noise_secret):
    """train.max_seconds_per_run stops with a checkpoint; reruns end where one run ends."""
    ref = train.train(_config(steps=4), str(tmp_path / "ref"), log=lambda *_: None)
    wd = str(tmp_path / "limited")
    runs, msgs = 0, []
    while True:
        state = train.train(
            _config(steps=4, **{"train.max_seconds_per_run": 1e-9}), wd, log=msgs.append
        )
        runs += 1
        if int(state.step) == 4:
            break
        assert runs < 6
    assert runs == 4  # one step per invocation: the limit is checked after each step
    assert sum("max_seconds_per_run" in m for m in msgs) == 3
    for a, b in zip(jax.tree_util.tree_leaves(ref.as_dict()),
                    jax.tree_util.tree_leaves(state.as_dict()), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_finishes_the_step_checkpoints_reports_and_resumes_bit_identically(
    tmp_path, monkeypatch, same_noise_secret
):
    """A preemption (SIGTERM) during step 5 of 8: the step finishes, its checkpoint and
    privacy report are written (the default action lost every step since the last
    checkpoint), and the resumed run ends where an uninterrupted one does."""
    from dpjax import stop_signals

    over = {"train.ckpt_every": 100, "train.grid_samples": 4}
    ref = tmp_path / "ref"
    train.train(_config(steps=8, **over), str(ref), log=lambda *_: None)

    real_advance = train.dpsgd_advance

    def advance_that_is_preempted(run, dataset):
        advance = real_advance(run, dataset)

        def step(state, t):
            if t == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # Arrives while step 5 is computed.
            return advance(state, t)

        return step

    monkeypatch.setattr(train, "dpsgd_advance", advance_that_is_preempted)
    wd = tmp_path / "preempted"
    lines = []
    with pytest.raises(stop_signals.StoppedBySignal, match="stopped at step 5 of 8 on SIGTERM"):
        train.train(_config(steps=8, **over), str(wd), log=lines.append)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Restored.
    assert any("stopping at step 5 of 8: SIGTERM received" in line for line in lines)
    assert json.loads((wd / "dp_plan.json").read_text())["steps_done"] == 5
    assert "- steps: 5 done of 8 planned" in (wd / "privacy_report.md").read_text()
    assert not (wd / "samples_grid.png").exists()  # Stopping is not delayed by sampling.
    assert [r["step"] for r in metrics_log.read(str(wd))] == [1, 2, 3, 4, 5]

    monkeypatch.setattr(train, "dpsgd_advance", real_advance)
    train.train(_config(steps=8, **over), str(wd), log=lambda *_: None)
    for a, b in zip(_flat_state(ref), _flat_state(wd), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in metrics_log.read(str(wd))] == list(range(1, 9))


def test_stop_signals_a_second_signal_acts_at_once_and_an_ignored_one_stays_ignored():
    from dpjax import stop_signals

    with stop_signals.catch_stop_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # The second: Python's default, now.
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_signals.catch_stop_signals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
        assert not stop.requested  # A job started with SIGINT ignored keeps it ignored.
    finally:
        signal.signal(signal.SIGINT, previous)
    with stop_signals.catch_stop_signals(enabled=False) as stop:  # Several processes.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_command_line_exits_143_after_a_sigterm_with_one_line(tmp_path):
    args = ["--config.train.ckpt_every=100", "--config.train.log_every=1",
            "--config.train.progress=False", "--config.train.grid_samples=0"]
    wd = tmp_path / "run"
    proc = _cli(wd, *args, config="experiments/toy_fake.py:steps=400", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (wd / "metrics.jsonl").exists() and len(metrics_log.read(str(wd))) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 143, out
    assert "Traceback" not in out
    step = json.loads((wd / "dp_plan.json").read_text())["steps_done"]
    assert 2 <= step < 400
    assert f"dpjax: stopped at step {step} of 400 on SIGTERM" in out
