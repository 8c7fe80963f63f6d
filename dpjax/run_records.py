"""What a run writes next to its checkpoints: the epsilon spent and the privacy report.

``save_checkpoint`` keeps the epsilon spent next to every checkpoint: in the checkpoint's
own metadata, in ``dp_plan.json`` and in the privacy report (the plan's accountant; the
end of the run writes both accountants with ``write_privacy_report``). Every file is
written atomically, and only by process 0 (the checkpoint by every process: orbax
coordinates the hosts).
"""

from __future__ import annotations

import os
from typing import Any

from dpjax import atomic_file, parallel
from dpjax.privacy import noise_secret
from dpjax.privacy import plan as plan_lib
from dpjax.privacy import report as report_lib
from dpjax.run_setup import Run
from dpjax.state import TrainState


def _meta(run: Run, steps_done: int) -> dict[str, Any]:
    # The plan's own accountant only: PLD at small sigma takes seconds per call, too slow
    # for every checkpoint; the final privacy report gives both.
    eps = report_lib.epsilon_spent(run.plan, steps_done, run.releases, (run.plan.accountant,))
    return {
        "plan": run.plan.to_dict(),
        "steps_done": steps_done,
        "epsilon_spent": report_lib.storable_epsilons(eps),
        "releases": run.releases,
        "method": run.config.method,
        noise_secret.NOISE_SOURCE_KEY: run.noise_source,
        noise_secret.LOSS_SOURCE_KEY: run.loss_source,
    }


def save_checkpoint(run: Run, state: TrainState) -> None:
    """The plan file and privacy report with the epsilon spent at this step, then the
    checkpoint (each atomic).

    In this order a kill (or a failed save) between the two leaves a report that states
    the epsilon of a checkpoint not yet written, never one below the latest checkpoint's;
    the next resume rewrites both for the step it restores (``refresh_records``). The
    report has the plan's accountant only (PLD at a small sigma takes seconds); the end of
    the run writes both.
    """
    steps_done = int(state.step)
    meta = _meta(run, steps_done)
    if parallel.is_main_process():
        _write_records(run, steps_done, meta)
    run.checkpointer.save(steps_done, state, meta)  # Every process: orbax coordinates hosts.


def refresh_records(run: Run, steps_done: int) -> None:
    """Rewrites dp_plan.json and the privacy report for the restored checkpoint's step.

    A kill between the records and their checkpoint (or a plan file deleted) leaves them
    ahead of the latest checkpoint, or missing; a resume brings them back to it.
    """
    _write_records(run, steps_done, _meta(run, steps_done))


def _write_records(run: Run, steps_done: int, meta: dict[str, Any]) -> None:
    """dp_plan.json and the privacy report (the plan's accountant) at ``steps_done``."""
    _write_plan_file(run, meta)
    write_privacy_report(run, steps_done, (run.plan.accountant,), meta["epsilon_spent"])


def _write_plan_file(run: Run, meta: dict[str, Any]) -> None:
    plan_lib.save_plan(
        os.path.join(run.workdir, "dp_plan.json"),
        run.plan,
        {k: v for k, v in meta.items() if k != "plan"},
    )


def write_privacy_report(
    run: Run,
    steps_done: int,
    kinds: tuple[str, ...] = ("rdp", "pld"),
    epsilon: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes privacy_report.json and privacy_report.md to the workdir (``kinds``: the
    accountants computed; ``epsilon``: their values at ``steps_done`` if already known,
    as ``_meta`` has them)."""
    rep = report_lib.privacy_report(
        run.plan, steps_done, run.config.method, run.releases, run.method.privacy_notes(),
        kinds, epsilon, run.noise_source, run.loss_source,
    )
    # Atomically: a kill mid-write leaves the previous report whole, not a truncated one.
    atomic_file.write_json(os.path.join(run.workdir, "privacy_report.json"), rep, indent=2)
    atomic_file.write_text(os.path.join(run.workdir, "privacy_report.md"),
                           report_lib.report_markdown(rep))
    return rep
