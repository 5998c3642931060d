"""The pieces every options dataclass is built from: :class:`ConfigError`, ``option(default, help)`` fields, the
checks that name the bad key and :func:`coerce`, which checks a recipe's value against a field's type. A leaf
module (no imports of ours), so the config sections, the objectives' options and
:class:`~diffalign.sampling.settings.Sampling` all build on it."""

from __future__ import annotations

import types
import typing
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid :class:`~diffalign.config.Config`. ``keys`` are the
    dotted keys the message is about (:func:`~diffalign.config.load_config` uses them to name where each value
    came from)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (every config field and objective option has one)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def check_choice(section: str, name: str, value: Any, valid: tuple) -> None:
    """``section.name`` must be one of ``valid``."""
    if value not in valid:
        raise ConfigError(f"{section}.{name}={value!r} is not valid; choose one of {', '.join(map(str, valid))}",
                          (f"{section}.{name}",))


def check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    """``section.name`` must be > 0 (or >= 0 with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{section}.{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}", (f"{section}.{name}",))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (the bad one raises :class:`ConfigError` naming ``key``); ints
    become floats where a float is expected, a lone string a one-item list where a list is."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {type_name(tp)}", (key,))
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a list", (key,))
        (item,) = typing.get_args(tp)
        return [coerce(key, v, item) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and value is None:  # `--set data.prompts=`: YAML reads an empty value as null
        return ""
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {type_name(tp)}", (key,))


def type_name(tp: Any) -> str:
    """How an error names the annotation ``tp``: ``float or null``."""
    args = typing.get_args(tp)
    if args:
        return " or ".join(type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))
