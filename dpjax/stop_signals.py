"""A clean stop of a training run on SIGTERM or SIGINT (a preemption, Ctrl-C).

Clusters preempt jobs with SIGTERM, and a grace period before SIGKILL. Without a
handler, Python dies at once on SIGTERM (losing up to ``train.ckpt_every - 1`` steps,
whose privacy is spent all the same) and prints a traceback on SIGINT. Inside
``catch_stop_signals`` the first such signal only sets a flag: the train loop finishes
the step it is in, saves a checkpoint, writes the privacy report, and the process exits
with 128 + the signal's number (143, 130), so that a scheduler requeues it instead of
counting it as done. A second signal takes the action that was there before (default:
SIGTERM terminates, SIGINT raises KeyboardInterrupt), for a user who will not wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(Exception):  # noqa: N818 - not an error: a requested stop.
    """The run stopped early on a signal, after saving its checkpoint and report."""

    def __init__(self, signum: int, step: int, steps: int):
        self.signum, self.exit_code = signum, 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped at step {step} of {steps} on {name}; the checkpoint and the privacy "
            "report of that step are saved: run the same command again to resume."
            if step < steps
            else f"all {steps} steps done and reported; {name} arrived at the end."
        )


@dataclasses.dataclass
class StopRequest:
    """``signum``: the first stop signal received inside the context (None: none yet)."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.requested else ""


@contextlib.contextmanager
def catch_stop_signals(enabled: bool = True) -> Iterator[StopRequest]:
    """Within the context, the first SIGTERM or SIGINT sets the yielded request's
    ``signum`` instead of stopping the process; the previous handlers come back on exit.

    Handlers are installed only when ``enabled``, in the main thread (Python's rule),
    and for a signal that is not ignored (a job started with SIGINT ignored keeps it
    ignored). With several processes the caller must agree on the stop before the
    collective checkpoint save (``parallel.any_process`` at the same step on all).
    """
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    # getsignal is None for a handler set outside Python: the default action stands in.
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in STOP_SIGNALS}

    def handler(signum: int, frame: object) -> None:
        del frame
        if request.signum is None:
            request.signum = signum
            return
        # The second signal: the previous action, now.
        signal.signal(signum, previous[signum])
        signal.raise_signal(signum)

    installed = [s for s in STOP_SIGNALS if previous[s] is not signal.SIG_IGN]
    for s in installed:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s in installed:
            signal.signal(s, previous[s])
