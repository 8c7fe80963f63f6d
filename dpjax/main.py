"""dpjax's command line: the only file with flags.

    python -m dpjax.main --config=experiments/dpdm_fmnist.py:eps=10 --workdir=runs/x
    python -m dpjax.main --mode=sample --workdir=runs/x --num=60000 [--png]
    python -m dpjax.main --mode=audit --workdir=runs/x            # or --config=... instead
    python -m dpjax.main --mode=export --workdir=runs/x --out=release/x [--num=10000]
    python -m dpjax.main --mode=sample --export=release/x --out=samples/x [--num=1000]

Errors a user can cause (a mistyped config key, a missing dataset, a corrupt image, a
corrupt checkpoint, a budget overrun) end with one readable line, not a traceback.
SIGTERM or Ctrl-C during training ends the step in progress, saves its checkpoint and
privacy report, and exits with 143 or 130 (``dpjax/stop_signals.py``); a second one stops
at once.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from dpjax import flag_errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/dpdm_fmnist.py:eps=1", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of the run (checkpoints, logs, samples)."
)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "sample", "eval", "audit", "export"], "What to do."
)
_NUM = flags.DEFINE_integer(
    "num",
    None,
    "--mode=sample/export/eval: number of samples (default: the config's sample.num, "
    "or for eval its eval.num_samples).",
)
_FID_BATCH = flags.DEFINE_integer(
    "fid_batch", None, "--mode=eval: Inception batch size (overrides eval.fid_batch)."
)
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", None, "--mode=eval: sampler batch size (overrides eval.sample_batch)."
)
_EXPORT = flags.DEFINE_string(
    "export", None, "--mode=sample: sample from this export (--mode=export's output, checked "
    "against its manifest) instead of a workdir; needs --out.")
_PNG = flags.DEFINE_boolean("png", False, "--mode=sample/export: also write a PNG folder.")
_OUT = flags.DEFINE_string(
    "out", None, "--mode=sample/export: output directory; --mode=audit: where audit.json goes."
)
_AUDIT_CANARIES = flags.DEFINE_integer("audit_canaries", 2000, "--mode=audit: canaries m.")
_AUDIT_STEPS = flags.DEFINE_integer(
    "audit_steps", 0, "--mode=audit: DP steps to audit (0: all planned steps)."
)
_AUDIT_SEED = flags.DEFINE_integer("audit_seed", 0, "--mode=audit: seed of canaries and noise.")
_AUDIT_CONFIDENCE = flags.DEFINE_float(
    "audit_confidence", 0.95, "--mode=audit: confidence of the lower bound."
)
_AUDIT_DATA = flags.DEFINE_enum(
    "audit_data",
    "fake",
    ["fake", "config"],
    "--mode=audit: rows the canaries join: 'fake' (a public stand-in of the same shape and "
    "size; the audit then reads no private data) or 'config' (the run's data).",
)
_AUDIT_NOISE_SCALE = flags.DEFINE_float(
    "audit_noise_scale", 1.0, "--mode=audit FAULT INJECTION: multiply sigma (0: no noise)."
)
_AUDIT_CLIP_SCALE = flags.DEFINE_float(
    "audit_clip_scale", 1.0, "--mode=audit FAULT INJECTION: clip at C * this, noise unchanged."
)
_DEBUG = flags.DEFINE_boolean("debug", False, "Show full tracebacks for user errors.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    "workdir",
    "Where compiled XLA programs are kept for later processes (resumes, --mode=eval): "
    "'workdir' (<workdir>/xla_cache), a directory, or 'off' (dpjax/compile_cache.py).",
)


class UsageError(ValueError):
    """A missing or conflicting command-line flag: one line and exit 2, where absl's own
    UsageError printed the whole flag list."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix: reported in one line."""
    from dpjax.atomic_file import CorruptFileError
    from dpjax.checkpoint import CheckpointError
    from dpjax.data.dataset import DataError
    from dpjax.export import ExportError
    from dpjax.privacy.accounting import PrivacyError
    from dpjax.released import ExportLoadError
    from dpjax.sample import SampleOutputError
    from dpjax.train import NonFiniteError, WorkdirError
    from dpjax.typed_config import ConfigError

    return (
        UsageError,
        ConfigError,
        DataError,
        PrivacyError,
        CheckpointError,
        NonFiniteError,
        WorkdirError,
        FileNotFoundError,
        ExportError,
        CorruptFileError,
        SampleOutputError,
        ExportLoadError,
    )


def _drop_closed_loop_noise() -> None:
    """Silences orbax/tensorstore's leftovers of a failed restore.

    After a failed restore (a truncated checkpoint file), tensorstore callbacks still
    fire into orbax's closed asyncio loop, orbax's other read coroutines fail unawaited,
    and asyncio logs their futures: Python printed each as a traceback (up to 578 lines)
    although the failure itself is already reported as one CheckpointError line.
    """
    import logging

    default = sys.unraisablehook

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        code = getattr(unraisable.object, "cr_code", None)  # An unawaited coroutine.
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        default(unraisable)

    sys.unraisablehook = hook
    # "Future exception was never retrieved": orbax's reads, in asyncio's log (dpjax
    # itself uses no asyncio).
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def run_audit_mode(
    workdir: str,
    config=None,
    audit_config=None,
    data: str = "fake",
    out: str | None = None,
    log=print,
):
    """``--mode=audit``: audits a config's plan (if given) or a workdir's run.

    With ``config``, the plan is the one training ``config`` would make and the method
    runs at its initial parameters; otherwise the workdir's ``dp_plan.json``, config and
    latest checkpoint are used. Writes ``audit.json`` to ``out`` (default: ``workdir``)
    and returns the ``AuditResult``.
    """
    import shutil
    import tempfile

    import numpy as np

    from dpjax import atomic_file, export, run_config, train
    from dpjax import data as data_lib
    from dpjax.data.fake import make_fake
    from dpjax.methods import get_method_module
    from dpjax.methods.base import DataSpec
    from dpjax.privacy import audit
    from dpjax.randomness import Streams

    audit_config = audit_config or audit.AuditConfig()
    dataset = None
    if config is not None:
        cfg = run_config.from_configdict(config)
        dataset = data_lib.load(cfg.data)
        spec = DataSpec(dataset.image_shape, cfg.data.num_classes)
        method = get_method_module(cfg.method).make(cfg.method_args, spec)
        scratch = tempfile.mkdtemp(prefix="dpjax_audit_plan.")
        try:  # The plan exactly as training would make it, without touching the workdir.
            plan = train.resolve_plan(cfg, len(dataset), scratch, method=method)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        params = method.init(Streams.from_seed(cfg.seed).init, spec)
        trainable, frozen, source = params.trainable, params.frozen, "config, initial parameters"
    else:
        run = export.load_run(workdir)
        cfg, plan, spec, method = run.config, run.plan, run.spec, run.method
        trainable, frozen = run.state.trainable, run.state.frozen
        source = f"workdir {workdir}, checkpoint step {run.step}"
    if data == "config":
        dataset = dataset or data_lib.load(cfg.data)
        if len(dataset) != plan.num_examples:
            raise audit.accounting.PrivacyError(
                f"The data has {len(dataset)} examples but the plan was made for "
                f"{plan.num_examples}."
            )
        images, labels = dataset.images, dataset.labels
    else:
        images, labels = make_fake(plan.num_examples, spec.image_shape, spec.num_classes, 0)
        labels = np.asarray(labels, np.int32)
    if plan.mechanism != "dpsgd":
        raise audit.accounting.PrivacyError(
            f"The canary audit runs the DP-SGD step; {cfg.method} makes one Gaussian release "
            "instead (its sensitivity and epsilon are tested against the closed form in "
            "tests/test_dpmepf.py)."
        )
    microbatch_size = cfg.dp.microbatch_size
    if microbatch_size == 0:  # Chosen for the memory of the path the audit runs ('vmap').
        from dpjax.methods.base import Params
        from dpjax.privacy import microbatch as microbatch_lib

        vmap_cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, clipping="vmap"))
        microbatch_size = microbatch_lib.with_auto_size(
            vmap_cfg, method, Params(trainable, frozen), spec.image_shape,
            plan.expected_batch_size, log,
        ).dp.microbatch_size
    log(
        f"[dpjax] auditing {cfg.method} ({source}; {data} data): {audit_config.num_canaries} "
        f"canaries, {audit_config.steps or plan.steps} steps"
    )
    result = audit.run_audit(
        method,
        trainable,
        frozen,
        plan,
        images,
        labels,
        audit_config,
        microbatch_size=microbatch_size,
        clipping_impl=cfg.dp.clipping,
        log=log,
    )
    payload = result.to_dict()
    payload["details"].update(source=source, data=data)
    out = out or workdir
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "audit.json")
    atomic_file.write_json(path, payload, indent=2)
    return result


def _sample_export() -> None:
    """``--mode=sample --export=DIR --out=OUT``: samples of a released model, no workdir."""
    if _MODE.value != "sample":
        raise UsageError("--export applies to --mode=sample only.")
    for name in ("workdir", "config", "fid_batch", "sample_batch"):
        if flags.FLAGS[name].present:
            raise UsageError(f"--{name} does not apply to --export: an export holds the "
                             "model and how its samples were drawn.")
    if not _OUT.value:
        raise UsageError("--out is required with --export.")
    if _NUM.value is not None and _NUM.value < 1:
        raise UsageError(f"--num must be >= 1, got {_NUM.value}.")
    from dpjax import released

    path = released.sample_from_export(os.path.expanduser(_EXPORT.value),
                                       os.path.expanduser(_OUT.value), _NUM.value, _PNG.value)
    print(f"[dpjax] wrote {path}")


def run(argv: list[str]) -> None:
    del argv
    if _EXPORT.value is not None:
        _sample_export()
        return
    if not _WORKDIR.value:
        raise UsageError("--workdir is required.")
    for flag in (_FID_BATCH, _SAMPLE_BATCH):  # Eval settings: not silently ignored.
        if flag.value is not None and _MODE.value != "eval":
            raise UsageError(f"--{flag.name} applies to --mode=eval only.")
    if _NUM.value is not None and _NUM.value < 1:
        raise UsageError(f"--num must be >= 1, got {_NUM.value}.")
    # A '~' the shell left alone ('--workdir=~/x': bash expands only a leading '~', and
    # launch/tpu passes paths quoted) is the user's home, not a folder named '~'.
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    out = None if _OUT.value is None else os.path.expanduser(_OUT.value)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir} is a file, not a directory.")
    if _CONFIG.value is not None and _MODE.value == "export":
        raise UsageError("--config does not apply to --mode=export: it exports the run as "
                         "it was trained (--num and --png choose the samples).")
    if _CONFIG.value is not None and _MODE.value in ("sample", "eval"):
        _check_config_is_the_runs(_CONFIG.value, workdir)
    from dpjax import compile_cache

    cache = compile_cache.cache_dir(_COMPILATION_CACHE.value, workdir)
    if cache is not None and os.path.exists(cache) and not os.path.isdir(cache):
        raise UsageError(f"--compilation_cache {cache} is a file, not a directory.")
    if cache is None and _COMPILATION_CACHE.value == compile_cache.IN_WORKDIR:
        print(f"[dpjax] note: no compilation cache (no key file could be kept in "
              f"{compile_cache.default_cache_dir()}; dpjax/compile_cache.py).", file=sys.stderr)
    compile_cache.enable(cache)
    if _MODE.value == "train":
        from dpjax import train

        if _CONFIG.value is None:
            raise UsageError("--config is required for --mode=train.")
        train.train(_CONFIG.value, workdir)
    elif _MODE.value == "sample":
        from dpjax import run_config, sample
        from dpjax.eval import config as eval_config_lib

        stored = sample.load_run_config(workdir)
        # The sample section of --config if given (its overrides, e.g.
        # --config.sample.num=3, apply), else the run's.
        defaults = (run_config.from_configdict(_CONFIG.value).sample if _CONFIG.value
                    else stored.sample)
        num = defaults.num if _NUM.value is None else _NUM.value
        png = _PNG.value if flags.FLAGS["png"].present else defaults.png
        # The sampler changes of eval.sampling (--config's if given, else the run's), as
        # at --mode=eval.
        section = _CONFIG.value.get("eval") if _CONFIG.value else stored.eval
        sampling = eval_config_lib.eval_config(section).sampling
        path = sample.sample_from_workdir(workdir, num, out, png, seed=defaults.seed,
                                          batch_size=defaults.batch_size, sampling=sampling)
        print(f"[dpjax] wrote {path}")
    elif _MODE.value == "audit":
        from dpjax.privacy import audit

        result = run_audit_mode(
            workdir,
            _CONFIG.value,
            audit.AuditConfig(
                num_canaries=_AUDIT_CANARIES.value,
                steps=_AUDIT_STEPS.value,
                confidence=_AUDIT_CONFIDENCE.value,
                seed=_AUDIT_SEED.value,
                noise_scale=_AUDIT_NOISE_SCALE.value,
                clip_scale=_AUDIT_CLIP_SCALE.value,
            ),
            _AUDIT_DATA.value,
            out,
        )
        print(f"[dpjax] {result.verdict()}")
        if result.flagged:
            sys.exit(3)
    elif _MODE.value == "export":
        from dpjax import export

        if not out:
            raise UsageError("--out is required for --mode=export.")
        # Rebuilt from the flags export uses, not copied from argv: any other flag
        # (--compilation_cache=/home/.../hospital_scans) could name a private location.
        command = (f"python -m dpjax.main --mode=export --workdir={workdir} --out={out}"
                   + (f" --num={_NUM.value}" if _NUM.value is not None else "")
                   + (" --png" if _PNG.value else ""))
        export.export_run(workdir, out, _NUM.value, _PNG.value, command=command)
    elif _MODE.value == "eval":
        from dpjax import sample
        from dpjax.eval import report

        # The eval section of --config if given, else the one stored with the run.
        section = (_CONFIG.value or sample.load_run_config(workdir)).eval
        cfg = report.eval_config(section)
        if _NUM.value is not None:
            cfg = dataclasses.replace(cfg, num_samples=_NUM.value)
        if _FID_BATCH.value is not None:
            cfg = dataclasses.replace(cfg, fid_batch=_FID_BATCH.value)
        if _SAMPLE_BATCH.value is not None:
            cfg = dataclasses.replace(cfg, sample_batch=_SAMPLE_BATCH.value)
        report.evaluate_workdir(workdir, cfg)
        print(f"[dpjax] wrote {os.path.join(workdir, 'eval.json')} and eval_report.md")


def _check_config_is_the_runs(config, workdir: str) -> None:
    """--config at --mode=sample or eval gives the sample and eval sections; the run's
    method and data must be its own, else it is another experiment's config (whose
    settings would be applied to this run without a word)."""
    from dpjax import sample

    if not os.path.isfile(os.path.join(workdir, "config.json")):
        return  # sample.load_run_config says what is missing.
    stored = sample.load_run_config(workdir)
    for key, given, run_value in (("method", config.method, stored.method),
                                  ("data.source", config.data.source, stored.data.source),
                                  ("data.name", config.data.name, stored.data.name)):
        if given != run_value:
            raise UsageError(
                f"--config does not match the run in {workdir}: its {key} is {given!r}, the "
                f"run's is {run_value!r}. Give the run's own experiment (with the same data "
                "overrides), or leave --config out to use the run's sample and eval settings.")


def _debug_requested(argv: list[str]) -> bool:
    return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, loading the experiment file too; a missing file, a mistyped
    key or experiment argument, or a value of the wrong type ends in one line (exit 2)."""
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            # ml_collections defers a failed load to the first use: make it now.
            _CONFIG.value.keys()
        return rest
    except Exception as e:  # noqa: BLE001 - the experiment file's own errors too.
        # Everything here comes from the flags or the experiment file (a syntax error, an
        # exception in get_config): the user's to fix, in one line; --debug re-raises.
        if _debug_requested(argv):
            raise
        print(f"dpjax error: {flag_errors.message(e, argv)}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    from dpjax import log_setup

    log_setup.quiet()
    _drop_closed_loop_noise()
    from dpjax.stop_signals import StoppedBySignal

    try:
        run(argv)
    except StoppedBySignal as e:
        # Exit 128 + the signal's number, as if it had killed us: a scheduler requeues.
        print(f"dpjax: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if _DEBUG.value:
            raise
        # Outside the train loop's steps, or a second Ctrl-C.
        print("dpjax: interrupted. Checkpoints already saved are kept; a training run "
              "resumes from its last one when run again.", file=sys.stderr)
        sys.exit(130)
    except user_errors() as e:
        if _DEBUG.value:
            raise
        print(f"dpjax error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        from dpjax.checkpoint import is_storage_error

        if _DEBUG.value or not is_storage_error(e):
            raise
        print(f"dpjax error: {e.filename or 'a file'}: {e.strerror}. Checkpoints saved "
              "before are intact: free space or fix the permissions, then run the same "
              "command again.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
