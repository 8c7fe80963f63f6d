"""The model card of an export, and the redaction of local paths from what is published.

``export.export_run`` writes the card; what it may say is what the export may publish:
public facts (method, data spec, the DP plan, and N unless a one-release plan protects
it), the privacy report's epsilon, an audit made on public stand-in data, and the export
command. ``redact_source_paths`` removes the trainer's local workdirs (``*_from``
settings) from published JSON and text.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import TYPE_CHECKING, Any

from dpjax import sample
from dpjax.methods.base import count_params
from dpjax.privacy import report as report_lib

if TYPE_CHECKING:
    from dpjax.export import LoadedRun


_fmt = report_lib.format_epsilon  # Epsilons rounded UP to 4 significant digits.


def audit_summary(workdir: str) -> dict[str, Any]:
    """What an export may say of the workdir's audit (``--mode=audit``).

    ``status`` is 'none' (no readable audit.json, or one made on the private rows:
    that it exists and passed, ``export.check_audit`` refusing a flagged one, is itself
    a bit of the private data outside epsilon, so an export does not say so),
    'fault_injection' (an audit with a fault injected: a test of the auditor, not of
    this run), or 'passed' (on public stand-in data, not flagged), with the bound, the
    accountant's epsilon and the audit's settings.
    """
    path = os.path.join(workdir, "audit.json")
    try:
        with open(path) as f:
            a = json.load(f)
        d = a["details"]
        if d.get("faults"):
            return {"status": "fault_injection"}
        if d.get("data") != "fake":
            return {"status": "none"}  # Not even that it passed (see above).
        return {
            "status": "passed",
            "epsilon_lower_bound": float(a["epsilon_lower_bound"]),
            "accountant_epsilon": float(a["accountant_epsilon"]),
            "confidence": float(d["confidence"]),
            "num_canaries": int(d["num_canaries"]),
            "steps": int(d["steps"]),
            **({"clipping_impl": d["clipping_impl"]} if "clipping_impl" in d else {}),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {"status": "none"}


def _audit_line(workdir: str) -> list[str]:
    """The workdir's audit (``--mode=audit``), if one on public stand-in data exists."""
    a = audit_summary(workdir)
    if a["status"] != "passed":
        return []  # An audit on private rows is itself not DP: not published.
    return [
        f"- Empirical audit (one-run gradient canaries, {a['num_canaries']} canaries, "
        f"{a['steps']} steps): epsilon lower bound {a['epsilon_lower_bound']:.3f} at "
        f"{a['confidence']:.0%} confidence, below the accountant's "
        f"{_fmt(a['accountant_epsilon'])} for those {a['steps']} steps; it checks the DP "
        "step's implementation"
        + (f" (clipping '{a['clipping_impl']}')" if "clipping_impl" in a else "")
        + ", not the tightness of epsilon.",
    ]


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


def path_forms(path: str) -> set[str]:
    """The ways a text may spell ``path``: as given, absolute, normalized and relative to
    the current directory (not '', '.' or '..', which would match everywhere)."""
    full = os.path.abspath(path)
    forms = {path, full, os.path.normpath(path), os.path.relpath(full)}
    return forms - {"", os.curdir, os.pardir}


def redact_command(command: str, workdir: str, out: str) -> str:
    """``command`` with the run's workdir and the export folder replaced by placeholders,
    in every form a command line may hold them (as typed, absolute, normalized, relative
    to the current directory) and only as whole paths (``/data/run1`` does not touch
    ``/data/run1x``): where they lie on the trainer's disk is not part of a release, as
    for ``redact_source_paths``."""
    names = {}
    for path, label in ((out, "<this export>"), (workdir, "<the run's workdir>")):
        for form in path_forms(path):
            names.setdefault(form, label)
    for path in sorted(names, key=len, reverse=True):  # '/a/b' before its prefix '/a'.
        # A whole path: after the start, a space, '=' or a quote; before the end, a
        # separator, a space or a quote.
        pattern = r"(?<![^\s='\"])" + re.escape(path) + r"(?=$|[\s/'\"])"
        command = re.sub(pattern, lambda _, label=names[path]: label, command)
    return command


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
                for form in path_forms(value):
                    # In free text only forms with a separator: a bare name ('teacher')
                    # would also match ordinary words. Matched as substrings, unlike the
                    # command line's whole paths: notes end a path with ')' or ',', and a
                    # garbled neighbour is better than a path left in a release.
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


def _dataset_size_line(plan: Any, report: dict[str, Any]) -> str:
    """What the card says of N. A DP-SGD plan publishes it (it sets q). A one-release
    plan (DP-MEPF) noises its counts, but a composed DP-SGD stage (a DP feature network)
    lists its own q = batch / its N in the report: on the same data, that is this N
    (taint review, 2026-12-07: the card claimed N was protected beside that record)."""
    if plan.mechanism != "release":
        if plan.neighbouring != "add_or_remove_one":
            return (f"N = {plan.num_examples} private training examples (N is treated as "
                    "public, as it sets the sampling rate).")
        return (f"N = {plan.num_examples} private training examples (N is treated as "
                "public, as it sets the sampling rate; so this add-or-remove-one "
                "guarantee protects an example's membership from whoever does not know N, "
                "while someone who knows N and every other example learns it from N: "
                "against them only a replace-one guarantee holds).")
    return {
        "relation": "N is not stated, but the guarantee does not cover it: neighbouring "
                    f"datasets under {plan.neighbouring.replace('_', '-')} have the same size.",
        "composed": "N is not stated, but it is not protected either: the composed DP-SGD "
                    "stage in the privacy report lists its sampling rate, batch / N of the "
                    "data it trained on (these data, if it trained on them).",
        "protected": "N is not stated: the one release noises its counts, so it protects N "
                     "too.",
    }[report_lib.one_release_n_coverage(plan.neighbouring, report.get("releases", []))]


def model_card(
    run: LoadedRun,
    report: dict[str, Any],
    files: list[str],
    command: str,
    num_samples: int,
    num_frozen: int,
) -> str:
    """The markdown model card of an export of ``run``.

    ``report`` is the exported (redacted) privacy report, ``files`` the files written,
    ``num_frozen`` the number of frozen public parameters the export publishes. The card
    states only public facts and what the report states: the method, the data spec, N,
    the plan and epsilon, an audit on public stand-in data, and the command."""
    plan, spec, cfg = run.plan, run.spec, run.config
    eps = report["epsilon"]
    classes = f"{spec.num_classes} classes" if spec.num_classes else "unconditional"
    frozen = num_frozen
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
        + (f", {frozen:,} frozen (not trained by this run: "
           + ("public pieces or earlier DP stages composed into the guarantee below"
              if any(r.get("stage") == "prior" for r in report.get("releases", []))
              else "public pieces")
           + (", and the DP release the model was trained on" if plan.mechanism == "release"
              else "") + ")" if frozen else "")
        + ".",
        "- Files: " + ", ".join(f"`{f}`" for f in files) + ".",
        (f"- `samples.npz`: {num_samples} class-balanced samples of the EMA model (uint8 "
         "NHWC images, int32 labels)."
         if sample.released_classes(run.method, spec) or not spec.num_classes else
         f"- `samples.npz`: {num_samples} samples of the EMA model (uint8 NHWC images); "
         f"`{cfg.method}` does not draw samples by class, so their labels are all 0."),
        "",
        "## Data",
        f"- Images {spec.image_shape[0]}x{spec.image_shape[1]}x{spec.image_shape[2]}, "
        f"{classes}; "
        + _dataset_size_line(plan, report),
        f"- Named in the run config as source `{cfg.data.source}`, dataset "
        f"`{cfg.data.name}`, split `{cfg.data.split}` (labels the trainer chose; for "
        "'folder' and 'npz' data the name is only a label).",
        "- The private data, its location and any statistic of it other than through the "
        "DP mechanism are not part of this release.",
        "",
        "## Privacy guarantee",
        f"- ({_fmt(eps.get(plan.accountant))}, {plan.delta!r})-differential privacy "
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
        "- Hyperparameter, step-count, checkpoint and sampler selection are outside "
        "epsilon: if they were tuned on the private data (e.g. by FID against its "
        "statistics), that selection is an unaccounted release.",
        "- The "
        + ("noise" if plan.mechanism == "release"
           else "noise, the batches and the per-example loss draws")
        + " came from a secret that the export does not contain; the "
        "guarantee assumes ideal Gaussian noise: JAX's PRNG is not a vetted "
        "cryptographically secure generator and floating-point effects are not accounted "
        "for.",
        "- Samples can still resemble training images in coarse ways allowed by epsilon; "
        "sample quality and class fidelity are limited, especially at small epsilon. Do "
        "not use the samples for decisions about individuals.",
        "- Training losses computed on private rows are deliberately excluded (they are "
        "not differentially private), as are the optimizer state and the raw weights.",
        "- Evaluations of this model against the real data (dpjax's `--mode=eval`: FID "
        "against the private split, downstream accuracy on the real test set, nearest "
        "training images) are not covered by the guarantee: they are for the researcher "
        "and are not part of this release.",
        "",
        "## Command",
        f"- Exported with: `{command}`",
        "- Load: `python -m dpjax.main --mode=sample --export=DIR --out=OUT` samples this "
        "model without the training workdir (`dpjax.released.load_export` in Python); "
        "`np.load('ema_params.npz')` gives the trainable parameters by path, and "
        "`model_config.json` the method settings (the local workdirs of `*_from` settings "
        "are redacted) and what rebuilding needs of them.",
        "- Check: `python -m dpjax.export_manifest DIR` compares every file with the "
        "SHA-256 that `manifest.json` lists (it also records how `samples.npz` was drawn).",
        f"- Exported on {datetime.date.today().isoformat()}.",
    ]
    return "\n".join(lines) + "\n"
