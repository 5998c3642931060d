"""Proxy rewards that need no model: JPEG (in)compressibility and brightness."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor


def _jpeg_kb(images: Tensor, quality: int = 95) -> Tensor:
    sizes = []
    for img in images:
        arr = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes)


class JpegCompressibility:
    """-(JPEG size in kB) at quality 95: smaller files score higher (scale: -kB)."""

    name, differentiable, higher_is_better = "jpeg_compressibility", False, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return -_jpeg_kb(images)


class JpegIncompressibility:
    """JPEG size in kB at quality 95: larger files score higher (scale: kB)."""

    name, differentiable, higher_is_better = "jpeg_incompressibility", False, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return _jpeg_kb(images)


class Brightness:
    """Mean pixel value (scale: 0-1); differentiable."""

    name, differentiable, higher_is_better = "brightness", True, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.float().mean(dim=(1, 2, 3))
