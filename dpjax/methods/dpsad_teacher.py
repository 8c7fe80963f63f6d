"""DP-SAD's teacher: which run it is, whether its privacy is what the config declares,
and its weights.

The checks here are what make DP-SAD's epsilon a guarantee (see ``dpsad.py``): a 'dp'
teacher must carry a finite DP-SGD plan (then ``teacher_releases`` composes it), a
'public' teacher must have been trained on data other than the private data, and no
teacher may start (``init_from``) from a run on the private data. Everything is read
from the teacher's workdir before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from dpjax import atomic_file
from dpjax.methods import base, dpdm
from dpjax.privacy import provenance
from dpjax.privacy.provenance import DATA_IDENTITY_FIELDS, data_identity  # noqa: F401

if TYPE_CHECKING:
    from dpjax.methods.dpsad import Config


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """The public facts of the teacher's workdir, read before any weight is loaded."""

    workdir: str
    method: str  # its config's method name
    plan: dict  # its dp_plan.json plan
    data: dict  # its config's data section
    init_from: str  # the run its weights started from ('' for none)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher as DP-SAD uses it: its run, its DPDM settings and its EMA UNet."""

    run: TeacherRun
    config: dpdm.Config  # its DPDM settings
    unet: dict  # its EMA UNet weights (NumPy)
    step: int  # the loaded checkpoint's step = the DP-SGD steps behind these weights
    releases: tuple[dict[str, Any], ...]  # its own releases (checkpoint metadata)


def read_teacher_run(workdir: str) -> TeacherRun:
    """Reads ``config.json`` and ``dp_plan.json`` of the teacher's workdir (no weights).

    Raises:
      ValueError: no workdir given, or not a run of a method DP-SAD can distill from.
    """
    from dpjax.privacy import plan as plan_lib  # Deferred: keeps this module light.

    if not workdir:
        raise ValueError(
            "DP-SAD needs method_args.teacher_from: the workdir of a DPDM run (see "
            "experiments/dpsad_fmnist.py for the two commands)."
        )
    workdir = os.path.abspath(workdir)
    try:
        config = atomic_file.read_json(os.path.join(workdir, "config.json"))
        plan, _ = plan_lib.load_plan(os.path.join(workdir, "dp_plan.json"))
    except OSError as e:
        raise ValueError(f"teacher_from={workdir!r} holds no complete dpjax run ({e}).") from e
    if config.get("method") != "dpdm":
        raise ValueError(f"teacher_from={workdir!r} is a {config.get('method')!r} run, not dpdm.")
    init_from = str(config.get("method_args", {}).get("init_from", "") or "")
    return TeacherRun(workdir, config["method"], plan.to_dict(), config.get("data", {}), init_from)


def check_teacher_privacy(config: Config, run: TeacherRun) -> None:
    """Refuses a teacher whose privacy is not what ``config.teacher_privacy`` declares.

    A 'dp' teacher must carry a finite DP-SGD plan (``prior_releases`` composes it). Then
    the teacher and the runs its weights started from are checked against the private
    data by ``provenance.check_sources_against`` (the same rules as every other
    ``*_from`` run): a 'public' teacher must not have seen the private data, and no run
    that the teacher started from may have seen it (only the teacher itself is composed).

    Raises:
      ValueError: a 'dp' teacher without a finite DP plan; a check that needs
        ``private_data`` without it; or (``PrivacyError``) a 'public' teacher of the
        private data, or a teacher that started from a run on the private data.
    """
    plan = run.plan
    if config.teacher_privacy == "dp":
        if not plan.get("enabled", False):
            raise ValueError(
                f"The teacher in {run.workdir} was trained WITHOUT DP (dp.enabled=False); "
                "a non-private teacher of the private data would void the student's guarantee "
                "and is refused. If it was trained on other, public data, declare "
                "teacher_privacy='public'."
            )
        if plan.get("mechanism", "dpsgd") != "dpsgd" or not plan["noise_multiplier"] > 0:
            raise ValueError(
                f"The teacher in {run.workdir} has no finite DP-SGD guarantee (plan {plan})."
            )
    if not config.private_data:
        if config.teacher_privacy == "public" or run.init_from:
            raise ValueError(
                f"Checking the teacher in {run.workdir} (teacher_privacy="
                f"'{config.teacher_privacy}', init_from={run.init_from!r}) needs "
                "method_args.private_data (this run's data identity, see "
                "dpsad.data_identity) to tell which runs saw the private data."
            )
        return  # A DP teacher with no sources: composed, nothing to compare.
    source = provenance.Source("teacher_from", run.workdir, config.teacher_privacy == "dp")
    provenance.check_sources_against([source], config.private_data)


def load_teacher(run: TeacherRun, spec: base.DataSpec) -> Teacher:
    """Loads the teacher's EMA UNet (latest checkpoint) and that checkpoint's releases.

    Raises:
      ValueError: not a DPDM run, another data spec, or LoRA adapters left unmerged.
      PrivacyError: the checkpoint records another DP plan than dp_plan.json.
    """
    from dpjax import checkpoint as ckpt_lib  # Deferred: sample imports the registry.
    from dpjax import sample as sample_lib
    from dpjax.privacy import plan as plan_lib

    source, params, teacher_spec, _, step = sample_lib.load_trained(run.workdir)
    if not isinstance(source, dpdm.DPDM):
        raise ValueError(f"The teacher in {run.workdir} is a {type(source).__name__}, not DPDM.")
    if teacher_spec != spec:
        raise ValueError(
            f"The teacher in {run.workdir} was trained on {teacher_spec}, this run has {spec}."
        )
    unet, adapters = source.weights(params.trainable, params.frozen)
    if adapters is not None:
        raise ValueError(f"The teacher in {run.workdir} has LoRA adapters; merge them first.")
    checkpointer = ckpt_lib.Checkpointer(os.path.join(run.workdir, "checkpoints"), read_only=True)
    try:
        meta = checkpointer.restore_meta(step)
    finally:
        checkpointer.close()
    # The plan composed for the teacher (``teacher_releases``: ``run.plan``, read from
    # dp_plan.json) must be the one the checkpoint whose weights are used records.
    provenance.check_source_plan("teacher_from", run.workdir, int(step),
                                 plan_lib.DPPlan.from_dict(run.plan), meta.get("plan"))
    return Teacher(
        run=run,
        config=source.config,
        unet=jax.tree_util.tree_map(np.asarray, unet),
        step=int(step),
        releases=tuple(meta.get("releases", [])),
    )


def teacher_releases(teacher: Teacher, privacy: str) -> list[dict[str, Any]]:
    """The records a student run composes for ``teacher``: none for a 'public' teacher.

    For a 'dp' teacher: its training, ``steps`` Poisson-subsampled Gaussian steps at its
    plan's sigma and q, where ``steps`` is the step of the checkpoint whose weights are
    used, then the teacher run's own releases.
    """
    if privacy != "dp":
        return []
    p = teacher.run.plan
    own = {
        "kind": "dpsgd",
        "noise_multiplier": float(p["noise_multiplier"]),
        "sampling_rate": float(p["sampling_rate"]),
        "steps": teacher.step,
        "neighbouring": p["neighbouring"],
        "description": (
            f"DP-SAD teacher: DPDM trained with DP-SGD on the private data in "
            f"{teacher.run.workdir} ({teacher.step} steps, sigma={p['noise_multiplier']:.6g}, "
            f"q={p['sampling_rate']:.6g}, {p['neighbouring']})"
        ),
    }
    inherited = [
        {
            **{k: v for k, v in r.items() if k != "stage"},
            "description": f"DP-SAD teacher's release: {r.get('description', r.get('kind'))}",
        }
        for r in teacher.releases
    ]
    return [own, *inherited]


def teacher_notes(teacher: Teacher, config: Config) -> list[str]:
    """How ``teacher`` enters the guarantee (written into the privacy report).

    A reader of the report must see which teacher was used and why it is, or is not,
    in the composition; the export holds no teacher parameter in either case.
    """
    if config.teacher_privacy == "dp":
        # No step count here: at export the teacher's run may have gone on training; the
        # composed release (recorded in the checkpoint) states the steps that count.
        how = (
            "trained with DP-SGD on the private data; its training (the steps in its "
            "release record above) is composed into the epsilon as a prior release"
        )
    else:
        how = (
            f"declared public: trained on {data_identity(teacher.run.data)}, which is not "
            f"this run's private data ({config.private_data}); it is not composed"
        )
    return [
        f"DP-SAD teacher {teacher.run.workdir}: {how}.",
        "The student and the discriminator are trained in one DP-SGD loop with one "
        "clip over both; the teacher is frozen and is never exported.",
    ]
