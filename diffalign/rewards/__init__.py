"""Reward heads: one signature, ``reward(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]``.

Name a head by built-in name (:data:`BUILTIN_REWARDS`), by ``"package.module:attr"`` (a class, built with the
given keyword arguments, or a plain function), or by an entry point in the ``diffalign.rewards`` group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from ..registry import resolve
from .base import (
    FunctionReward,
    RewardError,
    RewardFailed,
    RewardModel,
    RewardNameError,
    as_reward,
    score,
    weighted_sum,
)
from .combine import pareto_dominates, pareto_preference

BUILTIN_REWARDS = {
    "clip": "diffalign.rewards.clip:ClipScore",
    "aesthetic": "diffalign.rewards.clip:Aesthetic",
    "pickscore": "diffalign.rewards.clip:PickScore",
    "imagereward": "diffalign.rewards.imagereward:ImageReward",
    "hps": "diffalign.rewards.hps:HPSv2",
    "brightness": "diffalign.rewards.simple:Brightness",
    "jpeg_compressibility": "diffalign.rewards.simple:JpegCompressibility",
    "jpeg_incompressibility": "diffalign.rewards.simple:JpegIncompressibility",
    "shape_size": "diffalign.testbed:ShapeSize",
    "vividness": "diffalign.testbed:Vividness",
    "middle_size": "diffalign.testbed:MiddleSize",
    "left_position": "diffalign.testbed:LeftPosition",
    "centredness": "diffalign.testbed:Centredness",
    "edge_sharpness": "diffalign.testbed:EdgeSharpness",
    "prompt_colours": "diffalign.testbed:PromptColours",
}


def load_reward(name: str, **kwargs) -> RewardModel:
    """Build the reward head ``name`` (classes get ``kwargs``; plain functions are wrapped)."""
    obj = resolve(name, BUILTIN_REWARDS, "diffalign.rewards", "reward", error=RewardNameError)
    if isinstance(obj, type):
        try:
            return as_reward(obj(**kwargs))
        except TypeError as e:  # a wrong or missing keyword argument
            raise RewardError(f"reward {name!r}: {e}") from None
    if kwargs:
        raise RewardError(f"reward {name!r} is a function; it takes no keyword arguments (got {sorted(kwargs)})")
    return FunctionReward(obj, name=name.split(":")[-1])


def split_names(names: str | Sequence[str]) -> list[str]:
    """``"clip,aesthetic"`` or ``["clip", "aesthetic"]`` -> ``["clip", "aesthetic"]`` (an error when empty)."""
    out = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n and n.strip()]
    if not out:
        raise RewardError("no reward named; give one or more of " + ", ".join(sorted(BUILTIN_REWARDS)))
    return out


def parse_reward_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["aesthetic.weights=sac.pth"]`` -> ``{"aesthetic": {"weights": "sac.pth"}}``; values are read as YAML.

    The head is everything before the last dot of the key, so import paths (``pkg.mod:attr.key=v``) work too."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        head, dot, arg = key.rpartition(".")
        if not eq or not dot or not head or not arg:
            raise RewardError(f"reward option {item!r}: expected HEAD.KEY=VALUE, e.g. aesthetic.weights=sac.pth")
        options.setdefault(head, {})[arg] = yaml.safe_load(value) if value else ""
    return options


def load_rewards(names: str | Sequence[str], options: dict[str, dict[str, Any]] | None = None) -> dict[str, RewardModel]:
    """The heads ``names`` (see :func:`split_names`), keyed by the name given, each built with ``options[name]``."""
    names, options = split_names(names), dict(options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise RewardError(f"options given for reward(s) {', '.join(stray)} that are not used (rewards: {', '.join(names)})")
    return {name: load_reward(name, **options.get(name, {})) for name in names}


__all__ = ["BUILTIN_REWARDS", "FunctionReward", "RewardError", "RewardFailed", "RewardModel", "RewardNameError", "as_reward", "load_reward", "load_rewards",
           "parse_reward_options", "split_names",
           "pareto_dominates", "pareto_preference", "score", "weighted_sum"]
