"""Reading a recipe file into a nested dict, with YAML errors on one line that name the file, line and column
(:func:`~diffalign.config.load_config` validates the dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .options import ConfigError


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line, positions as ``line L, column C`` and no ``<unicode string>``."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        text = e.problem
        if e.problem_mark is not None:
            text = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: {text}"
        if e.context:
            where = (f" at line {e.context_mark.line + 1}, column {e.context_mark.column + 1}"
                     if e.context_mark is not None else "")
            text += f" ({e.context}{where})"
        return text
    return " ".join(str(e).replace('in "<unicode string>", ', "").split())


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe's nested dict; errors name the file once, on one line."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        problem = yaml_problem(e)
        if problem.startswith("line "):
            where, _, problem = problem.partition(": ")
            raise ConfigError(f"{path}, {where}: not valid YAML: {problem}") from None
        raise ConfigError(f"{path}: not valid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for section, given in raw.items():
        if given is not None and not isinstance(given, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping, got {given!r}")
    return raw
