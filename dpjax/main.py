"""dpjax's command line: the only file with flags.

    python -m dpjax.main --config=experiments/dpdm_fmnist.py:eps=10 --workdir=runs/x
    python -m dpjax.main --mode=sample --workdir=runs/x --num=60000 [--png]

Errors a user can cause (a mistyped config key, a missing dataset, a corrupt image, a
corrupt checkpoint, a budget overrun) end with one readable line, not a traceback.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/dpdm_fmnist.py:eps=1", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory of the run (checkpoints, logs, samples)."
)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "What to do.")
_NUM = flags.DEFINE_integer("num", None, "--mode=sample: number of samples (default: config).")
_PNG = flags.DEFINE_boolean("png", False, "--mode=sample: also write a PNG folder.")
_OUT = flags.DEFINE_string("out", None, "--mode=sample: output directory.")
_DEBUG = flags.DEFINE_boolean("debug", False, "Show full tracebacks for user errors.")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix: reported in one line."""
    from dpjax.checkpoint import CheckpointError
    from dpjax.data.dataset import DataError
    from dpjax.privacy.accounting import PrivacyError
    from dpjax.train import NonFiniteError, WorkdirError
    from dpjax.typed_config import ConfigError

    return (
        ConfigError,
        DataError,
        PrivacyError,
        CheckpointError,
        NonFiniteError,
        WorkdirError,
        FileNotFoundError,
    )


def run(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required.")
    workdir = os.path.abspath(_WORKDIR.value)
    if _MODE.value == "train":
        from dpjax import train

        if _CONFIG.value is None:
            raise app.UsageError("--config is required for --mode=train.")
        train.train(_CONFIG.value, workdir)
    elif _MODE.value == "sample":
        from dpjax import sample

        num = _NUM.value
        if num is None:
            from dpjax.sample import load_spec  # noqa: F401  (spec check happens in sample)

            num = 60000
        path = sample.sample_from_workdir(workdir, num, _OUT.value, _PNG.value)
        print(f"[dpjax] wrote {path}")


def main(argv: list[str]) -> None:
    from dpjax import log_setup

    log_setup.quiet()
    try:
        run(argv)
    except user_errors() as e:
        if _DEBUG.value:
            raise
        print(f"dpjax error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
