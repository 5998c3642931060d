"""GRPO for UNet diffusion (DanceGRPO arXiv 2505.07818, Flow-GRPO arXiv 2505.05470, after DeepSeekMath's GRPO):
PPO's clipped surrogate on each denoising step, with advantages relative to a group of samples of one prompt.

Each prompt is sampled G times (``group_size``; the group may share x_T, ``shared_noise``). For sample i of a
group, with ``r`` the rewards of its group:

    A_i    = (r_i - mean(r)) / (std(r) + 1e-4)           (population std; equal rewards give A = 0)
    ratio  = exp(log p_θ(x_{t-1} | x_t) - log p_old(x_{t-1} | x_t))
    loss_j = mean(w_j · max(-A · ratio, -A · clamp(ratio, 1 - ε, 1 + ε))) + kl_beta · mean(KL_j)
    KL_j   = ||μ_θ - μ_ref||² / (2 σ_t²), averaged over latent elements (the Gaussian DDIM steps share σ_t)

w_j is the step's weight under ``step_weighting`` (1 by default, and on ε-prediction models). Several reward
heads: the weighted sum of each head's group-normalised advantage. Each group trains on the same random
``timestep_fraction`` of its steps (DanceGRPO trains 60%). Advantages are also clamped to
``[-adv_clip_max, adv_clip_max]`` as in DDPO and Flow-GRPO (with G samples |A| <= sqrt(G - 1), so the clamp only
acts for groups larger than 26 at the default 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ConfigError, check_positive, option
from .base import (
    GUARD_HELP,
    GUARD_MARGIN_HELP,
    GUARD_OPTIONS_HELP,
    MIN_STEP_STD_HELP,
    STEP_WEIGHTING_HELP,
    StepRatios,
)
from .ddpo import check_rollout_options, clipped_surrogate


def group_advantages(rewards: Tensor, groups: Tensor, eps: float = 1e-4) -> Tensor:
    """``(r_i - mean_g) / (std_g + eps)`` within each group id of ``groups`` [N] (population std), for rewards
    [N]; a group whose rewards are all equal gets 0."""
    r = rewards.double()
    out = torch.zeros_like(r)
    for g in torch.unique(groups):
        mine = groups == g
        group = r[mine]
        out[mine] = (group - group.mean()) / (group.std(unbiased=False) + eps)
    return out.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4,
              adv_clip_max: float = 5.0, kl: Tensor | None = None, kl_beta: float = 0.0,
              weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """GRPO's per-step loss (inputs [B] for one denoising step; ``kl`` the per-sample KL to the reference;
    ``weight`` each sample's step weight on the surrogate, not on the KL)."""
    adv = torch.clamp(advantages.float(), -adv_clip_max, adv_clip_max)
    loss, metrics = clipped_surrogate(log_prob.float(), old_log_prob.float(), adv, clip_range, weight)
    metrics["advantage"] = adv.abs().mean().item()
    if kl is not None:
        kl_mean = kl.float().mean()
        metrics["kl"] = kl_mean.item()
        if kl_beta:
            loss = loss + kl_beta * kl_mean
            metrics["loss"] = loss.item()
    return loss, metrics


@dataclass
class GRPOOptions:
    reward: list[str] = option([], "Reward head(s) that score the rollouts (several: the weighted sum of each "
                                   "head's group-normalised advantage).")
    reward_options: list[str] = option([], "Head keyword arguments as HEAD.KEY=VALUE strings.")
    reward_weights: list[float] = option([], "Weights of the heads (empty: all 1; lower-is-better heads count "
                                             "negated).")
    group_size: int = option(8, "G: samples per prompt, the group its advantages are relative to.")
    shared_noise: bool = option(False, "The G samples of a group start from one x_T (false: each its own).")
    clip_range: float = option(1e-4, "ε of the ratio clip [1-ε, 1+ε].")
    adv_clip_max: float = option(5.0, "Advantages are clamped to [-adv_clip_max, adv_clip_max].")
    kl_beta: float = option(0.0, "Weight of the KL of each step to the reference (adapters off); 0: no reference "
                                 "pass.")
    prompts_per_round: int = option(4, "Prompts (groups) drawn per round by each process.")
    num_inner_epochs: int = option(1, "Passes over a round's samples, each in a new order.")
    timestep_fraction: float = option(0.6, "Fraction of the steps trained, one random subset per group (DanceGRPO: "
                                           "60%).")
    min_step_std: float = option(0.0, MIN_STEP_STD_HELP)
    step_weighting: str = option("none", STEP_WEIGHTING_HELP)
    eval_every: int = option(0, "Mean reward (and guard) on data.eval_prompts every N rounds (0: never).")
    guard: list[str] = option([], GUARD_HELP)
    guard_options: list[str] = option([], GUARD_OPTIONS_HELP)
    guard_margin: float = option(0.0, GUARD_MARGIN_HELP)

    @property
    def per_prompt(self) -> int:
        return self.group_size

    def __post_init__(self) -> None:
        check_rollout_options(self)
        if self.group_size < 2:
            raise ConfigError(f"objective.group_size={self.group_size!r} must be >= 2 (advantages are relative to "
                              "the group)", ("objective.group_size",))
        check_positive("objective", "kl_beta", self.kl_beta, allow_zero=True)


class GRPO:
    """GRPO on online rollouts; the reference (adapters off) only when ``kl_beta > 0``."""

    Options = GRPOOptions
    noising = "rollout"
    data = "rewarded_rollouts"
    same_steps_in_group = True  # all G samples of a group train on the same subset of steps

    def __init__(self, options: GRPOOptions, num_timesteps: int = 1000):
        self.options = options
        self.needs_reference = options.kl_beta > 0

    def advantages(self, prompts: list[str], rewards: Tensor, groups: Tensor) -> Tensor:
        """Advantages [N] from signed rewards [N, heads]: each head normalised within its group, then summed with
        ``reward_weights``."""
        weights = self.options.reward_weights or [1.0] * rewards.shape[-1]
        per_head = torch.stack([group_advantages(rewards[:, h].float(), groups) for h in range(rewards.shape[-1])], -1)
        return (per_head * torch.tensor(weights, dtype=per_head.dtype)).sum(-1)

    def __call__(self, step: StepRatios) -> tuple[Tensor, dict[str, float]]:
        o = self.options
        return grpo_loss(step.log_prob, step.old_log_prob, step.advantages, o.clip_range, o.adv_clip_max, step.kl,
                         o.kl_beta, step.weight)
