"""The local paths a run's config names, made independent of the directory it ran from.

A run names other runs (``method_args.*_from``: a public model, an autoencoder, a
teacher, a feature network) and its data (``data.path``, ``data.tfds_data_dir``). Typed
relative, such a path means "relative to the directory dpjax was started in", and the
run's ``config.json`` is read again later: by a resume, by ``--mode=sample``, ``eval``
and ``export``, and by every run that names this one as its source. Stored relative, it
would then resolve against the reader's directory, which fails (or, worse, finds
another run) anywhere else. So a run stores them absolute (``absolute_source_paths``,
called by ``run_setup.setup`` before ``config.json`` is written). A run stored before
that keeps its relative paths: the resume check compares them resolved the same way,
and a command that cannot load such a run names them (``relative_source_paths``).

Only local paths change: '' (the source's default) and URLs (``gs://...``) stay as
given, and so does a '{split}' placeholder inside a path.
"""

from __future__ import annotations

import copy
import os
from typing import Any

# The data fields that hold a local path (the method's are its fields named '*_from').
DATA_PATH_FIELDS = ("path", "tfds_data_dir")


def _is_relative_local(value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and "://" not in value
            and not os.path.isabs(value))  # A "~" path too: it is the reader's home.


def _path_fields(config: Any) -> list[tuple[str, str]]:
    """(section, key) of every local-path field that ``config`` (a ConfigDict or the dict
    of a config.json) has."""
    fields = []
    for section, wanted in (("data", DATA_PATH_FIELDS), ("method_args", None)):
        block = config.get(section) if hasattr(config, "get") else None
        if not hasattr(block, "keys"):
            continue
        for key in block:
            if (key in wanted) if wanted is not None else str(key).endswith("_from"):
                fields.append((section, key))
    return fields


def relative_source_paths(config: Any) -> dict[str, str]:
    """``{'section.key': value}`` of the relative local paths in ``config`` (a ConfigDict
    or a config.json's dict): those that resolve against the reader's directory."""
    return {f"{s}.{k}": config[s][k] for s, k in _path_fields(config)
            if _is_relative_local(config[s][k])}


def absolute_source_paths(config: Any) -> Any:
    """A copy of ``config`` (a ConfigDict, or the dict of a config.json) whose relative
    local paths (``relative_source_paths``) are absolute, resolved against the current
    directory, with '~' expanded; ``config`` itself when it has none. Everything else
    (other fields, references, a ConfigDict's lock) is as in ``config``. For a stored
    config.json this is how its paths resolved when its run read them: against the
    directory each command ran in, as this one's."""
    relative = relative_source_paths(config)
    if not relative:
        return config
    out = copy.deepcopy(config)
    for name, value in relative.items():
        section, key = name.split(".", 1)
        out[section][key] = os.path.abspath(os.path.expanduser(value))
    return out
