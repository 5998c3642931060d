"""Noising for the objectives: DDIM inversion exactly to t, with optional ReNoise refinement (InPO, SmPO).

Written from ``alphas_cumprod`` rather than ``DDIMInverseScheduler`` (whose semantics changed between diffusers
releases and whose ``clip_sample`` default corrupts SD latents). All arithmetic is fp32.

Grid convention: sample i is inverted along its own levels ``clean = g_0 < g_1 < ... < g_k = t_i`` where the
clean latent has ā = 1, ``k = ceil(t_i · num_steps / T)`` and ``g_j = round(j·t_i / k)``, so every gap is at most
``T / num_steps`` and the last level is exactly ``t_i``. ``t_i = 0`` takes no step (the latent is returned as is).
In a batch, shorter grids are padded with identity steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

CLEAN = -1  # the grid level of the clean latent (ā = 1)


def inversion_grid(timesteps: Tensor, num_train_timesteps: int, num_steps: int) -> Tensor:
    """Levels ``[K + 1, B]``: column i climbs from ``CLEAN`` to ``timesteps[i]`` exactly in its own
    ``k_i = ceil(t_i · num_steps / T)`` steps, left-padded with ``CLEAN`` (identity steps) to the batch's longest
    grid, so a sample's inversion never depends on the rest of its batch."""
    t = timesteps.long().cpu()
    k = [math.ceil(int(ti) * num_steps / num_train_timesteps) for ti in t]
    longest = max(k, default=0)
    grid = torch.full((longest + 1, len(t)), CLEAN, dtype=torch.long)
    for i, (ti, ki) in enumerate(zip(t.tolist(), k)):
        for j in range(1, ki + 1):
            grid[longest - ki + j, i] = round(j * ti / ki)
    return grid


def _alpha(alphas_cumprod: Tensor, levels: Tensor) -> Tensor:
    a = alphas_cumprod[levels.clamp(min=0)]
    return torch.where(levels == CLEAN, torch.ones_like(a), a).view(-1, 1, 1, 1)


def ddim_inverse_step(x: Tensor, eps: Tensor, alpha_from: Tensor, alpha_to: Tensor) -> Tensor:
    """One deterministic DDIM step up the noise levels: ``x̂0 = (x - √(1-ā_a) ε)/√ā_a``, then
    ``x_b = √ā_b x̂0 + √(1-ā_b) ε``."""
    x0 = (x - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


def ddim_invert(predict: Callable[[Tensor, Tensor], Tensor], latents: Tensor, timesteps: Tensor,
                alphas_cumprod: Tensor, num_steps: int = 10, renoise_iters: int = 0,
                renoise_window: tuple[int, int] | None = None) -> Tensor:
    """Invert clean ``latents`` [B, C, H, W] to the noise level ``timesteps[i]`` of each sample.

    ``predict(x, t)`` returns the noise prediction at per-sample timesteps ``t`` (call it under ``no_grad``).
    Each step predicts ε at the step's upper level on the current latent. With ``renoise_iters = K > 0``
    (ReNoise, Garibi et al. 2024) the step is refined K times: the prediction is re-evaluated at the current guess
    of the upper latent and the step redone from the fixed lower latent; the predictions with indices in
    ``renoise_window`` (default: all K + 1) are averaged for the final step. SmPO uses K = 1.
    """
    alphas = alphas_cumprod.to(latents.device, torch.float32)
    grid = inversion_grid(timesteps, len(alphas_cumprod), num_steps).to(latents.device)
    lo, hi = renoise_window or (0, renoise_iters + 1)
    if not 0 <= lo < hi <= renoise_iters + 1:
        raise ValueError(f"renoise_window={renoise_window!r} must lie within [0, {renoise_iters + 1})")
    x = latents.float()
    for j in range(1, len(grid)):
        a, b = _alpha(alphas, grid[j - 1]), _alpha(alphas, grid[j])
        level = grid[j].clamp(min=0)
        preds = [predict(x, level).float()]
        guess = ddim_inverse_step(x, preds[0], a, b)
        for _ in range(renoise_iters):
            preds.append(predict(guess, level).float())
            guess = ddim_inverse_step(x, preds[-1], a, b)
        eps = preds[0] if renoise_iters == 0 else torch.stack(preds[lo:hi]).mean(0)
        moved = (grid[j] != grid[j - 1]).view(-1, 1, 1, 1)
        x = torch.where(moved, ddim_inverse_step(x, eps, a, b), x)
    return x


def inverted_noise(latents: Tensor, inverted: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The noise that takes ``latents`` to ``inverted`` at ``timesteps``: ``(x̃_t - √ā_t z) / √(1-ā_t)``."""
    a = alphas_cumprod.to(latents.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    return (inverted.float() - a.sqrt() * latents.float()) / (1 - a).sqrt()
