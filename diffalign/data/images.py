"""Decoding one image of a dataset row: bytes, a path, a datasets image dict or a PIL image in, 8-bit RGB out.
16/32-bit images are scaled by their real range; transparent pixels are composited on :data:`BACKGROUND`."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


class BadImageError(DataError):
    """One image of one row cannot be decoded."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """An 8-bit ``L`` image from a 16/32-bit one (modes ``I;16*``, ``I``, ``F``), scaled by its real range:
    ``I;16`` by 65535 -> 255; ``I`` and ``F`` by the range their values fit (8 bit, 16 bit, or for ``F`` also
    [0, 1]), and min-max otherwise."""
    a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        a = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif not (lo >= 0 and hi <= 255):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB of ``img`` and what was done beyond a plain conversion: ``"converted"`` (16/32-bit) or
    ``"composited"`` (transparent pixels laid on :data:`BACKGROUND`)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _to_8bit(img).convert("RGB"), "converted"
    transparency = getattr(img, "has_transparency_data", "transparency" in img.info)  # Pillow < 10.1: no attribute
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or transparency:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB"), "composited"
        return rgba.convert("RGB"), None
    return img.convert("RGB"), None


def decode_image_noted(value: Any, where: str) -> tuple[Image.Image, str | None]:
    """:func:`decode_image` and what it did beyond a plain RGB conversion (``"converted"``, ``"composited"``)."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict):  # datasets Image feature without decoding
            img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        else:
            img = Image.open(value)
        img.load()
        return _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, KeyError, TypeError) as e:
        detail = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise BadImageError(f"{where}: cannot decode image ({detail})") from None


def decode_image(value: Any, where: str) -> Image.Image:
    """A fully decoded RGB PIL image from bytes, a path, a datasets image dict or a PIL image. 16/32-bit images
    are scaled to 8 bits by their real range; transparent pixels are composited on white (:data:`BACKGROUND`)."""
    return decode_image_noted(value, where)[0]
