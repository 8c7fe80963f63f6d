"""Export of a DP run: only what may be published, and only from a private run.

``export_run(workdir, out)`` (``--mode=export``) writes to ``out``:

* ``ema_params.npz``: the EMA weights of the trainable parameters of the latest
  checkpoint (the DP model; keys are the parameter paths),
* ``frozen_params.npz``: only when the method has frozen parameters (public pieces it
  closed over, e.g. a public autoencoder; never trained on the private data) that it
  lets an export publish: a method may narrow them with ``exported_frozen(frozen)``
  (DP-SAD publishes none: its teacher is not the released model),
* ``model_config.json``: method name, method settings and the public data spec, enough
  to rebuild the model,
* ``samples.npz`` and ``samples_grid.png`` (and ``png/`` with ``png=True``): samples of
  the EMA model (``dpjax.sample``),
* ``privacy_report.json`` and ``privacy_report.md`` (``dpjax.privacy.report``),
* ``model_card.md``: method, data spec, privacy guarantee, intended use, limitations.

Guarantees:
* Refusal: a run whose plan is not private (``dp.enabled=False``: public pre-training,
  a teacher, anything trained on data without DP), whose epsilon is not finite (no
  noise, or a release without noise), or whose own audit (``audit.json`` without an
  injected fault) flagged its DP step is refused with ``NotPrivateError`` and nothing
  is written. The plan is read from both ``dp_plan.json`` and the checkpoint, which
  must agree.
* Nothing is copied from the workdir: every file is written anew from the EMA weights,
  the plan and the public data spec. The training metrics (``metrics.jsonl``,
  TensorBoard: losses on private rows, a non-private release), the optimizer state,
  the non-EMA weights, the config (it names private data paths), the data digest and
  the private data are never read into the output; the local workdirs that ``*_from``
  settings name are redacted from the method settings and the report
  (``redact_source_paths``). An ``audit.json`` is quoted only if it was made under this
  run's plan (else the export is refused).
* Everything written is post-processing of the DP model (EMA weights) plus public facts
  (data spec, plan), so it costs no privacy beyond the report's epsilon.
* The output appears atomically (written to a temporary directory, then renamed), and
  an existing non-empty ``out`` is never overwritten.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from dpjax import checkpoint as ckpt_lib
from dpjax import sample
from dpjax.methods.base import DataSpec, Params, count_params
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import report as report_lib
from dpjax.privacy.accounting import PrivacyError
from dpjax.randomness import Streams
from dpjax.state import TrainState

#: Files an export may contain ('png' is a folder, only with png=True).
ALLOWED = (
    "ema_params.npz",
    "frozen_params.npz",
    "model_config.json",
    "samples.npz",
    "samples_grid.png",
    "png",
    "privacy_report.json",
    "privacy_report.md",
    "model_card.md",
)


class ExportError(ValueError):
    """The export cannot be written (e.g. the output directory is not empty)."""


class NotPrivateError(PrivacyError):
    """The run has no finite DP guarantee, so nothing of it may be published."""


@dataclasses.dataclass
class LoadedRun:
    """A run as read back from its workdir, without its private data.

    Attributes:
      workdir: the run's directory.
      config: the typed run config (``config.json``).
      plan: the DP plan (``dp_plan.json``, checked against the checkpoint's).
      meta: the latest checkpoint's metadata (plan, steps done, releases).
      method: the method object.
      spec: the public data spec.
      state: the restored TrainState (callers decide what leaves the process).
      step: the checkpoint's step (steps done).
    """

    workdir: str
    config: Any
    plan: plan_lib.DPPlan
    meta: dict[str, Any]
    method: Any
    spec: DataSpec
    state: TrainState
    step: int


def _require_run_files(workdir: str) -> None:
    if not os.path.isdir(workdir):
        raise ckpt_lib.CheckpointError(f"Workdir {workdir} does not exist.")
    for name in ("config.json", "dp_plan.json", sample.SPEC_FILE):
        if not os.path.isfile(os.path.join(workdir, name)):
            raise ckpt_lib.CheckpointError(
                f"{workdir} holds no complete dpjax run: {name} is missing."
            )


def read_plan(workdir: str) -> plan_lib.DPPlan:
    """The workdir's ``dp_plan.json``, with a clear error if missing or corrupt."""
    _require_run_files(workdir)
    path = os.path.join(workdir, "dp_plan.json")
    try:
        plan, _ = plan_lib.load_plan(path)
    except (ValueError, KeyError, TypeError) as e:
        raise ckpt_lib.CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}).") from e
    return plan


def load_run(workdir: str) -> LoadedRun:
    """Reads a run's config, plan and latest checkpoint (never its private data).

    Raises:
      CheckpointError: if the workdir, a run file or the checkpoint is missing or corrupt,
        or the checkpoint's plan is not the workdir's.
    """
    workdir = os.path.abspath(workdir)
    plan = read_plan(workdir)
    method, state, spec, cfg = sample.restore_state(workdir)
    step = int(state.step)
    meta = read_checkpoint_meta(workdir, step, plan)
    return LoadedRun(workdir, cfg, plan, meta, method, spec, state, step)


def read_checkpoint_meta(workdir: str, step: int, plan: plan_lib.DPPlan) -> dict[str, Any]:
    """The metadata (plan, releases) of the checkpoint at ``step`` of ``workdir``.

    Raises:
      CheckpointError: the checkpoint is missing or corrupt, or was written under another
        plan than ``plan`` (the workdir's ``dp_plan.json``).
    """
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        meta = checkpointer.restore_meta(step)
    finally:
        checkpointer.close()
    stored = plan_lib.DPPlan.from_dict(meta.get("plan", {})) if meta.get("plan") else None
    if stored is None or not stored.same_guarantee_as(plan) or stored.steps != plan.steps:
        raise ckpt_lib.CheckpointError(
            f"The checkpoint at step {step} in {workdir} was written under another plan "
            f"({meta.get('plan')}) than dp_plan.json ({plan.to_dict()})."
        )
    return meta


def check_private(plan: plan_lib.DPPlan, steps_done: int, releases: list[dict[str, Any]]) -> dict:
    """Raises NotPrivateError unless the run has a finite (epsilon, delta) guarantee.

    Returns the epsilon spent under the plan's accountant.
    """
    if not plan.enabled:
        raise NotPrivateError(
            "This run is not differentially private (dp.enabled=False: public pre-training, "
            "or a model trained on data without DP); refusing to export it. Only a DP run's "
            "EMA weights and samples may be published."
        )
    eps = report_lib.epsilon_spent(plan, steps_done, releases, (plan.accountant,))
    value = eps[plan.accountant]
    if not math.isfinite(value):
        raise NotPrivateError(
            f"This run's epsilon is {value} ({plan.accountant}, delta={plan.delta:g}, sigma="
            f"{plan.noise_multiplier}, {len(releases)} other releases); refusing to export a "
            "model without a finite privacy guarantee."
        )
    return eps


def exported_frozen(method: Any, frozen: Any) -> Any:
    """The frozen parameters an export publishes: all of them, unless the method narrows
    them with ``exported_frozen(frozen)`` (e.g. DP-SAD never publishes its teacher)."""
    return method.exported_frozen(frozen)


def _path_name(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def save_params(path: str, tree: Any) -> list[str]:
    """Writes a parameter pytree as an npz (keys: '/'-joined paths). Returns the keys."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    arrays = {_path_name(p): np.asarray(x) for p, x in flat}
    if len(arrays) != len(flat):
        raise ExportError(f"Parameter paths collide when flattened: {sorted(arrays)}.")
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return sorted(arrays)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _audit_line(workdir: str) -> list[str]:
    """The workdir's audit (``--mode=audit``), if one on public stand-in data exists."""
    path = os.path.join(workdir, "audit.json")
    try:
        with open(path) as f:
            a = json.load(f)
        d = a["details"]
        if d.get("data") != "fake" or d.get("faults"):
            return []  # An audit on private rows is itself not DP: not published.
        return [
            f"- Empirical audit (one-run gradient canaries, {d['num_canaries']} canaries, "
            f"{d['steps']} steps): epsilon lower bound {a['epsilon_lower_bound']:.3f} at "
            f"{d['confidence']:.0%} confidence, below the accountant's "
            f"{_fmt(a['accountant_epsilon'])} for those {d['steps']} steps; it checks the DP "
            "step's implementation"
            + (f" (clipping '{d['clipping_impl']}')" if "clipping_impl" in d else "")
            + ", not the tightness of epsilon.",
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []


# The plan fields an audit must share with the run it is quoted for.
_AUDIT_PLAN_FIELDS = ("noise_multiplier", "clip_norm", "sampling_rate", "num_examples", "delta")


def audit_matches_plan(details: dict[str, Any], plan: Any) -> bool:
    """Whether an audit's recorded plan (sigma, C, q, N, delta) is ``plan``'s."""
    return all(
        k in details and math.isclose(float(details[k]), float(getattr(plan, k)), rel_tol=1e-9)
        for k in _AUDIT_PLAN_FIELDS
    )


def check_audit(workdir: str, plan: Any = None) -> None:
    """Refuses a run whose own audit (no fault injected) flagged its DP step, or whose
    audit.json was made under another plan (then it says nothing about this run)."""
    path = os.path.join(workdir, "audit.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            a = json.load(f)
        flagged, faults = bool(a["flagged"]), a["details"].get("faults")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is unreadable ({e}); re-run --mode=audit or remove it.") from e
    if plan is not None and not audit_matches_plan(a["details"], plan):
        raise ExportError(
            f"{path} was made under another plan than this run's (sigma, C, q, N or delta "
            "differ: e.g. --mode=audit with another --config); re-run --mode=audit on this "
            "run or remove the file."
        )
    if flagged and not faults:
        raise NotPrivateError(
            f"{path} flags this run's DP step: its empirical epsilon lower bound "
            f"{a.get('epsilon_lower_bound')} exceeds the accountant's "
            f"{a.get('accountant_epsilon')}. Refusing to export until that is explained."
        )


def _mechanism_line(plan: Any, step: int, report: dict[str, Any]) -> str:
    """How the private data was accessed: DP-SGD steps, or one release (DP-MEPF)."""
    n = len(report["releases"])
    if plan.mechanism == "release":
        return (
            "- Mechanism: one Gaussian release of the sum over the dataset of per-example "
            f"vectors of norm C = {plan.clip_norm}, noise multiplier sigma = "
            f"{plan.noise_multiplier:.6g}; the {step} training steps after it read only the "
            f"release (post-processing); {n} release records in all (composed in the epsilon)."
        )
    return (
        f"- Mechanism: DP-SGD with Poisson sampling q = {plan.sampling_rate:.6g} "
        f"(expected batch {plan.expected_batch_size:.1f}), per-example clipping to "
        f"C = {plan.clip_norm}, Gaussian noise multiplier sigma = "
        f"{plan.noise_multiplier:.6g}, {step} steps; {n} other private releases (composed "
        "in the epsilon)."
    )


def redact_source_paths(obj: Any, method_args: Any) -> Any:
    """``obj`` (JSON-like) with the local workdirs that the method's ``*_from`` settings
    name replaced by a placeholder: where a run's sources lie on the trainer's disk is
    not part of a release (the sources' privacy is in the report, not their paths)."""
    def label(key: str) -> str:
        return f"<{key}: a local workdir, not part of this release>"

    names = {}
    if dataclasses.is_dataclass(method_args):
        for field in dataclasses.fields(method_args):
            value = getattr(method_args, field.name)
            if field.name.endswith("_from") and isinstance(value, str) and value:
                for form in (value, os.path.abspath(value), os.path.normpath(value)):
                    # In free text only forms with a separator: a bare name ('teacher')
                    # would also match ordinary words.
                    if os.sep in form:
                        names.setdefault(form, label(field.name))
    ordered = sorted(names, key=len, reverse=True)  # '/a/b' before its prefix '/a'.

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            for path in ordered:
                x = x.replace(path, names[path])
            return x
        if isinstance(x, dict):
            return {k: label(k) if str(k).endswith("_from") and isinstance(v, str) and v
                    else walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return walk(obj)


def _stopped_line(plan: Any, step: int) -> list[str]:
    """A run exported before its planned end says so (its epsilon is that of ``step``)."""
    if step >= plan.steps:
        return []
    return [
        f"- The run was exported at step {step}, before its planned {plan.steps}: the "
        "guarantee below is for the steps done. An export of the same run after more "
        "steps has a larger epsilon; both together are covered by the larger one."
    ]


def model_card(
    run: LoadedRun, report: dict[str, Any], files: list[str], command: str, num_samples: int
) -> str:
    """The markdown model card of an export."""
    plan, spec, cfg = run.plan, run.spec, run.config
    eps = report["epsilon"]
    classes = f"{spec.num_classes} classes" if spec.num_classes else "unconditional"
    frozen = count_params(exported_frozen(run.method, run.state.frozen))
    rel = plan.neighbouring.replace("_", " ")
    lines = [
        f"# Model card: {cfg.method} image generator trained with differential privacy",
        "",
        "## Model",
        f"- Method: `{cfg.method}` (dpjax), EMA weights (rate {cfg.train.ema_rate}) of "
        + (f"step {run.step} of {plan.steps} planned DP-SGD steps."
           if plan.mechanism != "release" else
           f"step {run.step} of {plan.steps} planned training steps on the one DP release "
           "(post-processing)."),
        *_stopped_line(plan, run.step),
        f"- Parameters: {count_params(run.state.ema):,} trained with DP"
        + (f", {frozen:,} frozen public parameters" if frozen else "")
        + ".",
        "- Files: " + ", ".join(f"`{f}`" for f in files) + ".",
        f"- `samples.npz`: {num_samples} class-balanced samples of the EMA model (uint8 "
        "NHWC images, int32 labels).",
        "",
        "## Data",
        f"- Images {spec.image_shape[0]}x{spec.image_shape[1]}x{spec.image_shape[2]}, "
        f"{classes}; N = {plan.num_examples} private training examples (N is treated as "
        "public, as it sets the sampling rate).",
        "- The private data, its location and any statistic of it other than through the "
        "DP mechanism are not part of this release.",
        "",
        "## Privacy guarantee",
        f"- ({_fmt(eps.get(plan.accountant))}, {plan.delta:g})-differential privacy "
        f"({plan.accountant.upper()} accountant; PLD: {_fmt(eps.get('pld'))}, RDP: "
        f"{_fmt(eps.get('rdp'))}) under the {rel} relation: one example ("
        + ("an image with its label" if spec.num_classes else "an image")
        + ") of the training set.",
        _mechanism_line(plan, run.step, report),
        "- Everything in this directory is post-processing of the DP model, so it is "
        "covered by the same guarantee. See `privacy_report.md`.",
        *_audit_line(run.workdir),
        "",
        "## Intended use",
        "- Generating synthetic images that share coarse statistics with the private "
        "training data, for research, prototyping and training downstream models, where "
        "the stated example-level guarantee is the accepted protection.",
        "",
        "## Limitations",
        "- The guarantee is per example: a person contributing many images is protected "
        "only at a correspondingly weaker level (group privacy).",
        "- Hyperparameter, step-count and checkpoint selection are outside epsilon: if "
        "they were tuned on the private data, that selection is an unaccounted release.",
        "- The guarantee assumes ideal Gaussian noise; JAX's PRNG is not cryptographically "
        "secure and floating-point effects are not accounted for.",
        "- Samples can still resemble training images in coarse ways allowed by epsilon; "
        "sample quality and class fidelity are limited, especially at small epsilon. Do "
        "not use the samples for decisions about individuals.",
        "- Training losses computed on private rows are deliberately excluded (they are "
        "not differentially private), as are the optimizer state and the raw weights.",
        "",
        "## Command",
        f"- Exported with: `{command}`",
        "- Load: `np.load('ema_params.npz')` gives the trainable parameters by path; "
        "`model_config.json` gives the method settings to rebuild the model in dpjax (the "
        "local workdirs of `*_from` settings are redacted).",
        f"- Exported on {datetime.date.today().isoformat()}.",
    ]
    return "\n".join(lines) + "\n"


def export_run(
    workdir: str,
    out: str,
    num_samples: int | None = None,
    png: bool = False,
    seed: int = 0,
    command: str = "",
    log=print,
) -> list[str]:
    """``--mode=export``: writes the publishable part of ``workdir`` to ``out``.

    Returns the names written. Raises NotPrivateError (nothing written) for a run without
    a finite DP guarantee, CheckpointError for a missing or corrupt run, ExportError if
    ``out`` exists and is not empty.
    """
    workdir, out = os.path.abspath(workdir), os.path.abspath(out)
    # The plan first: a non-private run is refused before its weights are even loaded.
    plan = read_plan(workdir)
    check_private(plan, plan.steps, [])
    run = load_run(workdir)
    releases = list(run.meta.get("releases", []))
    check_private(run.plan, run.step, releases)
    check_audit(workdir, run.plan)
    if run.step < run.plan.steps:
        log(f"[dpjax] note: exporting step {run.step} of {run.plan.steps} planned; the model "
            "card says so, and its epsilon is that of the steps done.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out} exists and is not empty; refusing to overwrite it.")
    cfg = run.config
    num = int(num_samples if num_samples is not None else cfg.sample.num)
    if num < 1:
        raise ExportError(f"--num must be >= 1, got {num}.")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export.")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is not meant for a release.
    try:
        redact = functools.partial(redact_source_paths, method_args=cfg.method_args)
        files = ["ema_params.npz"]
        save_params(os.path.join(tmp, "ema_params.npz"), run.state.ema)
        public_frozen = exported_frozen(run.method, run.state.frozen)
        if jax.tree_util.tree_leaves(public_frozen):
            save_params(os.path.join(tmp, "frozen_params.npz"), public_frozen)
            files.append("frozen_params.npz")
        model = {
            "method": cfg.method,
            "method_args": redact(dataclasses.asdict(cfg.method_args)),
            "data_spec": {
                "image_shape": list(run.spec.image_shape),
                "num_classes": run.spec.num_classes,
            },
            "step": run.step,
            "ema_rate": cfg.train.ema_rate,
        }
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            json.dump(_jsonable(model), f, indent=2, sort_keys=True)
        files.append("model_config.json")
        params = Params(run.state.ema, run.state.frozen)
        key = jax.random.fold_in(Streams.from_seed(cfg.seed).sample, 2_000_000 + seed)
        images, labels = sample.generate(
            run.method, params, run.spec, key, num, cfg.sample.batch_size
        )
        sample.write_samples(images, labels, tmp, png)
        n_grid = min(num, 10 * run.spec.num_classes if run.spec.num_classes else 100)
        sample.grid_image(images[:n_grid], labels[:n_grid], run.spec.num_classes).save(
            os.path.join(tmp, "samples_grid.png")
        )
        files += ["samples.npz", "samples_grid.png"] + (["png"] if png else [])
        report = redact(report_lib.privacy_report(
            run.plan, run.step, cfg.method, releases, run.method.privacy_notes()
        ))
        with open(os.path.join(tmp, "privacy_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, "privacy_report.md"), "w") as f:
            f.write(report_lib.report_markdown(report))
        files += ["privacy_report.json", "privacy_report.md", "model_card.md"]
        card = model_card(run, report, files, command or f"export of {workdir}", num)
        with open(os.path.join(tmp, "model_card.md"), "w") as f:
            f.write(card)
        unexpected = sorted(set(os.listdir(tmp)) - set(ALLOWED))
        if unexpected:  # A guard against a future change writing something else.
            raise ExportError(f"Export would contain unexpected files {unexpected}.")
        if os.path.isdir(out):
            os.rmdir(out)  # Empty (checked above).
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[dpjax] exported step {run.step} of {workdir} to {out}: {', '.join(sorted(files))}")
    return sorted(os.listdir(out))
