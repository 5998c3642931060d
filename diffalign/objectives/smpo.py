"""SmPO (Lu et al., ICML 2025, arXiv 2506.02698): smoothed preference labels on ReNoise-inverted latents.

With reward scores normalised on the training set, ``n = (s - s_min)/(s_max - s_min)``, the winner is the image
with the higher reward, ``p = sigmoid(n_w - n_l)`` and the InPO loss uses ``β·γ·(2p - 1)`` in place of β:

    inside = -(β·γ·(2p-1)/2) · [(e_θ^w - e_θ^l) - (e_ref^w - e_ref^l)],   loss = mean(-logsigmoid(inside))

Equal rewards give zero gradient. The trainer normalises the scores (``data = "soft_pairs"``) and inverts with
ReNoise (``noising = "renoise"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_positive, option
from .base import PairErrors, pair_metrics
from .inpo import InversionOptions


@dataclass
class SmPOOptions(InversionOptions):
    beta: float = option(5000.0, "β of the InPO loss (per-pixel mean errors, 1/2 factor); scaled by γ·(2p-1).")
    gamma: float = option(10.0, "Label-smoothing strength γ in β·γ·(2p-1).")
    renoise_iters: int = option(1, "ReNoise iterations K per inversion step (0 = plain DDIM inversion).")

    def __post_init__(self) -> None:
        InversionOptions.__post_init__(self)
        check_positive("objective", "beta", self.beta)
        check_positive("objective", "gamma", self.gamma)
        check_positive("objective", "renoise_iters", self.renoise_iters, allow_zero=True)


def smpo_loss(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, score_w: Tensor,
              score_l: Tensor, beta: float = 5000.0, gamma: float = 10.0) -> tuple[Tensor, dict[str, float]]:
    """SmPO loss from per-pair errors and *normalised* scores (all shape [B]); pairs whose reward disagrees with
    the label are swapped so the higher-reward image is the winner."""
    swap = score_l > score_w
    e_w, e_l = torch.where(swap, model_err_l, model_err_w), torch.where(swap, model_err_w, model_err_l)
    r_w, r_l = torch.where(swap, ref_err_l, ref_err_w), torch.where(swap, ref_err_w, ref_err_l)
    p = torch.sigmoid((score_w - score_l).abs())
    beta_eff = beta * gamma * (2 * p - 1)
    h = (r_w - r_l) - (e_w - e_l)
    inside = 0.5 * beta_eff * h
    loss = -F.logsigmoid(inside).mean()
    # accuracy from h itself: with equal rewards inside is 0 whatever the model prefers
    metrics = pair_metrics(loss, e_w, e_l, r_w, r_l, inside, preferred=h, soft_label=p, swapped=swap)
    return loss, metrics


class SmPO:
    """SmPO: soft labels from reward scores, ReNoise inversion, reference = adapters off."""

    Options = SmPOOptions
    needs_reference = True
    noising = "renoise"
    data = "soft_pairs"

    def __init__(self, options: SmPOOptions, num_timesteps: int = 1000):
        self.options, self.beta, self.gamma = options, options.beta, options.gamma

    def __call__(self, errors: PairErrors) -> tuple[Tensor, dict[str, float]]:
        if errors.score_w is None or errors.score_l is None:
            raise ValueError("smpo needs normalised reward scores for every pair (PairErrors.score_w/score_l)")
        return smpo_loss(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, errors.score_w, errors.score_l,
                         self.beta, self.gamma)
