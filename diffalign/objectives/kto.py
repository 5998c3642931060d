"""Diffusion-KTO (Li et al., NeurIPS 2024, arXiv 2404.04465): alignment from unpaired likes and dislikes.

    g    = e_ref - e_θ                                   per image (denoising-error improvement over the reference)
    kl   = max(0, mean of g over the batch and every process)   the reference point, detached
    h    = sigmoid(sgn · (β/2) · (g - kl))               sgn = +1 desirable, -1 undesirable
    loss = mean(w_y · (1 - h))                           w_y = λ_D (desirable) or λ_U (undesirable)

β carries the 1/2 factor of our Diffusion-DPO convention (β multiplies per-pixel mean squared errors with 1/2), so
β = 2000 here is the official code's ``--beta_dpo 1000`` (which has no 1/2). The reference point is the global
mean over processes (a sum and a count all-reduced), which equals the official mean of per-process means when every
process holds the same batch size. The gradient never flows through ``kl`` (the official ``.detach()``): it is a
baseline, not a term to optimise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import ConfigError, check_positive, option
from .base import ImageErrors

__all__ = ["KTO", "KTOOptions", "kto_loss", "reference_point"]


@dataclass
class KTOOptions:
    beta: float = option(2000.0, "β on per-pixel mean squared errors with the 1/2 factor (2000 equals the official "
                                 "code's --beta_dpo 1000, which has no 1/2).")
    lambda_desirable: float = option(1.0, "λ_D, the weight of desirable images' loss (the paper's default 1).")
    lambda_undesirable: float = option(1.0, "λ_U, the weight of undesirable images' loss (the paper's default 1).")
    desirable_share: float | None = option(None, "Class-balanced sampling: draw images with replacement so this share "
                                                 "of each epoch is desirable (the official sampler; its example run "
                                                 "0.8). Unset: every image once per epoch in a random order.")

    def __post_init__(self) -> None:
        check_positive("objective", "beta", self.beta)
        check_positive("objective", "lambda_desirable", self.lambda_desirable)
        check_positive("objective", "lambda_undesirable", self.lambda_undesirable)
        if self.desirable_share is not None and not 0 < self.desirable_share < 1:
            raise ConfigError(f"objective.desirable_share={self.desirable_share!r} must be in (0, 1), or unset",
                              ("objective.desirable_share",))


def reference_point(g: Tensor) -> Tensor:
    """``max(0, mean g)`` over this batch and, under torch.distributed, every process's batch; detached."""
    total = torch.stack([g.detach().sum(), torch.tensor(float(len(g)), device=g.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).clamp(min=0)


def kto_loss(model_err: Tensor, ref_err: Tensor, desirable: Tensor, beta: float = 2000.0,
             lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0,
             kl: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Diffusion-KTO loss from per-image errors (each [B], fp32) and labels (bool [B]). ``kl`` defaults to
    :func:`reference_point` of ``g``. Returns ``(loss, metrics)``."""
    desirable = desirable.bool()
    g = ref_err - model_err
    kl = reference_point(g) if kl is None else kl.detach()
    sgn = desirable.float() * 2 - 1
    z = sgn * (0.5 * beta) * (g - kl)
    weight = torch.where(desirable, torch.full_like(g, lambda_desirable), torch.full_like(g, lambda_undesirable))
    loss = (weight * (1 - torch.sigmoid(z))).mean()

    def mean_of(mask: Tensor) -> float:
        return g[mask].mean().item() if mask.any() else float("nan")

    metrics = {"loss": loss.item(), "kl": kl.item(), "g_desirable": mean_of(desirable),
               "g_undesirable": mean_of(~desirable), "implicit_acc": (z > 0).float().mean().item(),
               "desirable_share": desirable.float().mean().item(), "err_policy": model_err.mean().item(),
               "err_ref": ref_err.mean().item()}
    return loss, metrics


class KTO:
    """Diffusion-KTO with forward noising (a timestep and a noise per image) on unpaired labelled images, reference =
    adapters off."""

    Options = KTOOptions
    needs_reference = True
    noising = "forward"
    data = "unpaired"

    def __init__(self, options: KTOOptions, num_timesteps: int = 1000):
        self.options, self.beta = options, options.beta

    def __call__(self, errors: ImageErrors) -> tuple[Tensor, dict[str, float]]:
        o = self.options
        return kto_loss(errors.model, errors.ref, errors.desirable, o.beta, o.lambda_desirable, o.lambda_undesirable)
