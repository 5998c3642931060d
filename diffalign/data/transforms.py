"""Paired transforms: the winner and the loser of a pair get the *same* resize, crop and flip.

The crop offset and the flip are drawn once per pair from ``(seed, row)``, not per epoch, so a latent cache
holds exactly what raw-image training would see.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as TF


@dataclass
class PairedImages:
    winner: Tensor  # [3, R, R] in [-1, 1]
    loser: Tensor | None  # None for an unpaired image
    geometry: Tensor  # (orig_h, orig_w, crop_top, crop_left): SDXL's size/crop conditioning


def _to_tensor(img: Image.Image) -> Tensor:
    return TF.to_tensor(img) * 2 - 1


def paired_transform(winner: Image.Image, loser: Image.Image | None, resolution: int, seed: int, row: int,
                     random_flip: bool = True, center_crop: bool = False) -> PairedImages:
    """Resize the loser to the winner's size, resize both (short side = ``resolution``), crop a square at
    one offset and flip both or neither. Without a loser (unpaired data) the winner alone, the same way."""
    rng = random.Random(f"{seed}:{row}")
    orig_w, orig_h = winner.size
    unpaired = loser is None
    loser = winner if unpaired else loser  # unpaired: transformed alike, dropped below
    if loser.size != winner.size:
        loser = loser.resize(winner.size, Image.BICUBIC)
    scale = resolution / min(orig_w, orig_h)
    new_w, new_h = max(resolution, round(orig_w * scale)), max(resolution, round(orig_h * scale))
    winner = winner.resize((new_w, new_h), Image.BICUBIC)
    loser = winner if unpaired else loser.resize((new_w, new_h), Image.BICUBIC)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    box = (left, top, left + resolution, top + resolution)
    winner, loser = winner.crop(box), loser.crop(box)
    if random_flip and rng.random() < 0.5:
        winner, loser = TF.hflip(winner), TF.hflip(loser)
    geometry = torch.tensor([orig_h, orig_w, top, left], dtype=torch.long)
    return PairedImages(_to_tensor(winner), None if unpaired else _to_tensor(loser), geometry)
