"""Reward heads: one signature, ``reward(images [B,3,H,W] in [0,1], prompts) -> Tensor[B]``.

Name a head by built-in name (:data:`BUILTIN_REWARDS`), by ``"package.module:attr"`` (a class, built with the
given keyword arguments, or a plain function), or by an entry point in the ``diffalign.rewards`` group.
"""

from __future__ import annotations

from ..registry import resolve
from .base import (
    FunctionReward,
    RewardError,
    RewardModel,
    as_reward,
    pareto_dominates,
    pareto_preference,
    score,
    weighted_sum,
)

BUILTIN_REWARDS = {
    "clip": "diffalign.rewards.clip:ClipScore",
    "aesthetic": "diffalign.rewards.clip:Aesthetic",
    "pickscore": "diffalign.rewards.clip:PickScore",
    "brightness": "diffalign.rewards.simple:Brightness",
    "jpeg_compressibility": "diffalign.rewards.simple:JpegCompressibility",
    "jpeg_incompressibility": "diffalign.rewards.simple:JpegIncompressibility",
}


def load_reward(name: str, **kwargs) -> RewardModel:
    """Build the reward head ``name`` (classes get ``kwargs``; plain functions are wrapped)."""
    obj = resolve(name, BUILTIN_REWARDS, "diffalign.rewards", "reward")
    if isinstance(obj, type):
        return as_reward(obj(**kwargs))
    if kwargs:
        raise RewardError(f"reward {name!r} is a function; it takes no keyword arguments (got {sorted(kwargs)})")
    return FunctionReward(obj, name=name.split(":")[-1])


__all__ = ["BUILTIN_REWARDS", "FunctionReward", "RewardError", "RewardModel", "as_reward", "load_reward",
           "pareto_dominates", "pareto_preference", "score", "weighted_sum"]
