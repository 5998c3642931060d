"""Name -> object lookups: built-in names, ``"package.module:attr"`` paths and entry points.

A name that resolves to nothing, or a plug-in that cannot be imported, raises the caller's error type (one of
ours, so the CLI prints one ``error:`` line naming the import problem). A plug-in module is searched on
``sys.path`` and then, as ``python -m`` does, in the working folder: ``--reward mymod:fn`` finds ``./mymod.py``
from the ``diffalign`` command too.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from .config import ConfigError, ObjectiveConfig

BUILTIN_OBJECTIVES = {
    "dpo": "diffalign.objectives.dpo:DPO",
    "mapo": "diffalign.objectives.mapo:MaPO",
    "inpo": "diffalign.objectives.inpo:InPO",
    "smpo": "diffalign.objectives.smpo:SmPO",
    "kto": "diffalign.objectives.kto:KTO",
    "d3po": "diffalign.objectives.d3po:D3PO",
    "ddpo": "diffalign.objectives.ddpo:DDPO",
    "grpo": "diffalign.objectives.grpo:GRPO",
    "reward_backprop": "diffalign.objectives.reward_backprop:RewardBackprop",
}


class ObjectiveNameError(ConfigError, KeyError):
    """``objective.name`` resolves to nothing or cannot be imported. Also a ``KeyError`` (what name lookups
    raised before), with the plain message as its text."""

    __str__ = Exception.__str__  # not KeyError's repr() of the message


def _on_path(folder: str) -> bool:
    here = os.path.realpath(folder)
    return any(os.path.realpath(p or os.curdir) == here for p in sys.path)


def import_module(module: str) -> ModuleType:
    """``importlib.import_module``, falling back to the working folder (appended to ``sys.path``, where it then
    stays, as ``python -m`` keeps it) when the top-level package is found nowhere on ``sys.path``. Appended, not
    prepended: files in the working folder never shadow installed packages imported later."""
    top, cwd = module.partition(".")[0], os.getcwd()
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != top:  # the plug-in was found; something it imports is missing
            raise
        searched = _on_path(cwd)
    if not searched:
        sys.path.append(cwd)
        importlib.invalidate_caches()
        try:
            return importlib.import_module(module)
        except BaseException as e:
            sys.path.remove(cwd)
            if not isinstance(e, ModuleNotFoundError) or e.name != top:
                raise
    raise ModuleNotFoundError(f"No module named {top!r} (looked on sys.path and in the working folder {cwd}; "
                              "for a module elsewhere, add its folder to PYTHONPATH)", name=top)


def resolve(name: str, builtins: dict[str, str], group: str, what: str,
            error: type[Exception] = ObjectiveNameError) -> Any:
    """Resolve ``name`` as a built-in, an ``entry point`` of ``group``, or ``"pkg.mod:attr"``; a name that
    resolves to nothing, or an import that fails, raises ``error`` naming the problem."""
    target = builtins.get(name)
    if target is None:
        found = [ep for ep in entry_points(group=group) if ep.name == name]
        if found:
            try:
                return found[0].load()
            except (ImportError, AttributeError) as e:
                raise error(f"{what} {name!r} (entry point {found[0].value}) cannot be imported: {e}") from None
    target = target or name
    if ":" not in target:
        known = sorted(set(builtins) | {ep.name for ep in entry_points(group=group)})
        raise error(f"unknown {what} {name!r}; choose one of {', '.join(known)} or give 'package.module:attr'")
    module, attr = target.split(":", 1)
    try:
        obj = import_module(module)
    except ImportError as e:
        raise error(f"{what} {name!r} cannot be imported: {e}") from None
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise error(f"{what} {name!r} cannot be imported: {e}") from None
    return obj


def objective_class(name: str | ObjectiveConfig):
    """The objective class named by ``name`` (or by an :class:`ObjectiveConfig`'s ``name``), resolved without
    building anything."""
    name = name if isinstance(name, str) else name.name
    return resolve(name, BUILTIN_OBJECTIVES, "diffalign.objectives", "objective", error=ObjectiveNameError)


def build_objective(cfg: ObjectiveConfig, num_timesteps: int = 1000):
    """The objective of ``cfg``, built as ``Class(cfg.options, num_timesteps=T)``: the plug-in contract."""
    return objective_class(cfg.name)(cfg.options, num_timesteps=num_timesteps)
