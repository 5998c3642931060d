"""The reward-hacking guard of the online objectives (reward backprop, D3PO, DDPO, GRPO).

``objective.guard`` heads are not trained on: they are scored on the evaluation images (one fixed-noise sample per
``data.eval_prompts`` prompt, every ``objective.eval_every`` updates or rounds) and logged as ``eval_guard_<head>``.
When a head's mean falls more than ``objective.guard_margin`` below its first evaluation, the evaluation raises
:class:`GuardFell`, carrying the adapter of the last evaluation where every head held: the trainer hands that one
back, so what a guarded run writes is never the adapter that fell. The first evaluation, before any training, is
the baseline: a run that falls at its second evaluation hands back the untrained adapter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import Config, ConfigError
from ..files import atomic_write_text
from ..lora import peft_state
from ..rewards import load_rewards, parse_reward_options, score
from .guards import TrainingStopped

log = logging.getLogger(__name__)
GUARD_FILE = "guard.json"
HELD_FILE = "guard_held_adapter.safetensors"


class GuardFell(TrainingStopped):
    """A guard head fell past its margin; ``adapter`` is the LoRA state (peft naming) of the last evaluation where
    every head held, taken at feed position ``epoch`` (an update of reward backprop, a round otherwise)."""

    def __init__(self, message: str, adapter: dict[str, torch.Tensor], epoch: int):
        super().__init__(message)
        self.adapter, self.epoch = adapter, epoch


class RewardGuard:
    """The guard heads of a run, their first evaluation and the adapter of the last evaluation that held."""

    def __init__(self, cfg: Config):
        o = cfg.objective.options
        names = getattr(o, "guard", [])  # a plug-in online objective may not have the guard options
        if names and not (cfg.data.eval_prompts and o.eval_every):
            raise ConfigError(f"objective.guard={names}: a guard is scored on the evaluation images, so it needs "
                              f"data.eval_prompts (now {cfg.data.eval_prompts!r}) and objective.eval_every > 0 (now "
                              f"{o.eval_every})", ("objective.guard",))
        self.heads = load_rewards(names, parse_reward_options(o.guard_options)) if names else {}
        self.margin = getattr(o, "guard_margin", 0.0)
        self.baseline: dict[str, float] = {}
        self.held: tuple[int, dict[str, torch.Tensor]] | None = None  # (epoch, adapter) of the last evaluation held

    def check(self, images: torch.Tensor, prompts: list[str], unet, epoch: int) -> dict[str, float]:
        """``eval_guard_<head>`` of the evaluation ``images`` [B, 3, H, W] of ``prompts``, made by ``unet`` at feed
        position ``epoch``. Raises :class:`GuardFell` when a head fell past the margin; otherwise, with a margin,
        keeps a copy of the adapter as the one to hand back."""
        metrics, fell = {}, []
        for name, head in self.heads.items():
            mean = score(head, images, prompts, name).mean().item()
            metrics[f"eval_guard_{name}"] = mean
            sign = 1.0 if head.higher_is_better else -1.0  # a fall is always a loss of quality
            first = self.baseline.setdefault(name, sign * mean)
            if first - sign * mean > self.margin > 0:
                fell.append(f"{name!r} fell from {sign * first:.4g} to {mean:.4g}")
            elif first - sign * mean > 0:
                log.info("guard %s: %.4g (first evaluation %.4g)", name, mean, sign * first)
        if fell:
            message = (f"reward-hacking guard {', '.join(fell)} on data.eval_prompts (more than "
                       f"objective.guard_margin={self.margin:g}); stopped")
            if self.held is None:  # resumed from a checkpoint that kept the baseline alone: nothing to hand back
                raise TrainingStopped(f"{message}; no evaluation since the resume held, so no adapter is written "
                                      "(the checkpoints hold the earlier weights)")
            raise GuardFell(message, self.held[1], self.held[0])
        if self.heads and self.margin > 0:
            self.held = (epoch, peft_state(unet))
        return metrics

    def save(self, folder: Path) -> None:
        """The first evaluation (what a fall is measured from) and the adapter to hand back, for an exact resume."""
        if not self.heads:
            return
        state = {"baseline": self.baseline, "held_epoch": self.held[0] if self.held else None}
        if self.held is not None:
            save_file(self.held[1], str(folder / HELD_FILE))
        atomic_write_text(folder / GUARD_FILE, json.dumps(state))

    def restore(self, folder: Path) -> None:
        if not self.heads or not (folder / GUARD_FILE).is_file():
            return
        state = json.loads((folder / GUARD_FILE).read_text())
        if "baseline" not in state:  # a checkpoint of the release before the held adapter: the baseline alone
            state = {"baseline": state, "held_epoch": None}
        self.baseline = state["baseline"]
        if state["held_epoch"] is not None:
            self.held = (state["held_epoch"], load_file(str(folder / HELD_FILE)))
