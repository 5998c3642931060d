"""Image grids a person can read: small images (the 32 px testbed) are enlarged with nearest-neighbour sampling
(pixels stay sharp, nothing is invented) and each row carries its label."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(rows: dict[str, list[Image.Image]], min_cell: int = 128, gap: int = 4) -> Image.Image:
    """One row per entry of ``rows`` (label -> images, all the same size), the label written at the left; images
    smaller than ``min_cell`` px are enlarged by a whole factor with nearest-neighbour sampling."""
    if not rows or not all(rows.values()):
        raise ValueError("labelled_grid needs at least one row with at least one image")
    w, h = next(iter(rows.values()))[0].size
    k = max(1, math.ceil(min_cell / max(1, min(w, h))))
    cw, ch = w * k, h * k
    font = _font(max(12, min(28, ch // 6)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(measure.textlength(label, font=font) for label in rows) + 2 * gap + 8
    cols = max(len(images) for images in rows.values())
    grid = Image.new("RGB", (int(label_w) + cols * (cw + gap), len(rows) * (ch + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        top = gap + r * (ch + gap)
        draw.text((gap + 4, top + ch // 2), label, fill="black", font=font, anchor="lm")
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cw, ch), Image.NEAREST), (int(label_w) + c * (cw + gap), top))
    return grid
