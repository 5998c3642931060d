"""Backbone: the one place that knows SD1.5 from SDXL.

It loads the parts of a base model, encodes prompts (one encoder, or SDXL's two with pooled embedding and
per-sample ``add_time_ids``), encodes and decodes images, and predicts noise with the UNet.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from .config import ERROR_SPACES


class ModelLoadError(RuntimeError):
    """The base model (or VAE) named in the config cannot be found or read."""


@dataclass
class Conditioning:
    """Text conditioning of a batch. SDXL also carries the pooled embedding and per-sample time ids
    (original size, crop top-left, target size)."""

    prompt_embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def _map(self, fn) -> Conditioning:
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                               for f in fields(self)})

    def to(self, device=None, dtype=None) -> Conditioning:
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def select(self, index: Tensor | list[int] | slice) -> Conditioning:
        """The rows ``index`` of every field."""
        return self._map(lambda t: t[index])

    def repeat(self, n: int) -> Conditioning:
        """Stack the batch ``n`` times: ``[c; c; ...]`` (winners and losers share one caption)."""
        return self._map(lambda t: torch.cat([t] * n))

    def where(self, mask: Tensor, other: Conditioning) -> Conditioning:
        """Per-sample choice: ``other`` where ``mask`` is true (caption dropout); time ids stay ours."""
        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.view(-1, *[1] * (a.dim() - 1)).to(a.device), b.to(a), a)

        return replace(self, prompt_embeds=pick(self.prompt_embeds, other.prompt_embeds),
                       pooled=None if self.pooled is None else pick(self.pooled, other.pooled))


def _is_local(path: str) -> bool:
    return Path(path).exists()


def model_index(pretrained: str, revision: str | None = None) -> dict:
    """The model's ``model_index.json`` (local or hub) as a dict; a one-line error when there is none."""
    from diffusers import DiffusionPipeline

    if not pretrained:
        raise ModelLoadError("model.pretrained is empty; name a hub id or a local diffusers folder")
    if _is_local(pretrained) and not (Path(pretrained) / "model_index.json").is_file():
        raise ModelLoadError(f"model.pretrained={pretrained!r}: no model_index.json there (expected a diffusers folder)")
    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision)
    except Exception as e:  # hub errors, offline mode, malformed json
        where = "no such folder, and it could not be fetched from the hub" if not _is_local(pretrained) else str(e)
        raise ModelLoadError(f"model.pretrained={pretrained!r}: {where} ({type(e).__name__})") from None
    return dict(index)


def _kind_of(index: dict) -> str:
    return "sdxl" if "text_encoder_2" in index else "sd15"


def model_kind(pretrained: str, revision: str | None = None) -> str:
    """``"sdxl"`` or ``"sd15"``, read from the model's ``model_index.json`` (local or hub)."""
    return _kind_of(model_index(pretrained, revision))


def pipeline_class(kind: str):
    """The stock diffusers pipeline class of a model kind (``"sd15"`` or ``"sdxl"``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline


def pipeline_defaults(kind: str, with_text_encoders: bool = True) -> dict:
    """Components to substitute when building a stock pipeline of ``kind``: no text encoders when they are not
    wanted (prompts given as embeddings), and no SD1.5 safety checker (it would download a model)."""
    defaults: dict = {}
    if not with_text_encoders:
        defaults["text_encoder"] = None
        if kind == "sdxl":
            defaults["text_encoder_2"] = None
    if kind == "sd15":
        defaults.update(safety_checker=None, requires_safety_checker=False)
    return defaults


def default_resolution(pretrained: str, revision: str | None = None) -> int:
    """The model's own image size, read from its configs without loading weights: UNet ``sample_size`` times
    the VAE's scale factor (512 for SD1.5, 1024 for SDXL, 32 for the testbed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model_kind(pretrained, revision)  # a clear error for a missing model first
    try:
        unet = UNet2DConditionModel.load_config(pretrained, subfolder="unet", revision=revision)
        vae = AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {pretrained!r}: cannot read the UNet/VAE configs: {e}") from None
    return _resolution(unet["sample_size"], vae["block_out_channels"])


def _resolution(sample_size, block_out_channels) -> int:
    size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return int(size) * 2 ** (len(block_out_channels) - 1)


KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version per kind


def kind_of_unet_lora(keys) -> str | None:
    """``"sdxl"`` when a UNet LoRA's key names show SDXL's added embedding, else None (undecided)."""
    return "sdxl" if any("add_embedding" in k for k in keys) else None


def model_fingerprint(pretrained: str, vae: str | None, revision: str | None) -> str:
    """A key that changes when the frozen encoders change: names, plus file sizes and times for local folders."""
    parts = [pretrained, vae or "", revision or ""]
    for root in (pretrained, vae):
        if root and _is_local(root):
            for f in sorted(Path(root).rglob("*")):
                if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
                    st = f.stat()
                    parts.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


class Backbone:
    """Frozen parts of a base model plus its UNet; ``predict`` is the only UNet call the trainer makes."""

    def __init__(self, unet, vae, text_encoders, tokenizers, scheduler, kind: str, pretrained: str = "",
                 prediction_type: str | None = None, zero_empty_negative: bool | None = None):
        self.unet = unet
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler  # the training (DDPM) noise scheduler
        self.kind = kind
        self.pretrained = pretrained
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        # SDXL pipelines default to force_zeros_for_empty_prompt: with no negative prompt the unconditional branch
        # is all zeros, not the encoded empty string.
        self.zero_empty_negative = kind == "sdxl" if zero_empty_negative is None else zero_empty_negative
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelLoadError(f"prediction_type={self.prediction_type!r} is not supported; use epsilon or v_prediction")

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def pipeline_class(self):
        """The stock diffusers pipeline class of this model."""
        return pipeline_class(self.kind)

    @property
    def default_resolution(self) -> int:
        """The model's own image size (see :func:`default_resolution`)."""
        return _resolution(self.unet.config.sample_size, self.vae.config.block_out_channels)

    def to(self, device) -> Backbone:
        """Move every loaded part (UNet, VAE, text encoders) to ``device``."""
        for part in (self.unet, self.vae, *self.text_encoders):
            part.to(device)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD1.5 and SDXL)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, pretrained: str, vae: str | None = None, prediction_type: str | None = None,
             revision: str | None = None, dtype: torch.dtype = torch.float32, text_encoders: bool = True) -> Backbone:
        """Load UNet, VAE, text encoders and tokenizers of an SD1.5 or SDXL model (weights frozen).
        ``text_encoders=False`` skips them (training from a complete cache needs none)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        index = model_index(pretrained, revision)
        kind = _kind_of(index)
        zero_empty_negative = kind == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True))
        kw = dict(revision=revision)
        try:
            scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
            if prediction_type:
                scheduler.register_to_config(prediction_type=prediction_type)
            unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=dtype, **kw)
            # SDXL's VAE overflows in fp16; it stays fp32 unless a fixed VAE is given.
            vae_dtype = dtype if (kind == "sd15" or vae) else torch.float32
            vae_model = (AutoencoderKL.from_pretrained(vae, torch_dtype=vae_dtype) if vae and not _has_subfolder(vae, "vae")
                         else AutoencoderKL.from_pretrained(vae or pretrained, subfolder="vae", torch_dtype=vae_dtype, **kw))
            tokenizers, encoders = [], []
            if text_encoders:
                tokenizers.append(CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw))
                encoders.append(CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", torch_dtype=dtype, **kw))
            if text_encoders and kind == "sdxl":
                tokenizers.append(CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw))
                encoders.append(CLIPTextModelWithProjection.from_pretrained(
                    pretrained, subfolder="text_encoder_2", torch_dtype=dtype, **kw))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"model {pretrained!r} (vae {vae!r}): cannot load a component: {e}") from None
        for m in (unet, vae_model, *encoders):
            m.requires_grad_(False)
            m.eval()
        return cls(unet, vae_model, encoders, tokenizers, scheduler, kind, pretrained, prediction_type,
                   zero_empty_negative)

    # ----- text -----
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for ``prompts`` (SD1.5: last hidden state; SDXL: both penultimate states
        concatenated plus encoder 2's pooled projection). Time ids are added per image by :meth:`time_ids`."""
        if not self.text_encoders:
            raise RuntimeError("this Backbone was loaded without text encoders; load it with text_encoders=True")
        device = self.text_encoders[0].device
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            if not self.is_sdxl:
                hidden.append(enc(ids)[0])
                continue
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def encode_negative(self, prompt: str = "") -> Conditioning:
        """The unconditional branch of CFG for ``prompt`` (one row), as the model's stock pipeline builds it: the
        encoded prompt, except SDXL with ``force_zeros_for_empty_prompt`` and no negative prompt, where it is all
        zeros (so our samplers draw what ``pipe(prompt)`` draws)."""
        cond = self.encode_prompt([prompt])
        if self.zero_empty_negative and not prompt:
            return Conditioning(torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled))
        return cond

    def time_ids(self, geometry: Tensor, resolution: int) -> Tensor | None:
        """SDXL ``add_time_ids`` [B, 6] from per-image ``(orig_h, orig_w, crop_top, crop_left)``."""
        if not self.is_sdxl:
            return None
        target = torch.tensor([resolution, resolution], dtype=geometry.dtype).expand(len(geometry), 2)
        return torch.cat([geometry, target], dim=1).float()

    def at_resolution(self, cond: Conditioning, resolution: int) -> Conditioning:
        """``cond`` with SDXL time ids for unscaled, uncropped images at ``resolution`` (SD1.5: unchanged)."""
        if not self.is_sdxl:
            return cond
        geometry = torch.tensor([[resolution, resolution, 0, 0]] * len(cond.prompt_embeds))
        return Conditioning(cond.prompt_embeds, cond.pooled, self.time_ids(geometry, resolution))

    def pipeline_embeds(self, cond: Conditioning, negative: Conditioning) -> dict[str, Tensor]:
        """The prompt-embedding keyword arguments of this model's stock pipeline call."""
        kw = {"prompt_embeds": cond.prompt_embeds, "negative_prompt_embeds": negative.prompt_embeds}
        if self.is_sdxl:
            kw.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=negative.pooled)
        return kw

    # ----- images -----
    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Latents (scaled by the VAE's factor) of ``pixels`` in [-1, 1]; the posterior mean, so a cache
        of it is exact."""
        vae = self.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        z = dist.mode().float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in [0, 1] from scaled latents; differentiable (reward backprop), so callers that only look
        run it under ``torch.no_grad()``."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.device, vae.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def free_encoders(self) -> None:
        """Drop the text encoders once everything they would compute is cached."""
        self.text_encoders = []

    # ----- noise -----
    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the UNet is trained to output: ε, or the velocity for v-prediction."""
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: Conditioning, unet=None) -> Tensor:
        """UNet output at ``(x_t, t)`` under ``cond``. ``unet`` defaults to ours (pass the accelerate-wrapped
        module when training so gradient sync happens)."""
        unet = unet or self.unet
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return unet(x_t, timesteps, encoder_hidden_states=cond.prompt_embeds, **kwargs).sample

    def denoising_error(self, x_t: Tensor, timesteps: Tensor, cond: Conditioning, target: Tensor,
                        unet=None, space: str = "prediction") -> Tensor:
        """Per-sample error ``e = mean over (C, H, W) of (prediction - target)²`` in fp32, shape [B]: what every
        pair objective and the held-out pair accuracies compare (the β convention is defined on it).

        ``space="epsilon"`` gives the error of the noise prediction instead, whatever the model outputs: for
        v-prediction ``ε = √ā v + √(1-ā) x_t`` makes ``ε̂ - ε = √ā (v̂ - v)``, so that error is ``ā_t`` times the
        v error (the same for an ε-prediction model)."""
        err = ((self.predict(x_t, timesteps, cond, unet=unet).float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        return err * self.error_weight(timesteps, space)

    def error_weight(self, timesteps: Tensor, space: str = "prediction") -> Tensor:
        """The factor per sample ([B], fp32) that turns a squared error of the model's output at ``timesteps`` into
        one in ``space`` (see :meth:`denoising_error`): ``ā_t`` from v to ε, else 1."""
        if space not in ERROR_SPACES:
            raise ValueError(f"space={space!r}; choose one of {', '.join(ERROR_SPACES)}")
        if space == "epsilon" and self.prediction_type == "v_prediction":
            return self.scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps.long()]
        return torch.ones(timesteps.shape, device=timesteps.device)

    def predict_noise(self, x_t: Tensor, timesteps: Tensor, cond: Conditioning, unet=None) -> Tensor:
        """The UNet's prediction as noise ε̂ at ``(x_t, t)``, whatever the model predicts. For v-prediction,
        ``v = √ā ε - √(1-ā) x₀`` and ``x_t = √ā x₀ + √(1-ā) ε`` give ``ε = √ā v + √(1-ā) x_t``, with ā at the level
        ``t`` the prediction was made at (DDIM inversion asks at a level above the latent's own: the same formula,
        as diffusers' DDIM steps use it). Returned in fp32."""
        out = self.predict(x_t, timesteps, cond, unet=unet).float()
        if self.prediction_type == "epsilon":
            return out
        a = self.scheduler.alphas_cumprod.to(out.device, torch.float32)[timesteps.long()].view(-1, 1, 1, 1)
        return a.sqrt() * out + (1 - a).sqrt() * x_t.float()


def _has_subfolder(path: str, name: str) -> bool:
    return _is_local(path) and (Path(path) / name).is_dir()
