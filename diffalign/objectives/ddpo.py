"""DDPO (Black et al., ICLR 2024, arXiv 2305.13301), the PPO form ("DDPO_IS"): policy gradient on each denoising
step of online rollouts, with importance ratios clipped as in PPO.

For step j of a trajectory with advantage A and the log-probability ``log p_old`` stored when it was sampled:

    A      = clamp(A, -adv_clip_max, adv_clip_max)
    ratio  = exp(log p_θ(x_{t-1} | x_t) - log p_old(x_{t-1} | x_t))
    loss_j = mean(max(-A · ratio, -A · clamp(ratio, 1 - ε, 1 + ε)))

(times the step's weight w_j under ``step_weighting``: 1 by default, and on ε-prediction models). ε =
``clip_range`` = 1e-4, ``adv_clip_max`` = 5. Advantages are per-prompt normalised rewards
(:class:`PerPromptStatTracker`: each prompt's recent rewards, or the whole round's until a prompt has
``min_count``), or, without tracking, the round's ``(r - mean) / (std + 1e-8)``. Steps are separate losses combined
by gradient accumulation (the trainer), as ddpo-pytorch accumulates over every trained step of a batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError, check_positive, option
from ..rewards.combine import weighted
from .base import (
    GUARD_HELP,
    GUARD_MARGIN_HELP,
    GUARD_OPTIONS_HELP,
    MIN_STEP_STD_HELP,
    STEP_WEIGHTING_HELP,
    StepRatios,
    check_guard,
    check_reward_weights,
    check_step_weighting,
)


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
                      weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped objective as a loss, ``mean(w·max(-A·r, -A·clamp(r, 1-ε, 1+ε)))`` (inputs [B], fp32; ``w``
    each sample's step weight, default 1), with ``approx_kl = ½·mean((log p_θ - log p_old)²)`` and ``clip_frac``
    (the share with ``|r - 1| > ε``)."""
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    loss = (per_sample if weight is None else weight.float() * per_sample).mean()
    d = diff.detach()
    metrics = {"loss": loss.item(), "approx_kl": 0.5 * (d**2).mean().item(),
               "clip_frac": ((d.exp() - 1).abs() > clip_range).float().mean().item(),
               "ratio": d.exp().mean().item()}
    return loss, metrics


def ddpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4,
              adv_clip_max: float = 5.0, weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """DDPO's per-step loss (each input shape [B] for one denoising step): advantages clamped to
    ``[-adv_clip_max, adv_clip_max]``, then :func:`clipped_surrogate` (``weight``: each sample's step weight).
    Returns ``(loss, metrics)``."""
    adv = torch.clamp(advantages.float(), -adv_clip_max, adv_clip_max)
    loss, metrics = clipped_surrogate(log_prob.float(), old_log_prob.float(), adv, clip_range, weight)
    metrics["advantage"] = adv.abs().mean().item()
    return loss, metrics


class PerPromptStatTracker:
    """Per-prompt reward normalisation, as ddpo-pytorch's tracker: each prompt keeps its last ``buffer_size``
    rewards; a batch's rewards of a prompt are normalised by that buffer's mean and std (+ 1e-6) once it holds
    ``min_count`` rewards, and by the whole batch's until then (population std, as ``numpy.std``)."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}
        self.own_share = 0.0  # of the last batch: the share of rewards normalised by their prompt's own buffer

    def update(self, prompts: Sequence[str], rewards) -> np.ndarray:
        """Advantages (float64, the shape of ``rewards``) of one batch; the buffers take the batch's rewards first."""
        prompts = np.array(list(prompts))
        rewards = np.asarray(rewards.detach().cpu().numpy() if isinstance(rewards, Tensor) else rewards,
                             dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        advantages, own = np.empty_like(rewards), 0
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            buffer = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(mine.tolist())
            if len(buffer) < self.min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
                own += len(mine)
            advantages[prompts == prompt] = (mine - mean) / std
        self.own_share = own / max(len(rewards), 1)
        return advantages

    def state_dict(self) -> dict:
        """The buffers, JSON-ready (a checkpoint holds them so a resume normalises the same way)."""
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {p: list(b) for p, b in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state["stats"].items()}


def batch_advantages(rewards) -> np.ndarray:
    """Without per-prompt tracking: the round's ``(r - mean) / (std + 1e-8)`` (population std)."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - r.mean()) / (r.std() + 1e-8)


@dataclass
class DDPOOptions:
    reward: list[str] = option([], "Reward head(s) that score the rollouts (several: their weighted sum).")
    reward_options: list[str] = option([], "Head keyword arguments as HEAD.KEY=VALUE strings.")
    reward_weights: list[float] = option([], "Weights of the heads' sum (empty: all 1; lower-is-better heads count "
                                             "negated).")
    clip_range: float = option(1e-4, "ε of the ratio clip [1-ε, 1+ε] (ddpo-pytorch: 1e-4).")
    adv_clip_max: float = option(5.0, "Advantages are clamped to [-adv_clip_max, adv_clip_max].")
    per_prompt_stat_tracking: bool = option(True, "Normalise rewards per prompt (buffer of its recent rewards); "
                                                  "false: by the round's mean and std.")
    stat_buffer_size: int = option(32, "Rewards kept per prompt by the tracker.")
    stat_min_count: int = option(16, "A prompt uses its own statistics once it has this many rewards; before, the "
                                     "round's, which mix the differences between prompts into the advantages "
                                     "(ddpo-pytorch: 16). Where each prompt is drawn only a few times, set it to "
                                     "per_prompt; the logged per_prompt_share says how many advantages were per "
                                     "prompt.")
    per_prompt: int = option(4, "Trajectories per prompt in a round, each from its own x_T.")
    prompts_per_round: int = option(8, "Prompts drawn per round by each process.")
    num_inner_epochs: int = option(1, "Passes over a round's samples (PPO epochs), each in a new order.")
    timestep_fraction: float = option(1.0, "Fraction of each trajectory's steps trained (a random subset per "
                                           "sample).")
    min_step_std: float = option(0.0, MIN_STEP_STD_HELP)
    step_weighting: str = option("none", STEP_WEIGHTING_HELP)
    eval_every: int = option(0, "Mean reward (and guard) on data.eval_prompts every N rounds (0: never).")
    guard: list[str] = option([], GUARD_HELP)
    guard_options: list[str] = option([], GUARD_OPTIONS_HELP)
    guard_margin: float = option(0.0, GUARD_MARGIN_HELP)

    def __post_init__(self) -> None:
        check_rollout_options(self)
        check_positive("objective", "per_prompt", self.per_prompt)
        for name in ("stat_buffer_size", "stat_min_count"):
            check_positive("objective", name, getattr(self, name))


def check_rollout_options(o) -> None:
    """Checks every policy-gradient objective's options share (DDPO, GRPO)."""
    if not 0 < o.clip_range < 1:
        raise ConfigError(f"objective.clip_range={o.clip_range!r} must be in (0, 1)", ("objective.clip_range",))
    for name in ("prompts_per_round", "num_inner_epochs"):
        check_positive("objective", name, getattr(o, name))
    check_positive("objective", "adv_clip_max", o.adv_clip_max)
    if not 0 < o.timestep_fraction <= 1:
        raise ConfigError(f"objective.timestep_fraction={o.timestep_fraction!r} must be in (0, 1]",
                          ("objective.timestep_fraction",))
    check_positive("objective", "eval_every", o.eval_every, allow_zero=True)
    check_positive("objective", "min_step_std", o.min_step_std, allow_zero=True)
    check_step_weighting(o)
    check_reward_weights(o)
    check_guard(o)


class DDPO:
    """DDPO on online rollouts; no reference model (the ratio is to the sampling policy)."""

    Options = DDPOOptions
    needs_reference = False
    noising = "rollout"
    data = "rewarded_rollouts"
    same_steps_in_group = False  # each sample trains on its own random subset of steps, as ddpo-pytorch

    def __init__(self, options: DDPOOptions, num_timesteps: int = 1000):
        self.options = options
        self.tracker = (PerPromptStatTracker(options.stat_buffer_size, options.stat_min_count)
                        if options.per_prompt_stat_tracking else None)

    def advantages(self, prompts: list[str], rewards: Tensor, groups: Tensor) -> Tensor:
        """Advantages [N] of a round's rewards [N, heads] (signed: higher is better), the heads' weighted sum
        normalised per prompt (or per round); ``groups`` (each sample's prompt index) is not needed here."""
        combined = weighted(rewards, [True] * rewards.shape[-1], self.options.reward_weights or None)
        adv = self.tracker.update(prompts, combined) if self.tracker else batch_advantages(combined)
        return torch.as_tensor(adv, dtype=torch.float32)

    def advantage_metrics(self) -> dict[str, float]:
        """Of the last round: ``per_prompt_share``, the share of its advantages normalised by their prompt's own
        statistics (the rest by the round's, which mixes the differences between prompts into them)."""
        return {"per_prompt_share": self.tracker.own_share} if self.tracker else {}

    def __call__(self, step: StepRatios) -> tuple[Tensor, dict[str, float]]:
        return ddpo_loss(step.log_prob, step.old_log_prob, step.advantages, self.options.clip_range,
                         self.options.adv_clip_max, step.weight)

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()} if self.tracker else {}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker and "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
