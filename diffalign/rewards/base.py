"""The reward interface: ``reward(images, prompts) -> Tensor[B]``, plus input/output checks and combinations.

``images`` is a float tensor [B, 3, H, W] in [0, 1]; ``prompts`` a list of B strings. A reward is a class with
``name``, ``differentiable`` and ``higher_is_better`` attributes, or a plain function with that signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class RewardError(ValueError):
    """Bad input to, or bad output from, a reward head; the message names the head."""


class RewardNameError(RewardError, KeyError):
    """A reward name that resolves to nothing, or a plug-in head that cannot be imported. Also a ``KeyError``
    (what name lookups raised before), with the plain message as its text."""

    __str__ = Exception.__str__  # not KeyError's repr() of the message


class RewardFailed(RewardError):
    """A reward head raised while scoring. The message names the head and the prompt(s); ``__cause__`` is the
    head's own exception, whose traceback the CLI prints below its one ``error:`` line."""


@runtime_checkable
class RewardModel(Protocol):
    name: str
    differentiable: bool
    higher_is_better: bool

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


class FunctionReward:
    """A plain ``fn(images, prompts) -> Tensor[B]`` as a :class:`RewardModel` (not differentiable unless said)."""

    def __init__(self, fn: Callable[[Tensor, list[str]], Tensor], name: str | None = None,
                 differentiable: bool = False, higher_is_better: bool = True):
        self.fn, self.name = fn, name or getattr(fn, "__name__", "reward")
        self.differentiable, self.higher_is_better = differentiable, higher_is_better

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.fn(images, prompts)


def as_reward(obj) -> RewardModel:
    """``obj`` if it already is a reward model, else a :class:`FunctionReward` around the callable."""
    if isinstance(obj, RewardModel):
        return obj
    if callable(obj):
        return FunctionReward(obj)
    raise RewardError(f"{obj!r} is not a reward: expected a RewardModel or a function (images, prompts) -> Tensor[B]")


def check_inputs(name: str, images: Tensor, prompts: Sequence[str]) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RewardError(f"reward {name!r}: images must be a tensor [B, 3, H, W], got {shape}")
    if len(prompts) != len(images):
        raise RewardError(f"reward {name!r}: {len(images)} images but {len(prompts)} prompts")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise RewardError(f"reward {name!r}: images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")


def score(reward: RewardModel, images: Tensor, prompts: Sequence[str], name: str | None = None) -> Tensor:
    """``reward(images, prompts)`` with both sides checked: a [B] float tensor of finite values. Errors name the
    head as ``name`` (the name the user gave it) or its own ``name``; a head that raises becomes
    :class:`RewardFailed`, chained to the head's exception."""
    reward = as_reward(reward)
    name = name or reward.name
    check_inputs(name, images, prompts)
    try:
        out = reward(images, list(prompts))
    except RewardError:
        raise
    except Exception as e:  # the head's own bug or failure: say which head and prompts, keep its traceback
        raise RewardFailed(f"reward head {name!r} failed on {_describe_prompts(prompts)}: "
                           f"{type(e).__name__}: {e}") from e
    if not isinstance(out, Tensor) or out.shape != (len(images),):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RewardError(f"reward {name!r} returned {shape}; expected a tensor of shape ({len(images)},)")
    if not torch.isfinite(out).all():
        raise RewardError(f"reward {name!r} returned non-finite values: {out.tolist()}")
    return out.float()


def _describe_prompts(prompts: Sequence[str], show: int = 3) -> str:
    """``prompt 'a cat'`` or ``prompts 'a cat', 'a dog' (+5 more)`` (distinct prompts, in order)."""
    distinct = list(dict.fromkeys(prompts))
    shown = ", ".join(repr(p if len(p) <= 80 else p[:77] + "...") for p in distinct[:show])
    more = f" (+{len(distinct) - show} more)" if len(distinct) > show else ""
    return f"prompt{'s' if len(distinct) > 1 else ''} {shown}{more}"


def weighted_sum(rewards: Sequence[RewardModel], weights: Sequence[float], images: Tensor,
                 prompts: Sequence[str]) -> Tensor:
    """Σ w_i · r_i(images, prompts), each head scored (and checked) by :func:`score`, then combined by
    :func:`diffalign.rewards.combine.weighted` (a weight is negated for heads where lower is better);
    differentiable through differentiable heads."""
    from .combine import weighted

    if len(rewards) != len(weights):
        raise RewardError(f"{len(rewards)} rewards but {len(weights)} weights")
    heads = [as_reward(r) for r in rewards]
    table = torch.stack([score(r, images, prompts) for r in heads], dim=-1)  # [B, H]
    return weighted(table, [r.higher_is_better for r in heads], weights)
