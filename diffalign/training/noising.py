"""Noising for the objectives: DDIM inversion exactly to t, with optional ReNoise refinement (InPO, SmPO).

Written from ``alphas_cumprod`` rather than ``DDIMInverseScheduler`` (whose semantics changed between diffusers
releases and whose ``clip_sample`` default corrupts SD latents). All arithmetic is fp32.

Grid convention: sample i climbs from the clean latent (ā = 1) through the shared levels ``round(j·T/n)`` below
``t_i`` and ends exactly at ``t_i``, so every gap is at most ``T/n`` (n = ``num_steps``). ``t_i = 0`` takes no
step. The official InPO code measures ε̃ at t but does not invert exactly to it: under diffusers >= 0.22 its
``DDIMInverseScheduler`` stops at the last shared level below t, under the diffusers 0.20 it pins it overshoots to
the first level >= t. We take the last step to t itself (**ours**). Because every trajectory shares its prefix, inversions with a model that does not change (the
reference) can be cached at the shared levels and finished with one live step (:func:`invert_to_shared_levels`, :func:`finish_inversion`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CLEAN = -1  # the grid level of the clean latent (ā = 1)


def grid_levels(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The shared levels ``round(j·T/n)`` for ``j = 1 .. n-1``: every inversion passes through those below its t."""
    return [round(j * num_train_timesteps / num_steps) for j in range(1, num_steps)]


def inversion_grid(timesteps: Tensor, num_train_timesteps: int, num_steps: int) -> Tensor:
    """Levels ``[K + 1, B]``: column i climbs from ``CLEAN`` through the shared levels below ``t_i`` (see
    :func:`grid_levels`) and ends exactly at ``t_i``; shorter columns are left-padded with ``CLEAN`` (identity
    steps), so a sample's inversion never depends on the rest of its batch."""
    shared = grid_levels(num_train_timesteps, num_steps)
    columns = [[] if ti == 0 else [g for g in shared if g < ti] + [ti] for ti in timesteps.long().tolist()]
    longest = max((len(c) for c in columns), default=0)
    grid = torch.full((longest + 1, len(columns)), CLEAN, dtype=torch.long)
    for i, column in enumerate(columns):
        if column:
            grid[longest + 1 - len(column):, i] = torch.tensor(column)
    return grid


def _alpha(alphas_cumprod: Tensor, levels: Tensor) -> Tensor:
    a = alphas_cumprod[levels.clamp(min=0)]
    return torch.where(levels == CLEAN, torch.ones_like(a), a).view(-1, 1, 1, 1)


def ddim_inverse_step(x: Tensor, eps: Tensor, alpha_from: Tensor, alpha_to: Tensor) -> Tensor:
    """One deterministic DDIM step up the noise levels: ``x̂0 = (x - √(1-ā_a) ε)/√ā_a``, then
    ``x_b = √ā_b x̂0 + √(1-ā_b) ε``."""
    x0 = (x - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


def _inverse_step(predict: Callable[[Tensor, Tensor], Tensor], x: Tensor, lo: Tensor, hi: Tensor, alphas: Tensor,
                  renoise_iters: int, window: tuple[int, int]) -> Tensor:
    """One (ReNoise-refined) inverse step of each sample from level ``lo`` to ``hi``; identity where they match."""
    a, b, level = _alpha(alphas, lo), _alpha(alphas, hi), hi.clamp(min=0)
    preds = [predict(x, level).float()]
    guess = ddim_inverse_step(x, preds[0], a, b)
    for _ in range(renoise_iters):
        preds.append(predict(guess, level).float())
        guess = ddim_inverse_step(x, preds[-1], a, b)
    eps = preds[0] if renoise_iters == 0 else torch.stack(preds[window[0]:window[1]]).mean(0)
    return torch.where((hi != lo).view(-1, 1, 1, 1), ddim_inverse_step(x, eps, a, b), x)


def _window(renoise_iters: int, renoise_window: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = renoise_window or (0, renoise_iters + 1)
    if not 0 <= lo < hi <= renoise_iters + 1:
        raise ValueError(f"renoise_window={renoise_window!r} must lie within [0, {renoise_iters + 1})")
    return lo, hi


def ddim_invert(predict: Callable[[Tensor, Tensor], Tensor], latents: Tensor, timesteps: Tensor,
                alphas_cumprod: Tensor, num_steps: int = 10, renoise_iters: int = 0,
                renoise_window: tuple[int, int] | None = None) -> Tensor:
    """Invert clean ``latents`` [B, C, H, W] to the noise level ``timesteps[i]`` of each sample.

    ``predict(x, t)`` returns the *noise* prediction ε̂ at per-sample timesteps ``t`` (call it under ``no_grad``):
    for a v-prediction model pass :meth:`~diffalign.models.Backbone.predict_noise`, never the raw UNet output.
    Each step predicts ε at the step's upper level on the current latent. With ``renoise_iters = K > 0``
    (ReNoise, Garibi et al. 2024) the step is refined K times: the prediction is re-evaluated at the current guess
    of the upper latent and the step redone from the fixed lower latent; the predictions with indices in
    ``renoise_window`` (default: all K + 1) are averaged for the final step. SmPO uses K = 1.
    """
    alphas = alphas_cumprod.to(latents.device, torch.float32)
    grid = inversion_grid(timesteps, len(alphas_cumprod), num_steps).to(latents.device)
    window = _window(renoise_iters, renoise_window)
    x = latents.float()
    for j in range(1, len(grid)):
        x = _inverse_step(predict, x, grid[j - 1], grid[j], alphas, renoise_iters, window)
    return x


def invert_to_shared_levels(predict: Callable[[Tensor, Tensor], Tensor], latents: Tensor, alphas_cumprod: Tensor,
                            num_steps: int = 10, renoise_iters: int = 0,
                            renoise_window: tuple[int, int] | None = None) -> Tensor:
    """The inversion of ``latents`` at every shared level (:func:`grid_levels`): ``[B, n - 1, C, H, W]``, the
    part of every trajectory that :func:`finish_inversion` can reuse for any t."""
    alphas = alphas_cumprod.to(latents.device, torch.float32)
    window = _window(renoise_iters, renoise_window)
    x, out, level = latents.float(), [], torch.full((len(latents),), CLEAN, device=latents.device)
    for g in grid_levels(len(alphas_cumprod), num_steps):
        nxt = torch.full_like(level, g)
        x = _inverse_step(predict, x, level, nxt, alphas, renoise_iters, window)
        out.append(x)
        level = nxt
    return torch.stack(out, dim=1)


def finish_inversion(predict: Callable[[Tensor, Tensor], Tensor], latents: Tensor, shared: Tensor, timesteps: Tensor,
                     alphas_cumprod: Tensor, num_steps: int = 10, renoise_iters: int = 0,
                     renoise_window: tuple[int, int] | None = None) -> Tensor:
    """:func:`ddim_invert` from a stored :func:`invert_to_shared_levels` result: start at the highest shared level
    below each t (the clean latent if none) and take the one remaining step to t."""
    alphas = alphas_cumprod.to(latents.device, torch.float32)
    levels = torch.tensor(grid_levels(len(alphas_cumprod), num_steps), device=latents.device)
    t = timesteps.to(latents.device).long()
    below = (levels[None, :] < t[:, None]).sum(1)  # how many shared levels lie below t
    start = torch.where(below > 0, levels[(below - 1).clamp(min=0)], torch.full_like(t, CLEAN))
    x = torch.where((below > 0).view(-1, 1, 1, 1), shared[torch.arange(len(t)), (below - 1).clamp(min=0)].float(),
                    latents.float())
    end = torch.where(t == 0, torch.full_like(t, CLEAN), t)
    return _inverse_step(predict, x, start, end, alphas, renoise_iters, _window(renoise_iters, renoise_window))


def inverted_noise(latents: Tensor, inverted: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The noise that takes ``latents`` to ``inverted`` at ``timesteps``: ``(x̃_t - √ā_t z) / √(1-ā_t)``."""
    a = alphas_cumprod.to(latents.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    return (inverted.float() - a.sqrt() * latents.float()) / (1 - a).sqrt()
