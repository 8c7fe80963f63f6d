"""Metrics to JSONL (``metrics.jsonl``) and TensorBoard, resumable.

On resume from step s, entries with step > s (written after the last checkpoint by a
run that was then killed) are dropped, so the log continues exactly where the restored
state is, and the epsilon curve never restarts or repeats. TensorBoard's event files are
append-only: there the resumed writer records a purge from step s + 1
(``SummaryWriter(purge_step=...)``), and TensorBoard hides the killed run's later points.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dpjax import atomic_file


def _clean(v: Any) -> Any:
    return atomic_file.json_safe(float(v) if hasattr(v, "__float__") else v)


class MetricsLog:
    """Appends one JSON object per line; mirrors scalars to TensorBoard if available."""

    def __init__(self, workdir: str, resume_step: int, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        resumed = os.path.exists(self.path)
        if resumed:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run.
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                         purge_step=resume_step + 1 if resumed else None)
            except ImportError:
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue  # A line cut by a crash.
        atomic_file.write_text(self.path, "".join(kept))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read(workdir: str) -> list[dict[str, Any]]:
    """All complete rows of ``metrics.jsonl``, in order.

    A row is complete once its newline is written: a last line without one (a run killed
    in the middle of a write, or one still writing it) is not returned. Every complete
    line must parse.
    """
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = f.read().split("\n")[:-1]  # the text after the last newline is not a row
    return [json.loads(line) for line in lines if line.strip()]
