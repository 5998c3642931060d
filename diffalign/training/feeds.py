"""Feeds: where the trainer's micro-batches come from and how a micro-batch becomes a loss.

The trainer owns the loop, optimization, guards, checkpoints, logging and validation; it holds one feed, chosen by
the objective's ``data`` declaration. A feed reads its data (bad data fails before any model loads), loads the
backbone, builds the objective, and then yields the micro-batches of an epoch (or online round) from a position,
computes a micro-batch's loss with the objective, and saves and restores its own state inside a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch

from ..config import Config
from ..models import Backbone


class Feed(Protocol):
    """What the trainer needs from a kind of training data."""

    backbone: Backbone
    objective: object  # an :class:`~diffalign.objectives.base.Objective`
    resolution: int
    vae_device: torch.device  # where the VAE waits between validation grids
    window: int  # micro-batches per optimizer update, per train.grad_accum

    def ready(self) -> None:
        """Called once the trainer has encoded what it needs (validation prompts): free and place the parts."""

    def batches(self, epoch: int, skip: int = 0) -> Iterable[dict]:
        """The micro-batches of epoch (or round) ``epoch`` on this process, without the first ``skip``."""

    def loss(self, unet, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective's loss and metrics for one micro-batch; ``unet`` is the accelerate-wrapped policy."""

    def take_metrics(self) -> dict[str, float]:
        """Metrics to log once with the next optimizer step (e.g. a round's reward and timings), then cleared."""

    def save(self, folder: Path) -> None:
        """Write the feed's own state into a checkpoint folder being written."""

    def restore(self, folder: Path, epoch: int) -> None:
        """Read it back on resume (``epoch``: the checkpoint's epoch or round)."""

    # Optional (the online feeds): ``final_evaluation(epoch) -> dict[str, float]``, the evaluation of the final
    # adapter (mean reward and reward-hacking guard, which may raise GuardFell) after the last step, at position
    # ``epoch``; the trainer adds it to the last step's metrics.


def feed_class(data: str) -> type:
    """The feed for an objective's ``data`` declaration."""
    if data in ("pairs", "soft_pairs"):
        from .pairs import PairFeed

        return PairFeed
    if data == "unpaired":
        from .unpaired import UnpairedFeed

        return UnpairedFeed
    if data == "rollouts":
        from .rollouts import RolloutFeed

        return RolloutFeed
    if data == "rewarded_rollouts":
        from .rewarded import RewardedRolloutFeed

        return RewardedRolloutFeed
    if data == "prompts":
        from .backprop import RewardBackpropFeed

        return RewardBackpropFeed
    raise ValueError(f"objective data={data!r}: no feed for it; choose pairs, soft_pairs, unpaired, "
                     "rollouts, rewarded_rollouts or prompts")


def make_feed(cfg: Config, accelerator, weight_dtype: torch.dtype, objective_cls) -> Feed:
    """The feed the objective's ``data`` names, built (data read, backbone loaded, objective built)."""
    return feed_class(objective_cls.data)(cfg, accelerator, weight_dtype, objective_cls)
