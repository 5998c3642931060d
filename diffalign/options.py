"""The pieces every options dataclass is built from: :class:`ConfigError`, ``option(default, help)`` fields and
the checks that name the bad key. A leaf module (no imports of ours), so the config sections, the objectives'
options and :class:`~diffalign.sampling.settings.Sampling` all build on it."""

from __future__ import annotations

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
