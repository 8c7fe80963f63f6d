"""Quiet, readable console output for runs."""

from __future__ import annotations

import logging

from absl import logging as absl_logging


class _DropKnownNoise(logging.Filter):
    """Drops log lines that are expected and carry no information for the user."""

    NOISE = (
        # dp_accounting drops RDP orders it cannot evaluate for small sigma; expected.
        "_compute_log_a_frac failed to converge",
        # orbax, each time a checkpoint is opened read-only (sample, eval, export): what
        # read-only means, said in three warnings.
        "CheckpointManagerOptions.read_only=True, setting",
        "Given directory is read only=",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


def quiet() -> None:
    """Warnings and errors only from libraries; dpjax prints its own progress."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = absl_logging.get_absl_handler()
    handler.addFilter(_DropKnownNoise())
    logging.getLogger().addFilter(_DropKnownNoise())
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
