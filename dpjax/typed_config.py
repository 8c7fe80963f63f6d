"""Config sections as typed frozen dataclasses.

Experiments are ml_collections ConfigDicts (runnable documentation, command-line
overrides). Below ``train.py`` nothing reads a ConfigDict: each section is turned into a
frozen dataclass here, so that a missing, extra or mistyped key fails at start-up with a
message that names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import types
import typing
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type."""


def to_configdict(instance: Any) -> ml_collections.ConfigDict:
    """A ConfigDict holding the fields of a dataclass instance (nested dataclasses too).

    A field hinted ``X | None`` whose value is None becomes a typed placeholder, so that
    the command line can set it (``--config.eval.sampling.s_churn=50``); ml_collections
    cannot parse a value for a plain None field.
    """
    hints = typing.get_type_hints(type(instance))
    out = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            value = to_configdict(value)
        elif isinstance(value, tuple):
            value = tuple(value)
        elif value is None and (kind := _optional_scalar(hints[f.name])) is not None:
            value = config_dict.placeholder(kind)
        out[f.name] = value
    return ml_collections.ConfigDict(out)


def _optional_scalar(hint: Any) -> type | None:
    """X for a hint ``X | None`` with X a scalar type (a Literal of strings: str)."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) != 1:
        return None
    (arg,) = args
    if typing.get_origin(arg) is typing.Literal:
        kinds = {type(v) for v in typing.get_args(arg)}
        return kinds.pop() if len(kinds) == 1 else None
    return arg if arg in (int, float, str, bool) else None


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


#: The strings a float setting may be given as: the non-finite values, as dpjax's JSON
#: files write them (``atomic_file.json_safe``; e.g. an export's model_config.json).
NON_FINITE = ("inf", "-inf", "nan")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks ``value`` against a (simple) type hint, converting lists to tuples."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}.")
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{where}: expected a tuple, got {value!r}.")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        return tuple(value)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}.")
        return value
    if hint is float:
        if isinstance(value, str) and value in NON_FINITE:
            return float(value)  # As dpjax's JSON files write them (atomic_file.json_safe).
        # numbers.Real takes NumPy's scalars too (np.float32 is not a float).
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if hint is int:
        return as_int(value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected True or False, got {value!r}.")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return value
    if dataclasses.is_dataclass(hint):
        return from_configdict(hint, value, where)
    return value


def as_int(value: Any, where: str) -> int:
    """``value`` as a Python int: ints and NumPy integers (not bools, not floats).

    Raises:
      ConfigError: naming ``where``, for any other value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    return int(value)


def from_configdict(cls: type[T], section: Any, where: str = "config") -> T:
    """Builds dataclass ``cls`` from a ConfigDict (or dict), checking every key and type.

    Raises:
      ConfigError: for an unknown key (with a suggestion), a value of the wrong type, or
        one the section's own checks refuse.
    """
    if isinstance(section, ml_collections.ConfigDict):
        section = section.to_dict()
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a section, got {section!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in section if k not in names]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"Unknown config key '{where}.{k}'.{suggest(k, names)} Valid keys: {sorted(names)}."
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in section.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
    except ValueError as e:
        # A section's own range checks (``__post_init__``) are config errors too; the
        # errors of a more specific kind (PrivacyError, ConfigError) keep it.
        if type(e) is not ValueError:
            raise
        raise ConfigError(f"{where}: {e}") from e
