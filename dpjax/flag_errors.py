"""One readable line for an error raised while dpjax.main's flags and experiment load.

absl, ml_collections and the experiment file itself raise many kinds of errors for what
is always the user's to fix (a mistyped key, a missing file, a syntax error, an
exception in ``get_config``); ``message`` turns each into the single line that
``dpjax.main`` prints (exit status 2).
"""

from __future__ import annotations

import re

from absl import flags


def message(error: BaseException, argv: list[str]) -> str:
    """One line for an error raised while the flags (and the experiment file) load."""
    from dpjax.typed_config import ConfigError

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if (isinstance(error, flags.Error) and "Unknown command line flag 'config." in str(error)
            and not any(a.startswith("--config=") or a == "--config" for a in argv)):
        return ("--config.KEY=VALUE overrides need --config=FILE (the experiment they "
                "override; for a trained run, its own experiment file).")
    none_field = re.match(r"Type <class 'NoneType'> of field config\.(\S+) is not supported "
                          "for overriding", str(error))
    if none_field:
        key = none_field.group(1)
        hint = (" (it gives dp.noise_multiplier instead; for a target epsilon, start from "
                "an experiment argument that sets one, e.g. ':quick,eps=3' for ':smoke')"
                if key == "dp.epsilon" else "")
        return (f"--config.{key} cannot be set: this experiment leaves {key} unset (None), "
                f"and a command-line override needs a value of a known type{hint}.")
    if "before a value for --config was specified" in str(error):
        flag = str(error).split("Found ", 1)[-1].split(" in argv", 1)[0]
        return (f"{flag} comes before --config=FILE: give --config first, then the "
                "--config.KEY=VALUE overrides of it.")
    for line in reversed(lines):  # ml_collections quotes an experiment's traceback.
        if "ConfigError: " in line:
            return line.split("ConfigError: ", 1)[1]
    seen = error
    while seen is not None:  # An experiment's own message, if absl wrapped one.
        if isinstance(seen, ConfigError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, AttributeError) and "attribute 'get_config'" in str(error):
        return ("the --config file defines no get_config(arg) function (see any file in "
                "experiments/)")
    if isinstance(error, SyntaxError):
        return (f"the --config file has a syntax error: {error.msg} ({error.filename}, line "
                f"{error.lineno})")
    if isinstance(error, (AttributeError, KeyError)):
        # ml_collections: "'key'\nDid you mean ..." for a key the experiment lacks.
        text = str(error).strip("'\"").replace("\\'", "'").replace("\\n", " ")
        # A locked ConfigDict lists the whole section (FieldReference reprs included):
        # its "Did you mean" says what matters.
        text = re.sub(r'Other fields present: ".*?" ?', "", text)
        key = text.strip("'").split("'")[0]
        flag = next((a for a in argv if a.startswith("--config.") and key in a), None)
        if key and flag:
            return unknown_key_message(flag, argv) or (
                f"unknown config key {text} (in a --config.* flag)")
        return (f"the --config experiment failed: {type(error).__name__}: {text} "
                "(--debug shows where)")
    if isinstance(error, OSError) and "Failed loading config file" in str(error):
        return "cannot load the --config file: " + lines[-1]
    if any(line.startswith("Traceback") for line in lines):
        # An experiment file that raised: its exception's line (the last one).
        return f"the --config experiment failed: {lines[-1]} (--debug shows where)"
    if not isinstance(error, (flags.Error, OSError, TypeError, ValueError)):
        return (f"the --config experiment failed: {type(error).__name__}: "
                f"{' '.join(lines)} (--debug shows where)")
    return " ".join(lines) or type(error).__name__


def unknown_key_message(flag: str, argv: list[str]) -> str | None:
    """'unknown config key dp.clip_nrom in --config.dp.clip_nrom=1. Did you mean
    'clip_norm'? Keys of dp: ...', from the experiment's config without the overrides
    (the experiment file runs again: this is the error path only); None where that
    cannot be built (the caller's plainer message then stands)."""
    from dpjax import experiment_file
    from dpjax.typed_config import suggest

    path = flag[len("--config."):].split("=", 1)[0].split(".")
    spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec_arg is None:
        return None
    file, _, arg = spec_arg.partition(":")
    try:
        module = experiment_file.load(file, "_dpjax_experiment")
        section = module.get_config(arg) if arg else module.get_config()
        for depth, key in enumerate(path):
            if not hasattr(section, "keys"):
                return None
            if key not in section:
                where = ".".join(path[:depth]) or "the config"
                keys = sorted(section.keys())
                hint = suggest(key, keys).strip()
                return (f"unknown config key {'.'.join(path[:depth + 1])} in {flag}."
                        f"{' ' + hint if hint else ''} Keys of {where}: {', '.join(keys)}.")
            section = section[key]
    except Exception:  # noqa: BLE001 - an error path: fall back to the plainer message.
        return None
    return None
