"""Export of a DP run: only what may be published, and only from a private run.

``export_run(workdir, out)`` (``--mode=export``) writes to ``out``:

* ``ema_params.npz``: the EMA weights of the trainable parameters of the latest
  checkpoint (the DP model; keys are the parameter paths),
* ``frozen_params.npz``: only when the method has frozen parameters (public pieces it
  closed over, e.g. a public autoencoder, never trained on the private data; or what the
  guarantee covers, e.g. DP-MEPF's noised release and its DP feature network) that it
  lets an export publish: a method may narrow them with ``exported_frozen(frozen)``
  (DP-SAD publishes none: its teacher is not the released model),
* ``model_config.json``: method name, method settings, the public data spec and the
  method's ``release_record`` (e.g. the architecture of a redacted source's
  autoencoder), enough to rebuild the model without the workdir (``dpjax.released``),
* ``samples.npz`` and ``samples_grid.png`` (and ``png/`` with ``png=True``): samples of
  the EMA model (``dpjax.sample``),
* ``privacy_report.json`` and ``privacy_report.md`` (``dpjax.privacy.report``),
* ``model_card.md``: method, data spec, privacy guarantee, intended use, limitations,
* ``manifest.json`` (``dpjax.export_manifest``), written last: the SHA-256 and size of
  every other file, the data's public names, the guarantee, how the samples were drawn
  (seeds, batch size, key derivation) and the run's audit verdict.

Guarantees:
* Refusal: a run whose plan is not private (``dp.enabled=False``: public pre-training,
  a teacher, anything trained on data without DP), whose epsilon is not finite (no
  noise, or a release without noise), or whose own audit (``audit.json`` without an
  injected fault) flagged its DP step is refused with ``NotPrivateError`` and nothing
  is written; so is a run whose noise and batches derive from ``config.seed``
  (``dp.secret_noise=False``, or a checkpoint from before the secret): whoever knows
  the seed could recompute the noise (``privacy.noise_secret``). The plan is read
  from both ``dp_plan.json`` and the checkpoint, which must agree.
* Nothing is copied from the workdir: every file is written anew from the EMA weights,
  the plan and the public data spec. The training metrics (``metrics.jsonl``,
  TensorBoard: losses on private rows, a non-private release), the optimizer state,
  the non-EMA weights, the config (it names private data paths), the data digest, the
  noise secret and the private data are never read into the output; the local
  workdirs that ``*_from`` settings name are redacted from the method settings and the report
  (``model_card.redact_source_paths``). An ``audit.json`` is quoted only if it was made
  under this run's plan (else the export is refused).
* Everything written is post-processing of the DP model (EMA weights) plus public facts
  (data spec, plan), so it costs no privacy beyond the report's epsilon.
* The output appears atomically (written to a temporary directory, then renamed), and
  an existing non-empty ``out`` is never overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from dpjax import atomic_file, export_manifest, run_config, sample
from dpjax import checkpoint as ckpt_lib
from dpjax import model_card as card_lib
from dpjax.data import npz
from dpjax.data.dataset import DataError
from dpjax.methods.base import DataSpec, Params, count_params
from dpjax.privacy import noise_secret
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import report as report_lib
from dpjax.privacy.accounting import PrivacyError
from dpjax.randomness import Streams
from dpjax.state import TrainState
from dpjax.typed_config import ConfigError

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
    export_manifest.MANIFEST,
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
    # The state and its metadata in one read: training may rotate checkpoints meanwhile.
    method, state, spec, cfg, meta = sample.restore_state_and_meta(workdir)
    step = int(state.step)
    check_checkpoint_plan(meta, workdir, step, plan)
    return LoadedRun(workdir, cfg, plan, meta, method, spec, state, step)


def check_checkpoint_plan(
    meta: dict[str, Any], workdir: str, step: int, plan: plan_lib.DPPlan
) -> None:
    """Raises CheckpointError if checkpoint ``step``'s metadata has another plan than
    ``plan`` (the workdir's dp_plan.json)."""
    if not plan_lib.recorded_plan_matches(meta.get("plan"), plan):
        raise ckpt_lib.CheckpointError(
            f"The checkpoint at step {step} in {workdir} was written under another plan "
            f"({meta.get('plan')}) than dp_plan.json ({plan.to_dict()})."
        )


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


def path_name(path: tuple) -> str:
    """The npz key of a parameter path: its keys, names or indices joined by '/'."""
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
    arrays = {path_name(p): np.asarray(x) for p, x in flat}
    if len(arrays) != len(flat):
        raise ExportError(f"Parameter paths collide when flattened: {sorted(arrays)}.")
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return sorted(arrays)


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


def check_secret_noise(meta: dict[str, Any], plan: plan_lib.DPPlan) -> None:
    """Raises NotPrivateError unless the checkpoint's noise and batches came from the
    run's secret (``privacy.noise_secret``): derived from config.seed, anyone who knows
    or guesses the seed recomputes them, and the guarantee is void. Likewise where the
    per-example loss draws came from config.seed (a run from before they came from the
    secret: ``noise_secret.public_loss_draws_void``)."""
    public = noise_secret.public_randomness(meta, plan.mechanism)
    if public == "noise and batches":
        raise NotPrivateError(
            "This run's noise and batches derive from config.seed ("
            + ("dp.secret_noise=False" if noise_secret.NOISE_SOURCE_KEY in meta else
               "a checkpoint from before dpjax drew them from a secret")
            + "): anyone who knows or guesses the seed can recompute the noise and remove "
            "it, so the run has no guarantee to publish; refusing to export it. Train it "
            "again with dp.secret_noise=True (the default).")
    if public is not None:
        raise NotPrivateError(
            "This run's per-example loss draws derive from config.seed, keyed by dataset "
            "index (a checkpoint from before dpjax drew them from the secret). Removing an "
            "example, or replacing it by one that sorts elsewhere, shifts the index, and "
            "so the known draws, of the examples after it, which moves the clipped sum by "
            "more than its sensitivity: the run has no guarantee to publish; refusing to "
            "export it. Train it again in a new workdir.")


def manifest_facts(run: LoadedRun, report: dict[str, Any], num: int, seed: int,
                   class_balanced: bool) -> dict[str, Any]:
    """What ``manifest.json`` states beside the file digests: public facts only (the
    config's names of the data, never its path; the redacted report's guarantee; the
    sample seeds, which derive nothing private: the noise, batches and loss draws came
    from the run's secret, ``check_secret_noise``)."""
    cfg, plan = run.config, run.plan
    return {
        "method": cfg.method,
        "step": run.step,
        "planned_steps": plan.steps,
        "data": {
            "source": cfg.data.source,
            "name": cfg.data.name,
            # For 'folder' and 'npz' data the name is only the trainer's label.
            "name_is_a_label": cfg.data.source in ("folder", "npz"),
            "split": cfg.data.split,
            "image_shape": list(run.spec.image_shape),
            "num_classes": run.spec.num_classes,
        },
        "privacy": {
            "guarantee": report["guarantee"],
            "epsilon": report["guarantee_epsilon"],
            "accountant": report["guarantee_accountant"],
            "delta": plan.delta,
            "relation": plan.neighbouring,
            "report": "privacy_report.json",
        },
        "samples": {
            "file": "samples.npz",
            "num": num,
            "batch_size": max(1, min(int(cfg.sample.batch_size), num)),  # As generate's.
            "class_balanced": bool(class_balanced),
            "config_seed": int(cfg.seed),
            "export_seed": int(seed),
            "key": SAMPLE_KEY_DERIVATION,
        },
        "audit": card_lib.audit_summary(run.workdir),
    }


#: How an export's sample key is made (``export_run``); the manifest quotes it.
SAMPLE_KEY_DERIVATION = (
    "jax.random.fold_in(dpjax.randomness.Streams.from_seed(config_seed).sample, "
    "2000000 + export_seed); batch i of batch_size images is drawn with fold_in(key, i) "
    "(dpjax.sample.generate)")


def sample_key(config_seed: int, export_seed: int) -> jax.Array:
    """The key of an export's samples (``SAMPLE_KEY_DERIVATION``)."""
    return jax.random.fold_in(Streams.from_seed(config_seed).sample, 2_000_000 + export_seed)


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
    check_secret_noise(run.meta, run.plan)
    try:
        run.method.check_private_run()  # As run setup did (a source may have changed).
    except ValueError as e:
        raise NotPrivateError(f"{e} Refusing to export this run.") from None
    try:
        run_config.check_private_data_spec(run.config)
        npz.check_float_range_from_start(  # (The typed config cannot tell '' from missing.)
            atomic_file.read_json(os.path.join(workdir, "config.json")).get("data") or {},
            run.plan.enabled)
    except (ConfigError, DataError) as e:  # A run from before the check: no guarantee.
        raise NotPrivateError(
            f"{e} This run began with that setting; refusing to export it.") from None
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
        redact = functools.partial(card_lib.redact_source_paths, method_args=cfg.method_args)
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
            # What the method needs, beyond its settings and these weights, to be rebuilt
            # without the redacted source runs (``Method.release_record``; dpjax.released).
            "rebuild": redact(run.method.release_record()),
        }
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            json.dump(atomic_file.json_safe(model), f, indent=2, sort_keys=True, default=str,
                      allow_nan=False)
        files.append("model_config.json")
        params = Params(run.state.ema, run.state.frozen)
        key = sample_key(cfg.seed, seed)
        images, labels = sample.generate(
            run.method, params, run.spec, key, num, cfg.sample.batch_size
        )
        sample.write_samples(images, labels, tmp, png,
                             sample.released_classes(run.method, run.spec))
        files += ["samples.npz", "samples_grid.png"] + (["png"] if png else [])
        report = report_lib.without_dataset_size(redact(report_lib.privacy_report(
            run.plan, run.step, cfg.method, releases, run.method.privacy_notes(),
            noise_source=noise_secret.recorded_source(run.meta),
            loss_source=noise_secret.recorded_loss_source(run.meta),
        )))
        with open(os.path.join(tmp, "privacy_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, "privacy_report.md"), "w") as f:
            f.write(report_lib.report_markdown(report))
        files += ["privacy_report.json", "privacy_report.md", "model_card.md",
                  export_manifest.MANIFEST]
        card = card_lib.model_card(
            run, report, files, card_lib.redact_command(command or "export of a workdir",
                                                        workdir, out), num,
            count_params(public_frozen),
        )
        with open(os.path.join(tmp, "model_card.md"), "w") as f:
            f.write(card)
        unexpected = sorted(set(os.listdir(tmp)) - set(ALLOWED))
        if unexpected:  # A guard against a future change writing something else.
            raise ExportError(f"Export would contain unexpected files {unexpected}.")
        manifest_sha = export_manifest.write_manifest(tmp, manifest_facts(
            run, report, num, seed, sample.released_classes(run.method, run.spec)))
        if os.path.isdir(out):
            os.rmdir(out)  # Empty (checked above).
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[dpjax] exported step {run.step} of {workdir} to {out}: {', '.join(sorted(files))}; "
        f"manifest.json sha256 {manifest_sha} (check: python -m dpjax.export_manifest {out})")
    return sorted(os.listdir(out))
