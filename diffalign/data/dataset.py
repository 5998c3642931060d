"""Torch datasets over preference pairs: raw images (decoded and transformed per item) and the encoded
form the trainer consumes (latents + text conditioning)."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from ..models import Backbone, Conditioning
from .readers import BadImageError, PairSource, decode_image
from .transforms import paired_transform

log = logging.getLogger(__name__)


class RawPairDataset(Dataset):
    """Item ``i``: both images of pair ``i`` after the paired transform, its caption and geometry."""

    def __init__(self, source: PairSource, resolution: int, seed: int, random_flip: bool = True,
                 center_crop: bool = False):
        self.source = source
        self.resolution = resolution
        self.seed = seed
        self.random_flip = random_flip
        self.center_crop = center_crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        row = self.source.rows[i]
        pair = self.source.get(row)
        where = f"{self.source.name}, row {row}"
        winner = decode_image(pair.winner, f"{where} (preferred image)")
        loser = decode_image(pair.loser, f"{where} (rejected image)")
        images = paired_transform(winner, loser, self.resolution, self.seed, row, self.random_flip, self.center_crop)
        item = {"pixels_w": images.winner, "pixels_l": images.loser, "geometry": images.geometry,
                "caption": pair.caption, "row": row}
        if pair.score_w is not None and pair.score_l is not None:
            item["scores"] = torch.tensor([pair.score_w, pair.score_l], dtype=torch.float32)
        return item

    def drop_bad_rows(self, policy: str) -> int:
        """Decode every pair once; drop (``policy="skip"``) or raise on (``"error"``) undecodable rows."""
        bad = []
        for i in range(len(self)):
            try:
                pair = self.source[i]
                decode_image(pair.winner, "")
                decode_image(pair.loser, "")
            except BadImageError:
                if policy == "error":
                    self[i]  # re-raise with the row and which image named
                bad.append(self.source.rows[i])
        if bad:
            log.warning("%s: skipped %d pair(s) with undecodable images (rows %s%s)", self.source.name, len(bad),
                        ", ".join(map(str, bad[:10])), ", ..." if len(bad) > 10 else "")
            self.source.rows = [r for r in self.source.rows if r not in set(bad)]
        return len(bad)


@torch.no_grad()
def encode_batch(backbone: Backbone, batch: dict, resolution: int) -> dict:
    """Turn a collated raw batch into the encoded batch the trainer uses: latents of both images, the
    caption's conditioning (with SDXL time ids from each pair's geometry), rows and optional scores."""
    cond = backbone.encode_prompt(list(batch["caption"]))
    out = {
        "latents_w": backbone.encode_images(batch["pixels_w"]),
        "latents_l": backbone.encode_images(batch["pixels_l"]),
        "prompt_embeds": cond.prompt_embeds.float().cpu(),
        "geometry": batch["geometry"],
        "row": torch.as_tensor(batch["row"]),
    }
    out["latents_w"], out["latents_l"] = out["latents_w"].cpu(), out["latents_l"].cpu()
    if cond.pooled is not None:
        out["pooled"] = cond.pooled.float().cpu()
    if "scores" in batch:
        out["scores"] = batch["scores"]
    return out


def batch_conditioning(backbone: Backbone, batch: dict, resolution: int) -> Conditioning:
    """The :class:`Conditioning` of an encoded batch."""
    time_ids = backbone.time_ids(batch["geometry"], resolution)
    return Conditioning(batch["prompt_embeds"], batch.get("pooled"), time_ids)
