"""Reward backprop (DRaFT-K, Clark et al., ICLR 2024, arXiv 2309.17400; AlignProp, Prabhudesai et al. 2023):
the gradient of a differentiable reward through the last K sampling steps and the VAE decode into the LoRA.

For a prompt c and x_T ~ N(0, I), sample x_T → x_0 with the policy (DDIM, CFG), the first S - K steps without
gradient and the last K with it, decode, and

    loss = - mean over the batch of  Σ_h w_h · r_h(decode(x_0), c)

K = ``backprop_steps`` (DRaFT-K; 1 is DRaFT-1), or, with ``backprop_steps_max`` > ``backprop_steps``, drawn
uniformly from [backprop_steps, backprop_steps_max] per micro-batch (AlignProp's randomised truncation). Every
head must be differentiable (a JPEG head is refused by name). The UNet calls of the K steps and the decode run
under gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ConfigError, check_positive, option
from .base import GUARD_HELP, GUARD_MARGIN_HELP, GUARD_OPTIONS_HELP, check_guard, check_reward_weights


def reward_backprop_loss(rewards: Tensor, weights: list[float] | None = None) -> tuple[Tensor, dict[str, float]]:
    """``-mean(Σ_h w_h r_h)`` of differentiable rewards [B, heads] (higher is better on every head: lower-is-better
    heads arrive negated). Returns ``(loss, metrics)``."""
    w = torch.tensor(weights or [1.0] * rewards.shape[-1], dtype=rewards.dtype, device=rewards.device)
    combined = (rewards * w).sum(dim=-1)
    loss = -combined.mean()
    return loss, {"loss": loss.item(), "reward": combined.mean().item()}


@dataclass
class RewardBackpropOptions:
    reward: list[str] = option([], "Differentiable reward head(s) to maximise (several: their weighted sum).")
    reward_options: list[str] = option([], "Head keyword arguments as HEAD.KEY=VALUE strings.")
    reward_weights: list[float] = option([], "Weights of the heads' sum (empty: all 1; lower-is-better heads count "
                                             "negated).")
    backprop_steps: int = option(1, "K: the last K sampling steps carry gradients (DRaFT-K); the others run under "
                                    "no_grad.")
    backprop_steps_max: int = option(0, "> backprop_steps: K drawn uniformly from [backprop_steps, "
                                        "backprop_steps_max] per micro-batch (AlignProp); 0: K fixed.")
    checkpointing: bool = option(True, "Gradient checkpointing of the K steps' UNet calls and of the VAE decode.")
    guard: list[str] = option([], GUARD_HELP)
    guard_options: list[str] = option([], GUARD_OPTIONS_HELP)
    guard_margin: float = option(0.0, GUARD_MARGIN_HELP)
    eval_every: int = option(0, "Mean reward (and guard) on data.eval_prompts every N optimizer steps (0: never).")

    def __post_init__(self) -> None:
        if self.backprop_steps < 1:
            raise ConfigError(f"objective.backprop_steps={self.backprop_steps!r} must be >= 1",
                              ("objective.backprop_steps",))
        if self.backprop_steps_max and self.backprop_steps_max < self.backprop_steps:
            raise ConfigError(f"objective.backprop_steps_max={self.backprop_steps_max!r} must be 0 or >= "
                              f"objective.backprop_steps ({self.backprop_steps})", ("objective.backprop_steps_max",))
        check_guard(self)
        check_positive("objective", "eval_every", self.eval_every, allow_zero=True)
        check_reward_weights(self)


class RewardBackprop:
    """Reward backprop through the last K sampling steps; no reference model."""

    Options = RewardBackpropOptions
    needs_reference = False
    noising = "rollout"
    data = "prompts"

    def __init__(self, options: RewardBackpropOptions, num_timesteps: int = 1000):
        self.options = options

    def steps_with_gradient(self, generator: torch.Generator) -> int:
        """K for one micro-batch."""
        o = self.options
        if o.backprop_steps_max > o.backprop_steps:
            return int(torch.randint(o.backprop_steps, o.backprop_steps_max + 1, (1,), generator=generator))
        return o.backprop_steps

    def __call__(self, rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
        return reward_backprop_loss(rewards, self.options.reward_weights or None)
