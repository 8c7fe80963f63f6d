"""THE train loop of dpjax, read top to bottom: setup, restore, step loop, log, checkpoint.

Setup and restore are in ``run_setup.py``, what is written with each checkpoint (the
epsilon spent, the privacy report) in ``run_records.py``, one step of each kind of plan
(DP-SGD, or a one-shot release then post-processing) in ``advance.py``; this module runs
the loop.
Every method trains through ``train``. The privacy contract it enforces:
* the DP plan (q, sigma, C, T, delta) is fixed before the first step, written to
  ``dp_plan.json`` and into every checkpoint, and a resumed run must have the same plan;
* no step past ``plan.steps`` is ever run (the budget);
* the epsilon spent is recomputed from the steps done and written with every checkpoint.
Fault tolerance: checkpoints are atomic; a run killed at any point resumes from the
last checkpoint and ends bit-identical to an uninterrupted run (batches and keys depend
only on the step, the seed and the workdir's noise secret) on the same backend and
device count with the same micro-batch size (``dp.microbatch_size=0`` re-chooses it
from the free memory at every start, and a free field changed on resume may change it:
then equal up to float rounding); a non-finite update stops the run before it is checkpointed.
Scale-out: with ``train.num_devices`` != 1 the step runs data-parallel over a mesh
(``parallel.py``; the same Poisson batch, clipping, single noise draw and accounting as
on one device), a run resumes on any device count, and in a multi-host run every
process trains while only process 0 writes logs, plan files, reports and samples.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dpjax import metrics_log, parallel, sample, stop_signals
from dpjax.advance import dpsgd_advance, public_advance, release_once
from dpjax.methods.base import Params
from dpjax.optim import make_optimizer
from dpjax.privacy import report as report_lib
from dpjax.run_records import refresh_records, save_checkpoint, write_privacy_report
from dpjax.run_setup import (
    BudgetExceededError,
    Run,
    prior_records,
    release_done,
    resolve_plan,
    setup,
)
from dpjax.state import TrainState
from dpjax.workdir_guard import (
    RESUME_LOCKED_SECTIONS,
    WorkdirError,
    check_resume_config,
    check_workdir,
    record_free_changes,
)

# The loop's public names, wherever they are defined (callers import them from here).
__all__ = [
    "RESUME_LOCKED_SECTIONS",
    "BudgetExceededError",
    "NonFiniteError",
    "Run",
    "WorkdirError",
    "check_resume_config",
    "check_workdir",
    "make_optimizer",
    "prior_records",
    "release_done",
    "resolve_plan",
    "save_checkpoint",
    "setup",
    "train",
    "write_privacy_report",
]


class NonFiniteError(FloatingPointError):
    """The loss or the update became NaN/inf; the step is named in the message."""



def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


class _NoLog:
    """The metrics log of processes other than 0: writes nothing."""

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        del step, metrics

    def close(self) -> None:
        pass


def _report_dropped(log, dropped: int, first: int, last: int) -> None:
    """Warns that ``dropped`` examples with a non-finite loss or gradient were left out
    of steps first..last (never silently: the run learns from fewer examples)."""
    if dropped and log is not None:
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        log(f"[dpjax] warning: {dropped} example(s) with a non-finite loss or gradient "
            f"were left out of {steps} (each adds 0; the privacy guarantee holds); check "
            "the data or lower the learning rate")


def _non_finite_message(run: Run, t: int, m: dict[str, Any], loss_name: str,
                        last_saved: int) -> str:
    """What a non-finite update at step ``t`` means and what to do about it."""
    saved = (f"the last checkpoint is step {last_saved}"
             if run.checkpointer.latest_step() is not None else "no checkpoint was written")
    return (
        f"Non-finite update at step {t} (update norm {m['update_norm']}, loss "
        f"{m[loss_name]}, {int(m.get('nonfinite_examples', 0))} non-finite examples left "
        f"out); nothing after it was checkpointed ({saved}). A resume replays the same "
        "batches and noise, so it would fail again: start a new --workdir with a lower "
        "optim.learning_rate, or check the model and the data."
    )


def _stop_here(
    run: Run, state: TrainState, last_saved: int, stop: stop_signals.StopRequest, log
) -> None:
    """Ends the loop at ``state``'s step on a stop request of any process: checkpoints
    it (unless that step is ``last_saved``) and marks the request on every process, so
    that all exit alike."""
    step = int(state.step)
    if last_saved != step:
        save_checkpoint(run, state)
    log(f"[dpjax] stopping at step {step} of {run.plan.steps}: "
        f"{stop.name or 'a stop signal on another process'} received.")
    stop.signum = stop.signum or signal.SIGTERM


def train(config: ml_collections.ConfigDict, workdir: str, log=print) -> TrainState:
    """Trains (or resumes) the run of ``config`` in ``workdir`` up to its planned steps.

    Raises:
      stop_signals.StoppedBySignal: a SIGTERM or SIGINT arrived during the steps (on any
        process of a multi-host run: they agree after each step); the step it arrived in
        was finished, then checkpointed and reported (``stop_signals``).
    """
    run, dataset = setup(config, workdir, log)
    try:
        with stop_signals.catch_stop_signals() as stop:
            state = _train_run(run, dataset, log, stop)
    finally:
        run.close()  # Waits for orbax's threads and frees the workdir, also on failure.
    if stop.requested:
        raise stop_signals.StoppedBySignal(stop.signum, int(state.step), run.plan.steps)
    return state


def _train_run(
    run: Run, dataset: Any, log, stop: stop_signals.StopRequest | None = None
) -> TrainState:
    """``train`` after ``setup``: the release (if any), the step loop, report and grid.
    A ``stop`` request ends the loop after the step it arrives in, checkpointed; the
    report is written and the grid left out."""
    stop = stop or stop_signals.StopRequest()
    workdir = run.workdir
    main = parallel.is_main_process()
    if not main:
        log = lambda *_: None  # noqa: E731 - only process 0 talks.
    cfg, plan = run.config, run.plan
    state = run.state
    start = int(state.step)
    end = plan.steps
    if cfg.train.max_steps_per_run > 0:
        end = min(end, start + cfg.train.max_steps_per_run)
    if main and start > 0:  # The records may be ahead of this checkpoint, or missing.
        refresh_records(run, start)
    eps_target = plan.target_epsilon
    if not plan.enabled:
        log(f"[dpjax] NON-PRIVATE training for {plan.steps} steps (public data only)")
    elif plan.mechanism == "release":
        log(
            f"[dpjax] plan: one release of N={plan.num_examples} with sigma="
            f"{plan.noise_multiplier:.5g} (bound C={plan.clip_norm}), then {plan.steps} "
            f"post-processing steps; delta={plan.delta:g}, target epsilon={eps_target} "
            f"({plan.accountant})"
        )
    else:
        log(
            f"[dpjax] plan: q={plan.sampling_rate:.5g} (E[B]={plan.expected_batch_size:.1f}), "
            f"sigma={plan.noise_multiplier:.5g}, C={plan.clip_norm}, T={plan.steps}, "
            f"delta={plan.delta:g}, target epsilon={eps_target} ({plan.accountant})"
        )
    if plan.mechanism == "release":
        state = release_once(run, state, dataset, log)
        advance = public_advance(run)
    else:
        advance = dpsgd_advance(run, dataset)
    logger = metrics_log.MetricsLog(workdir, resume_step=start) if main else _NoLog()
    # RDP is cheap enough to log every few steps, but cannot account for Poisson sampling
    # under replace-one (NaN on every line before): PLD then.
    # PLD costs about a second a value: at most one every 30 s, and the last step's.
    progress_kind = "rdp"
    if math.isnan(report_lib.epsilon_spent(plan, 1, run.releases, ("rdp",))["rdp"]):
        progress_kind = "pld"
    eps, eps_at = math.nan, -math.inf
    bar = _progress(plan.steps, start, cfg.train.progress and main)
    t0, last_saved = time.time(), start
    dropped, dropped_since = 0, start + 1  # Non-finite examples left out since the last log.
    warned_loss = False
    failed = True
    try:
        for t in range(start, end):
            # Every process asks at the same point (a collective), so all stop together.
            if parallel.any_process(stop.requested):  # Arrived since the last check.
                _stop_here(run, state, last_saved, stop, log)
                break
            if t >= plan.steps:  # The budget; unreachable unless the plan is tampered with.
                raise BudgetExceededError(f"Step {t} would exceed the plan's {plan.steps} steps.")
            state, m, loss_name = advance(state, t)
            # Stop on what DP released (the noisy update) and on public values only: the
            # loss of a private run's rows is not private, and stopping on it (a sum that
            # overflows while every clipped gradient is finite) would make whether the
            # run goes on a function of the private data (non-finite review, 2026-12-07).
            private_loss = plan.enabled and loss_name.endswith("_nonprivate")
            rows = m.get("batch_size", 1) > 0  # (Without rows the loss is NaN: no loss.)
            if not np.isfinite(m["update_norm"]) or not (
                    private_loss or np.isfinite(m[loss_name]) or not rows):
                raise NonFiniteError(_non_finite_message(run, t, m, loss_name, last_saved))
            if private_loss and rows and not np.isfinite(m[loss_name]) and not warned_loss:
                warned_loss = True
                log(f"[dpjax] warning: the private loss at step {t} is {m[loss_name]} (a "
                    "non-private diagnostic); training goes on, since stopping on it would "
                    "depend on the private data. The update stays finite (each example's "
                    "gradient is clipped or left out).")
            done = t + 1
            dropped += int(m.get("nonfinite_examples", 0))
            if bar is not None:
                bar.update(1)
            if done % cfg.train.log_every == 0 or done == end:
                _report_dropped(log if main else None, dropped, dropped_since, done)
                dropped, dropped_since = 0, done + 1
                row = {k: float(v) for k, v in m.items()}
                if progress_kind == "rdp" or done == end or time.time() - eps_at >= 30:
                    eps = report_lib.epsilon_spent(
                        plan, done, run.releases, (progress_kind,))[progress_kind]
                    eps_at = time.time()
                    row[f"epsilon_{progress_kind}"] = eps
                row["steps_per_s"] = (done - start) / (time.time() - t0)
                logger.write(done, row)
                if bar is not None:
                    bar.set_postfix(eps=report_lib.format_epsilon(float(eps)),
                                    loss=f"{row[loss_name]:.4g}")
            # Agreed by every process (each has its own clock), as the stop below.
            out_of_time = cfg.train.max_seconds_per_run > 0 and parallel.any_process(
                cfg.train.max_seconds_per_run < time.time() - t0)
            if done % cfg.train.ckpt_every == 0 or done == end or out_of_time:
                save_checkpoint(run, state)
                last_saved = done
            # After the save: a signal that arrived during it or the log stops here too.
            if done < end and parallel.any_process(stop.requested):
                _stop_here(run, state, last_saved, stop, log)
                break
            if out_of_time and done < end:
                log(
                    f"[dpjax] stopping at step {done} of {plan.steps}: "
                    f"train.max_seconds_per_run={cfg.train.max_seconds_per_run:g} s passed; "
                    "run the same command again to resume."
                )
                break
        # A stop between log steps (the time limit) reports its window too.
        _report_dropped(log if main else None, dropped, dropped_since, int(state.step))
        failed = False
    finally:
        if bar is not None:
            bar.close()
        try:
            logger.close()
        except OSError:
            if not failed:  # Else the loop's own error (a full disk, say) is the one to see.
                raise
    final = int(state.step)
    if start < final < plan.steps and final == end:  # train.max_steps_per_run stopped it.
        log(f"[dpjax] stopping at step {final} of {plan.steps}: train.max_steps_per_run="
            f"{cfg.train.max_steps_per_run}; run the same command again to resume.")
    if final == start and start > 0:
        log(f"[dpjax] nothing to do: {final} of {plan.steps} planned steps already done.")
    if main:
        record_free_changes(workdir, run.free_changes, steps_ran=final > start)
        write_privacy_report(run, final)
    grid_path = os.path.join(workdir, "samples_grid.png")
    # Also when a kill after the last checkpoint left the finished run without its grid.
    grid_due = final > start or (final == plan.steps and not os.path.exists(grid_path))
    if main and grid_due and cfg.train.grid_samples > 0 and not stop.requested:
        path = sample.write_grid(
            run.method,
            parallel.local_copy(Params(state.ema, state.frozen)),
            run.spec,
            jax.random.fold_in(run.streams.sample, final),
            cfg.train.grid_samples,
            grid_path,
        )
        log(f"[dpjax] sample grid (EMA weights, step {final}): {path}")
    return state
