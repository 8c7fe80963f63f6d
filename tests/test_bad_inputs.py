"""Bad input on every entry point (train, sample, eval, export, audit): one clear error.

Each case must raise one of the error types the CLI reports in one line
(``dpjax.main.user_errors``), with a message naming the problem, and must leave an
existing run's checkpoints untouched. The count of cases tried is printed in the test
summary (see conftest.py).
"""

import os

import numpy as np
import pytest
from PIL import Image

from dpjax import export, sample, train, workdir_guard
from dpjax.eval import report
from dpjax.main import user_errors
from experiments import toy_fake
from tests.config_overrides import with_overrides
from tests.test_export import corrupt_latest_checkpoint


def _config(**over):
    return with_overrides(toy_fake.get_config("smoke"), over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    train.train(_config(), wd, log=lambda *_: None)
    return wd


def _folder(tmp_path, kind):
    root = tmp_path / kind
    for k in range(10):
        (root / str(k)).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / str(k) / "a.png")
    if kind == "corrupt":
        (root / "3" / "b.png").write_bytes(b"not a png at all")
    else:
        Image.fromarray(np.zeros((30, 28), np.uint8)).save(root / "4" / "b.png")
    return str(root)


def _npz(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


TRAIN_CASES = {
    "missing dataset path": (lambda t: {"data.source": "idx", "data.path": "/nonexistent"},
                             "/nonexistent"),
    "corrupt image": (lambda t: {"data.source": "folder", "data.path": _folder(t, "corrupt"),
                                 "data.image_size": 28, "data.channels": 1}, "b.png"),
    # Measuring the size on the files is refused for private data (the next case), so
    # mixed sizes without data.image_size stop a public run.
    "mixed image sizes": (lambda t: {"data.source": "folder", "data.path": _folder(t, "mixed"),
                                     "dp.enabled": False}, "b.png"),
    "private folder without its image shape": (lambda t: {
        "data.source": "folder", "data.path": _folder(t, "corrupt")},
        "needs data.image_size and data.channels set"),
    "labels out of range": (lambda t: {"data.source": "npz", "data.path": _npz(
        t, "labels", images=np.zeros((20, 28, 28, 1), np.uint8), labels=np.full(20, 12))},
        "out of range"),
    "float images outside [-1, 1]": (lambda t: {"data.source": "npz", "data.path": _npz(
        t, "float", images=np.full((20, 28, 28, 1), 7.0, np.float32),
        labels=np.zeros(20, np.int64)), "data.float_range": "-1,1"},
        "image 0 has values outside data.float_range [-1,1] (e.g. 7)"),
    "float images without data.float_range": (lambda t: {"data.source": "npz", "data.path": _npz(
        t, "float", images=np.full((20, 28, 28, 1), 0.5, np.float32),
        labels=np.zeros(20, np.int64))}, "set data.float_range to '0,1' or '-1,1'"),
    "data.limit on private data": (lambda t: {"data.limit": 100}, "data.limit=100 is refused"),
    "wrong image rank": (lambda t: {"data.source": "npz", "data.path": _npz(
        t, "rank", images=np.zeros((20, 28), np.uint8), labels=np.zeros(20, np.int64))},
        "shape"),
    "empty dataset": (lambda t: {"data.source": "npz", "data.path": _npz(
        t, "empty", images=np.zeros((0, 28, 28, 1), np.uint8), labels=np.zeros(0, np.int64))},
        "empty"),
    "dataset smaller than the expected batch": (lambda t: {"dp.batch_size": 1000},
                                                "exceeds the dataset size"),
    "images of zero height and width": (lambda t: {"data.source": "npz", "data.path": _npz(
        t, "zero", images=np.zeros((20, 0, 0, 1), np.uint8), labels=np.zeros(20, np.int64))},
        "zero height or width"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_input(case, tmp_path, record_tried):
    over, needle = TRAIN_CASES[case]
    record_tried("bad inputs", f"train: {case}")
    with pytest.raises(user_errors()) as e:
        train.train(_config(**over(tmp_path)), str(tmp_path / "w"), log=lambda *_: None)
    assert needle.lower() in str(e.value).lower(), str(e.value)
    assert not os.path.exists(tmp_path / "w")  # Not even empty folders are left.


# Values of the right type that the typed config refuses, before the workdir is created
# (before, a mistyped optimizer or clipping name failed after config.json was written,
# and the corrected command was then refused as a changed config).
BAD_VALUES = {
    "optim.name": ("adma", "not one of ['adam', 'adamw', 'sgd']"),
    "data.float_range": ("0-1", "data.float_range must be one of ['', '0,1', '-1,1']"),
    "dp.clipping": ("ghots", "not one of ['vmap', 'layerwise', 'ghost']"),
    "dp.compute_dtype": ("bfloat15", "not one of"),
    "dp.microbatch_loop": ("unrol", "not one of"),
    "dp.accountant": ("prv", "not one of ['rdp', 'pld']"),
    "dp.microbatch_size": (-1, "dp.microbatch_size must be >= 0"),
    "dp.delta": (0.0, "dp.delta must be in (0, 1)"),
    "dp.epochs": (float("inf"), "dp.epochs must be >= 0 and finite"),
    "dp.clip_norm": (0.0, "dp.clip_norm must be > 0"),
    "train.log_every": (0, "train.log_every must be >= 1"),
    "train.ckpt_every": (0, "train.ckpt_every must be >= 1"),
    "sample.batch_size": (0, "sample.batch_size must be >= 1"),
    "optim.learning_rate": (-3e-4, "optim.learning_rate must be > 0"),
    "optim.b1": (1.0, "optim.b1 must be in [0, 1)"),
    "optim.eps": (0.0, "optim.eps must be > 0"),
    "optim.b2": (1.0, "optim.b2 must be in [0, 1)"),
    "optim.weight_decay": (-1e-4, "optim.weight_decay must be >= 0"),
    "optim.learning_rate#nan": (float("nan"), "optim.learning_rate must be > 0, got nan"),
    "optim.warmup_steps": (-5, "optim.warmup_steps must be >= 0"),
    "train.ema_rate": (1.5, "train.ema_rate must be in [0, 1)"),
    "method": ("toyy", "Unknown method 'toyy'"),
    # The eval section is checked when training starts, not at --mode=eval after it.
    "eval.fid_batch": (-1, "eval.fid_batch must be >= 0"),
    "eval.num_sampels": (5, "Unknown config key 'eval.num_sampels'"),
    "eval.sampling.s_churn": (10.0, "samples without a diffusion sampler"),
}


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_a_bad_config_value_fails_before_the_workdir_is_created(key, tmp_path, record_tried):
    from dpjax.typed_config import ConfigError

    value, needle = BAD_VALUES[key]
    record_tried("bad inputs", f"train: {key}={value!r}")
    with pytest.raises(ConfigError) as e:
        # 'key#case': a second case of the same key.
        train.train(_config(**{key.split("#")[0]: value}), str(tmp_path / "w"),
                    log=lambda *_: None)
    assert needle in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("stage", ["make", "init"])
def test_a_method_setting_that_fits_no_model_fails_before_anything_is_written(
        stage, tmp_path, monkeypatch, record_tried):
    """A setting the method refuses while building its model (make) or parameters (init:
    a trainable pattern or LoRA target that matches nothing) is one ConfigError line, and
    leaves no run behind: the corrected command then starts the run (before, init ran
    after config.json and the plan were written, and the corrected command was refused
    as a changed config)."""
    from dpjax import params_select
    from dpjax.methods import toy
    from dpjax.typed_config import ConfigError

    record_tried("bad inputs", f"train: a method setting refused at {stage}")
    init = toy.Toy.init

    def refuse_make(*_):  # As a method's own setting checks do.
        raise ValueError("unet 'fmnist28' fits no 8x8 image")

    def init_selecting_a_typo(self, key, spec):  # As DP-LDM's trainable patterns do.
        params = init(self, key, spec)
        params_select.split(params.trainable, ("atn",))
        return params

    target = ((toy, "make", refuse_make) if stage == "make"
              else (toy.Toy, "init", init_selecting_a_typo))
    with monkeypatch.context() as m:
        m.setattr(*target)
        with pytest.raises(ConfigError, match="'fmnist28' fits no|pattern 'atn' matches no"):
            train.train(_config(), str(tmp_path / "w"), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "w")
    assert int(train.train(_config(), str(tmp_path / "w"), log=lambda *_: None).step) > 0


def test_a_plain_value_error_in_init_is_not_reported_as_a_setting(tmp_path, monkeypatch):
    """A plain ValueError inside a method's init may be a bug (a shape mismatch): it keeps
    its type and traceback instead of becoming a one-line 'bad setting'."""
    from dpjax.methods import toy
    from dpjax.typed_config import ConfigError

    def broken(*_):
        raise ValueError("Incompatible shapes for broadcasting")

    monkeypatch.setattr(toy.Toy, "init", broken)
    with pytest.raises(ValueError, match="Incompatible shapes") as e:
        train.train(_config(), str(tmp_path / "w"), log=lambda *_: None)
    assert not isinstance(e.value, ConfigError)


def test_a_seed_that_is_not_an_integer_is_refused():
    """ml_collections keeps a ConfigDict's int an int; a plain dict config is checked too
    (1.7 was silently truncated to 1)."""
    from dpjax import run_config
    from dpjax.typed_config import ConfigError

    d = _config().to_dict()
    for bad in (1.7, None, True):
        with pytest.raises(ConfigError, match="seed: expected an integer"):
            run_config.from_configdict({**d, "seed": bad})
    assert run_config.from_configdict(d).seed == d["seed"]
    # A negative seed failed at the first step (np.random.SeedSequence), after the
    # workdir had been written.
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\), got -1"):
        run_config.from_configdict({**d, "seed": -1})
    # jax.random.key keeps 32 bits: 2**32 was taken and drew seed 0's keys (randomness
    # review, 2026-12-07).
    with pytest.raises(ConfigError, match=r"got 4294967296"):
        run_config.from_configdict({**d, "seed": 2**32})
    assert run_config.from_configdict({**d, "seed": 0}).seed == 0
    assert run_config.from_configdict({**d, "seed": 2**32 - 1}).seed == 2**32 - 1


def test_numpy_numbers_in_a_config_are_taken_and_stored_as_numbers():
    """A config computed with NumPy (a seed from np.random, a learning rate as np.float32)
    was refused ('expected an integer/number'), although the values are exact; and
    config.json stored them as strings, which --mode=sample could not read back."""
    import dataclasses
    import json

    import ml_collections

    from dpjax import run_config
    from dpjax.typed_config import ConfigError

    d = _config().to_dict()
    typed = run_config.from_configdict(d)
    d["seed"] = np.int64(7)
    d["optim"]["learning_rate"] = np.float32(typed.optim.learning_rate)
    d["dp"]["batch_size"] = np.int32(typed.dp.batch_size)
    cfg = ml_collections.ConfigDict(d)  # As a get_config that computes with NumPy builds it.
    got = run_config.from_configdict(cfg)
    assert (got.seed, got.dp.batch_size) == (7, typed.dp.batch_size)
    assert type(got.seed) is int and type(got.dp.batch_size) is int
    lr = got.optim.learning_rate
    assert type(lr) is float and lr == float(np.float32(typed.optim.learning_rate))
    stored = json.loads(run_config.config_to_json(cfg))
    assert stored["seed"] == 7 and stored["dp"]["batch_size"] == typed.dp.batch_size
    back = run_config.from_configdict(ml_collections.ConfigDict(stored))
    # The eval section is a free dict (tuples come back as lists): compared apart.
    assert dataclasses.replace(back, eval={}) == dataclasses.replace(got, eval={})
    for bad in (np.float64(1.5), np.bool_(True)):
        with pytest.raises(ConfigError, match="seed: expected an integer"):
            run_config.from_configdict({**cfg.to_dict(), "seed": bad})


def test_a_method_that_is_not_a_name_is_refused():
    """A plain dict config's method list (e.g. from a sweep) is one ConfigError line; it
    was a TypeError ('unhashable type: list') from the method table's lookup."""
    from dpjax import run_config
    from dpjax.typed_config import ConfigError

    d = _config().to_dict()
    for bad in (["toy"], None, {"name": "toy"}):
        with pytest.raises(ConfigError, match="method: expected one method name"):
            run_config.from_configdict({**d, "method": bad})


def test_the_config_choices_are_the_implementations():
    """The Literal choices of the typed config are exactly what the code accepts."""
    import typing

    from dpjax import optim, run_config
    from dpjax.privacy import accounting, clipping, compute_dtype, microbatch_loop

    choices = {run_config.ClippingName: clipping.MICROBATCH_IMPLS,
               run_config.ComputeDtypeName: compute_dtype.COMPUTE_DTYPES,
               run_config.MicrobatchLoopName: microbatch_loop.MICROBATCH_LOOPS,
               run_config.AccountantName: accounting.ACCOUNTANTS,
               run_config.RelationName: accounting._RELATIONS}  # fmt: skip
    for literal, table in choices.items():
        assert set(typing.get_args(literal)) == set(table), literal
    for name in typing.get_args(run_config.OptimizerName):
        optim.make_optimizer(run_config.OptimConfig(name=name))


def test_train_disk_full_fails_before_training(tmp_path, monkeypatch, record_tried):
    record_tried("bad inputs", "train: disk full")

    class Usage:
        free = 1024

    monkeypatch.setattr(workdir_guard.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(train.WorkdirError, match="MiB free"):
        train.train(_config(), str(tmp_path / "w"), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_resume_with_mismatched_config_keeps_checkpoints(trained, record_tried):
    record_tried("bad inputs", "train: mismatched config on resume")
    before = sorted(os.listdir(os.path.join(trained, "checkpoints")))
    with pytest.raises(user_errors(), match="different config"):
        train.train(_config(**{"optim.learning_rate": 0.5}), trained, log=lambda *_: None)
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == before


def test_fields_added_to_dpjax_since_a_run_began_do_not_block_its_resume(tmp_path):
    """A stored config without a newer field resumes when the field is at its default,
    and is refused when it is not (then the run would change)."""
    import json

    wd = str(tmp_path / "old")
    os.makedirs(wd)
    config = _config()
    stored = json.loads(workdir_guard.run_config.config_to_json(config))
    del stored["dp"]["compute_dtype"], stored["optim"]["warmup_steps"]
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump(stored, f)
    workdir_guard.check_resume_config(wd, config)  # Both at their defaults: the same run.
    # The message names the value the run had: the default of a field it lacks.
    with pytest.raises(user_errors(), match=r"dp.compute_dtype: 'float32' -> 'bfloat16'"):
        workdir_guard.check_resume_config(wd, _config(**{"dp.compute_dtype": "bfloat16"}))


def test_the_ema_settings_are_locked_on_resume_and_the_rest_of_train_is_free(tmp_path):
    """The exported weights are the EMA, and the model card states its rate: a resume
    under another rate or warmup would average two rates under the first one's name."""
    import json

    wd = str(tmp_path)
    config = _config()
    workdir_guard.check_resume_config(wd, config)  # A new run: writes config.json.
    workdir_guard.check_resume_config(wd, _config(**{"train.ckpt_every": 7,
                                                     "train.log_every": 3}))
    with pytest.raises(user_errors(), match=r"train.ema_rate: 0.999 -> 0.0"):
        workdir_guard.check_resume_config(wd, _config(**{"train.ema_rate": 0.0}))
    with pytest.raises(user_errors(), match=r"train.ema_warmup: True -> False"):
        workdir_guard.check_resume_config(wd, _config(**{"train.ema_warmup": False}))
    # A stored config from before a field existed had the field's default.
    path = os.path.join(wd, "config.json")
    with open(path) as f:
        stored = json.load(f)
    del stored["train"]["ema_warmup"]
    with open(path, "w") as f:
        json.dump(stored, f)
    workdir_guard.check_resume_config(wd, config)
    with pytest.raises(user_errors(), match=r"train.ema_warmup: True -> False"):
        workdir_guard.check_resume_config(wd, _config(**{"train.ema_warmup": False}))


ENTRY_POINTS = {
    "sample": lambda wd, out: sample.sample_from_workdir(wd, 4, out),
    "eval": lambda wd, out: report.evaluate_workdir(
        wd, report.EvalConfig(num_samples=4, fid=False, downstream=False), log=lambda *_: None
    ),
    "export": lambda wd, out: export.export_run(wd, out, 4, log=lambda *_: None),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_missing_run_is_a_clear_error(entry, tmp_path, record_tried):
    record_tried("bad inputs", f"{entry}: missing workdir")
    with pytest.raises(user_errors(), match="no dpjax run|No checkpoint|not"):
        ENTRY_POINTS[entry](str(tmp_path / "nothing"), str(tmp_path / "out"))


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_corrupt_checkpoint_is_a_clear_error(entry, trained, tmp_path, record_tried):
    import shutil

    record_tried("bad inputs", f"{entry}: corrupt checkpoint")
    wd = str(tmp_path / "copy")
    shutil.copytree(trained, wd)
    corrupt_latest_checkpoint(wd, "truncate")
    with pytest.raises(user_errors(), match="Cannot restore checkpoint 2 .*it is corrupt"):
        ENTRY_POINTS[entry](wd, str(tmp_path / "out"))


RUN_FILES = ("config.json", "dp_plan.json", "data_spec.json")


@pytest.mark.parametrize("damage", ["not json", "a key removed"])
@pytest.mark.parametrize("name", RUN_FILES)
def test_a_damaged_run_file_is_one_clear_error_everywhere(name, damage, trained, tmp_path,
                                                          record_tried):
    """A run file edited outside dpjax gives one line naming it, on every entry point and
    on resume, and leaves the checkpoints as they were (was: a JSONDecodeError or
    KeyError traceback)."""
    import json
    import shutil

    record_tried("bad inputs", f"all entries: {name} {damage}")
    wd = str(tmp_path / "copy")
    shutil.copytree(trained, wd)
    path = os.path.join(wd, name)
    if damage == "not json":
        with open(path, "a") as f:
            f.write("}{")
    else:
        with open(path) as f:
            d = json.load(f)
        del d[{"config.json": "method", "dp_plan.json": "plan",
               "data_spec.json": "num_classes"}[name]]
        with open(path, "w") as f:
            json.dump(d, f)
    before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
    for entry, call in sorted(ENTRY_POINTS.items()):
        with pytest.raises(user_errors()) as e:
            call(wd, str(tmp_path / f"out_{entry}"))
        # The file is named; a resume may instead refuse the config that differs.
        assert name in str(e.value), (entry, e.value)
    if name == "data_spec.json":  # A resume derives the spec from the data again.
        train.train(_config(), wd, log=lambda *_: None)
        assert sample.load_spec(wd).num_classes == 10
    else:
        with pytest.raises(user_errors()) as e:
            train.train(_config(), wd, log=lambda *_: None)
        # A resume may instead refuse the config that differs from the stored one.
        assert name in str(e.value) or "different config" in str(e.value), e.value
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before


def test_the_command_line_reports_a_bad_config_in_one_line(tmp_path, record_tried):
    """Errors while the flags load (before dpjax's own code runs): one line, exit 2."""
    from tests.test_export import cli

    files = {"bad_syntax": 'def get_config(arg=""):\n    return {\n',
             "raises": 'def get_config(arg=""):\n    raise RuntimeError("no data here")\n',
             "no_get_config": "x = 1\n",
             "locked_typo": "from experiments import toy_fake\n\n\ndef get_config(arg=''):\n"
                            "    c = toy_fake.get_config('smoke')\n    c.dp.clip_nrom = 1.0\n"
                            "    return c\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    cases = {
        (f"--config={tmp_path}/bad_syntax.py",): "the --config file has a syntax error: '{' "
            f"was never closed ({tmp_path}/bad_syntax.py, line 2)",
        (f"--config={tmp_path}/raises.py",):
            "the --config experiment failed: RuntimeError: no data here (--debug shows where)",
        (f"--config={tmp_path}/no_get_config.py",):
            "the --config file defines no get_config(arg) function",
        (f"--config={tmp_path}/locked_typo.py",):  # Without the section's whole dump.
            'cannot be added since the config is locked. Did you mean "clip_norm" instead',
        ("--config=experiments/toy_fake.py:smoke", "--config.dp.clip_nrom=1"):
            "unknown config key dp.clip_nrom in --config.dp.clip_nrom=1. Did you mean "
            "'clip_norm'? Keys of dp: accountant, batch_size, clip_norm,",
        ("--config=experiments/toy_fake.py:smoke", "--config.method_args.zzzq=1"):
            "unknown config key method_args.zzzq in --config.method_args.zzzq=1. Keys of "
            "method_args: input_noise, noise_multiplicity.",
        ("--config=experiments/no_such_experiment.py",): "cannot load the --config file",
        ("--config=experiments/toy_fake.py:smok",): "Did you mean 'smoke'?",
        ("--config=experiments/toy_fake.py:smoke", "--config.optim.name=adma"):
            "optim.name: 'adma' is not one of",
        ("--config=experiments/toy_fake.py:steps=abc",):
            "the --config experiment failed: ValueError: invalid literal for int()",
    }
    for args, needle in cases.items():
        record_tried("bad inputs", f"command line: {' '.join(args)}")
        result = cli(*args, f"--workdir={tmp_path / 'w'}")
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("dpjax error:")]
        assert len(errors) == 1 and needle in errors[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "w")


def test_a_float_setting_reads_the_non_finite_strings_dpjax_json_writes_and_no_others():
    """An export's model_config.json holds the sampler's s_max = inf as 'inf'
    (atomic_file.json_safe); reading it back refused it ('expected a number')."""
    import math

    from dpjax import atomic_file, typed_config
    from dpjax.diffusion import samplers

    stored = atomic_file.json_safe({"s_max": math.inf, "s_min": 0.0})
    assert stored["s_max"] == "inf"
    got = typed_config.from_configdict(samplers.SamplerSettings, stored, "method_args")
    assert got.s_max == math.inf and got.s_min == 0.0
    for bad in ("Infinity", "1e309", "infinite", ""):
        with pytest.raises(typed_config.ConfigError, match="s_max: expected a number"):
            typed_config.from_configdict(samplers.SamplerSettings, {"s_max": bad}, "method_args")


def test_config_json_is_strict_json_and_a_run_stored_with_bare_infinity_still_resumes(
        tmp_path):
    """config.json held DPDM's s_max = inf as a bare Infinity token, which strict JSON
    parsers (JavaScript's, jq's) reject; it now holds 'inf'. A run stored the old way
    resumes as the same run, and its sampler digest (eval's resumable samples) stays."""
    import json
    import math

    import ml_collections

    from dpjax import run_config
    from dpjax.eval import report
    from experiments import dpdm_fmnist

    config = dpdm_fmnist.get_config("smoke")
    text = run_config.config_to_json(config)

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    stored = json.loads(text, parse_constant=refuse)
    assert stored["method_args"]["s_max"] == "inf"
    typed = run_config.from_configdict(ml_collections.ConfigDict(stored))
    assert typed.method_args.s_max == math.inf
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    (new / "config.json").write_text(text)
    (old / "config.json").write_text(json.dumps(  # As dpjax wrote it before.
        config.to_dict(), indent=2, sort_keys=True, default=run_config._json_value))
    assert "Infinity" in (old / "config.json").read_text()
    for d in (new, old):
        assert workdir_guard.check_resume_config(str(d), config, write=False) == []
    assert report.sampler_definition_digest(str(new)) == report.sampler_definition_digest(
        str(old))
    with pytest.raises(user_errors(), match=r"method_args.s_max: 'inf' -> 80.0"):
        workdir_guard.check_resume_config(
            str(old), with_overrides(config, {"method_args.s_max": 80.0}), write=False)
