"""Rollouts for online objectives: DDIM sampling with η > 0 and classifier-free guidance, keeping every step.

K images per prompt start from one shared initial latent ``x_T`` (so their differences come from the sampling
noise alone, as D3PO requires); every step stores ``x_t`` and ``x_{t-1}`` (as ``latents[:, :, j]`` and
``latents[:, :, j + 1]``), its timestep and its log-probability. The conditioning is stored once per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..models import Backbone, Conditioning
from ..training.logprob import ddim_step_log_prob
from .settings import Sampling


@dataclass
class Rollouts:
    """Trajectories of K samples for each of P prompts, S denoising steps, on the CPU in fp32."""

    prompts: list[str]
    latents: Tensor  # [P, K, S + 1, C, h, w]: x_T, ..., x_0
    timesteps: Tensor  # [S], the DDIM timesteps in sampling order
    log_probs: Tensor  # [P, K, S], log π(x_{t-1} | x_t) of the sampling policy
    cond: Conditioning  # one row per prompt
    negative: Conditioning  # one row: the unconditional branch of CFG
    images: Tensor | None = None  # [P, K, 3, H, W] in [0, 1]

    @property
    def per_prompt(self) -> int:
        return self.latents.shape[1]

    def save(self, path: str | Path) -> None:
        """Write every tensor to one safetensors file (prompts in the metadata); atomic."""
        import json

        from ..files import atomic_save_safetensors

        tensors = {"latents": self.latents, "timesteps": self.timesteps, "log_probs": self.log_probs,
                   **_flat_cond("cond", self.cond), **_flat_cond("negative", self.negative)}
        if self.images is not None:
            tensors["images"] = self.images
        atomic_save_safetensors(path, tensors, metadata={"prompts": json.dumps(self.prompts)})

    @classmethod
    def load(cls, path: str | Path) -> Rollouts:
        import json

        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(prompts, t["latents"], t["timesteps"], t["log_probs"], _unflat_cond("cond", t),
                   _unflat_cond("negative", t), t.get("images"))


def _flat_cond(prefix: str, c: Conditioning) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in vars(c).items() if v is not None}


def _unflat_cond(prefix: str, tensors: dict[str, Tensor]) -> Conditioning:
    return Conditioning(**{k: tensors.get(f"{prefix}.{k}") for k in ("prompt_embeds", "pooled", "time_ids")})


def ddim_scheduler(backbone: Backbone, num_steps: int):
    """A DDIM scheduler with the base model's noise schedule, set to ``num_steps`` steps.

    Two settings are forced, whatever the base model's scheduler config says (SDXL ships an Euler config, and
    ``DDIMScheduler.from_config`` then fills in DDIM's own defaults): ``clip_sample=False`` (latents are not
    images in [-1, 1]) and ``set_alpha_to_one=False`` (with ā_prev = 1 the last step has no noise, so its
    log-probability is undefined); SD1.5's config already has both."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(backbone.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(num_steps)
    return scheduler


def guided_prediction(backbone: Backbone, unet, x: Tensor, t: Tensor, cond: Conditioning, negative: Conditioning,
                      guidance: float) -> Tensor:
    """CFG: ``ε_u + w (ε_c - ε_u)`` with both branches in one UNet call; ``w <= 1``: the conditional branch only,
    as diffusers' pipelines do. ``cond`` has one row per sample; ``negative`` one row, broadcast."""
    if guidance <= 1.0:
        return backbone.predict(x, t, cond, unet=unet)
    both = Conditioning(*(None if c is None else torch.cat([n.expand_as(c), c])
                          for c, n in ((cond.prompt_embeds, negative.prompt_embeds), (cond.pooled, negative.pooled),
                                       (cond.time_ids, negative.time_ids))))
    uncond, conditional = backbone.predict(torch.cat([x, x]), torch.cat([t, t]), both, unet=unet).chunk(2)
    return uncond + guidance * (conditional - uncond)


@torch.no_grad()
def sample_rollouts(backbone: Backbone, unet, prompts: list[str], cond: Conditioning, negative: Conditioning,
                    per_prompt: int, sampling: Sampling, resolution: int, generator: torch.Generator,
                    decode: bool = True, autocast=None, shared_noise: bool = True) -> Rollouts:
    """Sample ``per_prompt`` trajectories for each prompt from one shared ``x_T`` per prompt (see module doc), with
    ``sampling``'s steps, guidance and η (:meth:`~Sampling.trajectory_eta`), square at ``resolution``. ``cond``
    holds one row per prompt and ``negative`` one row (the negative prompt's); noise comes from ``generator`` (on
    the CPU); ``autocast`` is a factory of a fresh autocast context (e.g. ``accelerator.autocast``).
    ``shared_noise=False``: every sample starts from its own x_T (DDPO, GRPO by default)."""
    import contextlib

    dev = next(unet.parameters()).device
    num_steps, guidance, eta = sampling.steps, sampling.guidance, sampling.trajectory_eta()
    scheduler = ddim_scheduler(backbone, num_steps)
    n, k = len(prompts), per_prompt
    channels, size = unet.config.in_channels, resolution // backbone.vae_scale_factor
    x_T = torch.randn((n, 1 if shared_noise else k, channels, size, size), generator=generator)
    x_T = x_T.expand(n, k, channels, size, size)
    x = x_T.reshape(n * k, channels, size, size).to(dev) * scheduler.init_noise_sigma
    cond_k = cond.select(torch.arange(n).repeat_interleave(k)).to(dev)
    negative = negative.to(dev)
    trajectory, log_probs = [x.float().cpu()], []
    for t in scheduler.timesteps:
        t_batch = t.expand(n * k).to(dev)
        with autocast() if autocast else contextlib.nullcontext():
            eps = guided_prediction(backbone, unet, x, t_batch, cond_k, negative, guidance)
        x, logp = ddim_step_log_prob(scheduler, eps.float(), t_batch, x.float(), eta=eta, generator=generator)
        trajectory.append(x.float().cpu())
        log_probs.append(logp.float().cpu())
    images = backbone.decode(x).cpu().reshape(n, k, 3, resolution, resolution) if decode else None
    latents = torch.stack(trajectory, dim=1).reshape(n, k, num_steps + 1, channels, size, size)
    return Rollouts(list(prompts), latents, scheduler.timesteps.cpu(), torch.stack(log_probs, 1).reshape(n, k, -1),
                    cond.to("cpu"), negative.to("cpu"), images)
