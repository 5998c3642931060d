"""D3PO (Yang et al., CVPR 2024, arXiv 2311.13231): DPO on each denoising step of online rollouts.

For step j of a pair whose winner w and loser l share the initial latent, with ``log π(x_{t-1} | x_t)`` the DDIM
step log-probability (:mod:`diffalign.logprob`):

    r_i    = clamp(exp(log π_θ(i) - log π_ref(i)), 1 - ε, 1 + ε)      for i in {w, l}
    loss_j = -logsigmoid(β · (log r_w - log r_l))

ε = 0.1, β = 0.1. The clamp zeroes the gradient of a ratio outside the band (the policy may not move further
from the reference on that step). Steps are separate losses combined by gradient accumulation (the trainer).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ObjectiveConfig
from ..rewards.base import pareto_dominates
from .base import StepLogProbs, implicit_accuracy


def d3po_step_loss(logp_w: Tensor, ref_logp_w: Tensor, logp_l: Tensor, ref_logp_l: Tensor, beta: float = 0.1,
                   clip: float = 0.1) -> tuple[Tensor, dict[str, float]]:
    """Mean over the batch of the per-step D3PO loss (each input shape [B], fp32). Returns ``(loss, metrics)``."""
    log_r_w = torch.clamp(torch.exp(logp_w - ref_logp_w), 1 - clip, 1 + clip).log()
    log_r_l = torch.clamp(torch.exp(logp_l - ref_logp_l), 1 - clip, 1 + clip).log()
    inside = beta * (log_r_w - log_r_l)
    loss = -F.logsigmoid(inside).mean()
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
    signs = torch.tensor([1.0 if h else -1.0 for h in (higher_is_better or [True] * scores.shape[-1])])
    s = scores.float() * signs
    return [(p, i, j) for p in range(s.shape[0]) for i, j in itertools.permutations(range(s.shape[1]), 2)
            if pareto_dominates(s[p, i], s[p, j])]


class D3PO:
    """D3PO on online rollouts (or stored, human-labelled ones); reference = adapters off."""

    needs_reference = True
    noising = "rollout"
    data = "rollouts"

    default_beta = 0.1

    def __init__(self, cfg: ObjectiveConfig, num_timesteps: int = 1000):
        self.beta = cfg.beta if cfg.beta is not None else self.default_beta
        self.clip = cfg.clip_range

    def __call__(self, logps: StepLogProbs) -> tuple[Tensor, dict[str, float]]:
        return d3po_step_loss(logps.policy_w, logps.ref_w, logps.policy_l, logps.ref_l, self.beta, self.clip)
