"""Validation images during training: a stock pipeline around the UNet being trained."""

from __future__ import annotations

import torch
from PIL import Image

from ..config import ModelConfig
from ..models import Backbone, Conditioning
from ..sampling.settings import Sampling
from . import stock_pipeline


@torch.no_grad()
def validation_images(model: ModelConfig, unet, backbone: Backbone, cond: Conditioning, negative: Conditioning,
                      sampling: Sampling, resolution: int, device) -> list[Image.Image]:
    """One image per row of ``cond`` (seed ``sampling.seed + i``), drawn as ``sampling`` says (its size defaulting
    to the training ``resolution``), from the base model's own pipeline class with ``unet`` and ``backbone.vae``;
    prompts (and the negative prompt in ``negative``) go in as embeddings, so no text encoder is loaded."""
    pipe = stock_pipeline(model.pretrained, unet=unet, vae=backbone.vae, with_text_encoders=False,
                          revision=model.revision)
    kw = backbone.pipeline_embeds(cond, negative)
    draw = {k: v for k, v in sampling.pipeline_kwargs(resolution).items() if k != "negative_prompt"}
    images = []
    was_training = unet.training
    unet.eval()
    try:
        for i in range(len(cond.prompt_embeds)):
            one = {k: v[i : i + 1].to(device) for k, v in kw.items()}
            images += pipe(**one, generator=torch.Generator().manual_seed(sampling.seed + i), **draw).images
    finally:
        unet.train(was_training)
    return images
