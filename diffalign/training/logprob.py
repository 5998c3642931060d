"""The log-probability of one DDIM step (DDPO, Black et al. 2023; used by D3PO).

For a ``DDIMScheduler`` after ``set_timesteps(N)``, model output ε̂ (after CFG), timestep t, sample x_t, η > 0:

    t_prev = t - T/N                    (ā_prev = final_alpha_cumprod where t_prev < 0, as diffusers does)
    x̂0     = (x_t - sqrt(1-ā_t) ε̂) / sqrt(ā_t)      (v- and sample-prediction as in ``DDIMScheduler.step``)
    σ²     = (1-ā_prev)/(1-ā_t) · (1 - ā_t/ā_prev),   std = η σ
    μ      = sqrt(ā_prev) x̂0 + sqrt(1 - ā_prev - std²) ε̂
    log p  = mean over non-batch dims of  -(x_{t-1} - μ)²/(2 std²) - log std - ½ log 2π

Sampling draws ``x_{t-1} = μ + std·z``; a given ``prev_sample`` is scored instead. ``x_{t-1}`` is detached, so
gradients flow through μ only. Timesteps may differ per sample.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..objectives.base import STEP_WEIGHTINGS


def _per_sample(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    return values.to(t.device)[t].view(-1, *[1] * (ndim - 1))


def ddim_step_log_prob(scheduler, model_output: Tensor, timestep: Tensor | int, sample: Tensor, eta: float = 1.0,
                       prev_sample: Tensor | None = None, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor]:
    """``(x_{t-1}, log p(x_{t-1} | x_t))`` of one DDIM step, the log-probability per sample ([B], fp32)."""
    mean, std = ddim_step_distribution(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    prev = prev_sample.detach().float()
    return prev.to(sample.dtype), gaussian_log_prob(prev, mean, std)


def gaussian_log_prob(prev: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(prev; mean, std²)`` averaged over the non-batch dims ([B]); ``prev`` is detached."""
    prev = prev.detach().float()
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, mean.dim())))


def step_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL of two Gaussian DDIM steps with one std: ``||μ - μ_ref||² / (2σ²)`` averaged over the non-batch dims."""
    return (((mean - ref_mean) ** 2) / (2 * std**2)).mean(dim=tuple(range(1, mean.dim())))


def _every_step(scheduler, output: float, eta: float) -> tuple[Tensor, Tensor]:
    """``(μ, std)`` ([steps, 1, 1, 1]) of every DDIM step of ``scheduler`` from x_t = 0 with a constant model
    ``output``: the schedule's own per-step numbers."""
    zeros = torch.zeros(len(scheduler.timesteps), 1, 1, 1)
    return ddim_step_distribution(scheduler, torch.full_like(zeros, output), scheduler.timesteps, zeros, eta)


def step_stds(scheduler, eta: float = 1.0) -> Tensor:
    """The noise std ``η σ_t`` of each DDIM step of ``scheduler`` ([steps], in the order of its timesteps)."""
    return _every_step(scheduler, 0.0, eta)[1].flatten()


def ddim_step_distribution(scheduler, model_output: Tensor, timestep: Tensor | int, sample: Tensor,
                           eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(μ, std)`` of the Gaussian DDIM step ``p(x_{t-1} | x_t)`` (the module doc's arithmetic), fp32; std has
    shape [B, 1, ...]."""
    if eta <= 0:
        raise ValueError(f"eta={eta!r}: the DDIM step log-probability needs eta > 0 (eta = 0 is deterministic)")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("the scheduler has no timesteps; call scheduler.set_timesteps(num_steps) first")
    cfg = scheduler.config
    x, out = sample.float(), model_output.float()
    t = torch.as_tensor(timestep, device=x.device).long().reshape(-1).expand(len(x))
    t_prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(x.device, torch.float32)
    a_t = _per_sample(alphas, t, x.dim())
    a_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)],
                         torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=x.device))
    a_prev = a_prev.view(-1, *[1] * (x.dim() - 1))
    if cfg.prediction_type == "epsilon":
        x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    elif cfg.prediction_type == "v_prediction":
        x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
    elif cfg.prediction_type == "sample":
        x0, eps = out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"prediction_type={cfg.prediction_type!r} is not supported")
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    if (std <= 0).any():
        raise ValueError(f"timestep(s) {t[(std <= 0).flatten()].tolist()} have no noise (ā_prev = 1): build the "
                         "DDIMScheduler with set_alpha_to_one=False so every step has a log-probability")
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def output_gains(scheduler, eta: float = 1.0) -> Tensor:
    """``|∂μ/∂(model output)|`` of each DDIM step of ``scheduler`` ([steps]): how far the step's mean moves per
    unit of model output, in the scheduler's own parametrisation (μ is affine in the output, so the difference of
    two steps one unit apart is exact)."""
    return (_every_step(scheduler, 1.0, eta)[0] - _every_step(scheduler, 0.0, eta)[0]).abs().flatten()


def step_weights(scheduler, eta: float, rule: str, steps: list[int]) -> Tensor:
    """The weight of each DDIM step's loss ([len(scheduler.timesteps)]) under ``objective.step_weighting``.

    ``none``: 1 (the papers). ``epsilon``: ``|∂μ/∂ε| / |∂μ/∂(output)|``, scaled to mean 1 over the trained
    ``steps``: each step's log-probability gradient gets the size relative to the other steps that an ε-prediction
    model's has. Exactly 1 on ε-prediction models (where DDPO, D3PO and GRPO were made); on a v-prediction
    schedule the early, layout-setting steps move μ ~100× less per unit of output than the last ones, so without
    it they get almost no gradient."""
    if rule not in STEP_WEIGHTINGS:
        raise ValueError(f"step weighting {rule!r} is not one of {STEP_WEIGHTINGS}")
    n = len(scheduler.timesteps)
    if rule == "none" or scheduler.config.prediction_type == "epsilon":
        return torch.ones(n)
    from diffusers import DDIMScheduler

    as_epsilon = DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon")
    as_epsilon.set_timesteps(scheduler.num_inference_steps)
    ratio = output_gains(as_epsilon, eta) / output_gains(scheduler, eta)
    return ratio / ratio[steps].mean()
