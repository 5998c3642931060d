"""MaPO (Hong et al., arXiv 2406.06424): margin-aware preference optimisation, reference-free.

    f(u)   = u / (exp(u) - 1),  f(0) = 1
    margin = f(s·e_θ^w) - f(s·e_θ^l)
    loss   = mean(e_θ^w) - β · mean(logsigmoid(T · margin))

The first term is the plain denoising loss on winners. f is evaluated with ``expm1`` (and its series near 0), and
the per-pair margin in float64: the official code's fp32 ``exp(u) - 1`` loses ~2% of the loss to cancellation at
e ≈ 0.005.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_positive, option
from .base import PairErrors, pair_metrics


@dataclass
class MaPOOptions:
    beta: float = option(0.1, "β of the margin term.")
    mapo_scale: float = option(0.5, "s in f(s·e) (the official code's snr_value).")

    def __post_init__(self) -> None:
        check_positive("objective", "beta", self.beta)
        check_positive("objective", "mapo_scale", self.mapo_scale)


def mapo_f(u: Tensor) -> Tensor:
    """u / (exp(u) - 1), stable at and near 0 (series 1 - u/2 + u²/12 for |u| < 1e-4)."""
    small = u.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(u), u)
    series = 1 - u / 2 + u * u / 12
    return torch.where(small, series, safe / torch.expm1(safe))


def mapo_loss(model_err_w: Tensor, model_err_l: Tensor, beta: float = 0.1, scale: float = 0.5,
              num_timesteps: int = 1000) -> tuple[Tensor, dict[str, float]]:
    """MaPO loss from per-pair policy errors (each shape [B], fp32). Returns ``(loss, metrics)``."""
    # f(u) ≈ 1 - u/2: the margin is a difference of two numbers near 1, multiplied by T. On B scalars float64 is
    # free and keeps the loss within 1e-7 of the exact value (fp32 with expm1 alone: ~1e-5; MPS has no float64).
    wide = torch.float64 if model_err_w.device.type != "mps" else torch.float32
    margin = mapo_f(scale * model_err_w.to(wide)) - mapo_f(scale * model_err_l.to(wide))
    inside = num_timesteps * margin
    loss = (model_err_w.to(wide).mean() - beta * F.logsigmoid(inside).mean()).float()
    metrics = pair_metrics(loss, model_err_w, model_err_l, None, None, inside)
    return loss, metrics


class MaPO:
    """MaPO: forward noising, one UNet pass on the 2B batch, no reference pass."""

    Options = MaPOOptions
    needs_reference = False
    noising = "forward"
    data = "pairs"

    def __init__(self, options: MaPOOptions, num_timesteps: int = 1000):
        self.options, self.beta, self.scale = options, options.beta, options.mapo_scale
        self.num_timesteps = num_timesteps

    def __call__(self, errors: PairErrors) -> tuple[Tensor, dict[str, float]]:
        return mapo_loss(errors.model_w, errors.model_l, self.beta, self.scale, self.num_timesteps)
