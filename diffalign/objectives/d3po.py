"""D3PO (Yang et al., CVPR 2024, arXiv 2311.13231): DPO on each denoising step of online rollouts.

For step j of a pair whose winner w and loser l share the initial latent, with ``log π(x_{t-1} | x_t)`` the DDIM
step log-probability (:mod:`diffalign.training.logprob`):

    r_i    = clamp(exp(log π_θ(i) - log π_ref(i)), 1 - ε, 1 + ε)      for i in {w, l}
    loss_j = -logsigmoid(β · (log r_w - log r_l))        (times the step's weight under ``step_weighting``)

ε = 0.1, β = 0.1. The clamp zeroes the gradient of a ratio outside the band (the policy may not move further
from the reference on that step). Steps are separate losses combined by gradient accumulation (the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError, check_positive, option
from ..rewards.combine import pairs_from_scores, signed
from .base import (
    GUARD_HELP,
    GUARD_MARGIN_HELP,
    GUARD_OPTIONS_HELP,
    MIN_STEP_STD_HELP,
    STEP_WEIGHTING_HELP,
    StepLogProbs,
    check_guard,
    check_step_weighting,
    implicit_accuracy,
)


def d3po_step_loss(logp_w: Tensor, ref_logp_w: Tensor, logp_l: Tensor, ref_logp_l: Tensor, beta: float = 0.1,
                   clip: float = 0.1, weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Mean over the batch of the per-step D3PO loss (each input shape [B], fp32; ``weight`` each pair's step
    weight, default 1). Returns ``(loss, metrics)``."""
    log_r_w = torch.clamp(torch.exp(logp_w - ref_logp_w), 1 - clip, 1 + clip).log()
    log_r_l = torch.clamp(torch.exp(logp_l - ref_logp_l), 1 - clip, 1 + clip).log()
    inside = beta * (log_r_w - log_r_l)
    per_pair = -F.logsigmoid(inside)
    loss = (per_pair if weight is None else weight.float() * per_pair).mean()
    ratio = torch.cat([logp_w - ref_logp_w, logp_l - ref_logp_l]).detach().exp()
    metrics = {"loss": loss.item(), "log_ratio_w": (logp_w - ref_logp_w).mean().item(),
               "log_ratio_l": (logp_l - ref_logp_l).mean().item(), "margin": inside.mean().item(),
               # the ratios the clamp cuts: exactly those outside [1 - ε, 1 + ε] (no gradient through them)
               "clip_frac": ((ratio < 1 - clip) | (ratio > 1 + clip)).float().mean().item(),
               "implicit_acc": implicit_accuracy(inside.detach()).item()}
    return loss, metrics


def rollout_pairs(scores: Tensor, higher_is_better: list[bool] | None = None) -> list[tuple[int, int, int]]:
    """``(prompt, winner, loser)`` for every ordered pair of one prompt's samples where the winner Pareto-dominates
    (≥ on every head, > on one; with one head: simply higher). ``scores`` is [P, K, H]. Ties and trade-offs give
    no pair, so they contribute no gradient."""
    s = signed(scores, higher_is_better)
    return [(p, i, j) for p in range(s.shape[0]) for i, j in pairs_from_scores(s[p], "pareto")]


@dataclass
class D3POOptions:
    beta: float = option(0.1, "β on the difference of the clamped per-step log-ratios.")
    reward: list[str] = option([], "Online: reward head(s) that label rollouts (several: Pareto dominance).")
    reward_options: list[str] = option([], "Online: head keyword arguments as HEAD.KEY=VALUE strings.")
    clip_range: float = option(0.1, "ε of the ratio clamp [1-ε, 1+ε].")
    per_prompt: int = option(2, "Online: trajectories per prompt, all from one initial latent.")
    prompts_per_round: int = option(20, "Online: prompts sampled per round by each process (the paper: 10 prompts x "
                                        "2 batches).")
    timestep_fraction: float = option(1.0, "Fraction of each trajectory's steps trained (a random subset per pair).")
    min_step_std: float = option(0.0, MIN_STEP_STD_HELP)
    step_weighting: str = option("none", STEP_WEIGHTING_HELP)
    eval_every: int = option(0, "Online: mean reward (and guard) on data.eval_prompts every N rounds (0: never).")
    guard: list[str] = option([], GUARD_HELP)
    guard_options: list[str] = option([], GUARD_OPTIONS_HELP)
    guard_margin: float = option(0.0, GUARD_MARGIN_HELP)

    def __post_init__(self) -> None:
        check_positive("objective", "beta", self.beta)
        if not 0 < self.clip_range < 1:
            raise ConfigError(f"objective.clip_range={self.clip_range!r} must be in (0, 1)", ("objective.clip_range",))
        check_positive("objective", "prompts_per_round", self.prompts_per_round)
        if self.per_prompt < 2:
            raise ConfigError(f"objective.per_prompt={self.per_prompt!r} must be >= 2 (a pair needs two samples)",
                              ("objective.per_prompt",))
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"objective.timestep_fraction={self.timestep_fraction!r} must be in (0, 1]",
                              ("objective.timestep_fraction",))
        check_positive("objective", "eval_every", self.eval_every, allow_zero=True)
        check_positive("objective", "min_step_std", self.min_step_std, allow_zero=True)
        check_step_weighting(self)
        check_guard(self)


class D3PO:
    """D3PO on online rollouts (or stored, human-labelled ones); reference = adapters off."""

    Options = D3POOptions
    needs_reference = True
    noising = "rollout"
    data = "rollouts"

    def __init__(self, options: D3POOptions, num_timesteps: int = 1000):
        self.options, self.beta, self.clip = options, options.beta, options.clip_range

    def __call__(self, logps: StepLogProbs) -> tuple[Tensor, dict[str, float]]:
        return d3po_step_loss(logps.policy_w, logps.ref_w, logps.policy_l, logps.ref_l, self.beta, self.clip,
                              logps.weight)
