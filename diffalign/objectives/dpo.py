"""Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908).

    inside = -(β/2) · [(e_θ^w - e_θ^l) - (e_ref^w - e_ref^l)]
    loss   = mean over pairs of -logsigmoid(inside)

β multiplies per-pixel *mean* squared errors with the 1/2 factor (β = 5000 here is diffusers' 2500
without it). Variants on ``h = (e_ref^w - e_ref^l) - (e_θ^w - e_θ^l)``: hinge ``relu(1 - β·h)`` and
ipo ``(h - 1/(2β))²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_choice, check_positive, option
from .base import PairErrors, pair_metrics

__all__ = ["DPO", "DPOOptions", "LOSS_TYPES", "dpo_loss"]

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class DPOOptions:
    beta: float = option(5000.0, "β on per-pixel mean squared errors with the 1/2 factor (the sigmoid loss at 5000 "
                                 "equals diffusers' --beta_dpo 2500); hinge and ipo use β as diffusers does.")
    loss_type: str = option("sigmoid", f"Diffusion-DPO variant: {', '.join(LOSS_TYPES)} (sigmoid: the paper).")

    def __post_init__(self) -> None:
        check_positive("objective", "beta", self.beta)
        check_choice("objective", "loss_type", self.loss_type, LOSS_TYPES)


def dpo_loss(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor,
             beta: float = 5000.0, loss_type: str = "sigmoid") -> tuple[Tensor, dict[str, float]]:
    """Diffusion-DPO loss from per-pair errors (each shape [B], fp32). Returns ``(loss, metrics)``."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    h = ref_diff - model_diff
    inside = 0.5 * beta * h  # = -(β/2)·(model_diff - ref_diff)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    metrics = pair_metrics(loss, model_err_w, model_err_l, ref_err_w, ref_err_l, inside)
    return loss, metrics


class DPO:
    """Diffusion-DPO with forward noising on human-labelled pairs, reference = adapters off."""

    Options = DPOOptions
    needs_reference = True
    noising = "forward"
    data = "pairs"

    def __init__(self, options: DPOOptions, num_timesteps: int = 1000):
        self.options, self.beta, self.loss_type = options, options.beta, options.loss_type

    def __call__(self, errors: PairErrors) -> tuple[Tensor, dict[str, float]]:
        return dpo_loss(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, self.beta, self.loss_type)
