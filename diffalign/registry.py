"""Name -> object lookups: built-in names, ``"package.module:attr"`` paths and entry points."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from .config import ObjectiveConfig

BUILTIN_OBJECTIVES = {
    "dpo": "diffalign.objectives.dpo:DPO",
    "mapo": "diffalign.objectives.mapo:MaPO",
    "inpo": "diffalign.objectives.inpo:InPO",
    "smpo": "diffalign.objectives.smpo:SmPO",
    "d3po": "diffalign.objectives.d3po:D3PO",
}


def resolve(name: str, builtins: dict[str, str], group: str, what: str) -> Any:
    """Resolve ``name`` as a built-in, an ``entry point`` of ``group``, or ``"pkg.mod:attr"``."""
    target = builtins.get(name)
    if target is None:
        found = [ep for ep in entry_points(group=group) if ep.name == name]
        if found:
            return found[0].load()
    target = target or name
    if ":" not in target:
        known = sorted(set(builtins) | {ep.name for ep in entry_points(group=group)})
        raise KeyError(f"unknown {what} {name!r}; choose one of {', '.join(known)} or give 'package.module:attr'")
    module, attr = target.split(":", 1)
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"{what} {name!r} cannot be imported: {e}") from None
    return obj


def objective_class(cfg: ObjectiveConfig):
    """The objective class named by ``cfg.name`` (resolved without building anything)."""
    return resolve(cfg.name, BUILTIN_OBJECTIVES, "diffalign.objectives", "objective")


def build_objective(cfg: ObjectiveConfig, num_timesteps: int = 1000):
    """The objective named by ``cfg.name``, built as ``Class(cfg, num_timesteps=T)``."""
    return objective_class(cfg)(cfg, num_timesteps=num_timesteps)
