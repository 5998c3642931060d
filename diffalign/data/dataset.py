"""Torch datasets over preference pairs: raw images (decoded and transformed per item) and the encoded
form the trainer consumes (latents + text conditioning); the checks of the pass that decodes every pair once."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..models import Backbone, Conditioning
from .images import BadImageError, decode_image_noted
from .readers import PairSource
from .transforms import paired_transform

log = logging.getLogger(__name__)

TINY_PX = 16  # an image is "tiny" when its shorter side is below max(TINY_PX, resolution // 4)
NOTES = ("composited", "converted", "tiny")  # per item: images composited, images converted, 1 if one is tiny


def note_counts(rows: Sequence[int], notes: torch.Tensor) -> dict:
    """Totals of items' ``notes`` [N, 3] (:data:`NOTES`): composited and converted images, rows with a tiny one."""
    total = notes.sum(0).tolist() if len(notes) else [0, 0, 0]
    return {"composited": int(total[0]), "converted": int(total[1]),
            "tiny_rows": [int(r) for r, n in zip(rows, notes) if n[2]]}


def tiny_limit(resolution: int) -> int:
    """Shorter sides below this are warned about: a quarter of the training resolution, and at least 16 px (such
    images are upscaled 4x or more, so they train on blur)."""
    return max(TINY_PX, resolution // 4)


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

    def decode_pair(self, i: int):
        """``(row, pair, winner, loser, notes)`` of pair ``i`` with both images decoded to RGB; ``notes`` (see
        :data:`NOTES`) say what decoding did and whether an image is tiny. They travel with the item rather than
        in shared state, so DataLoader workers report them too."""
        row = self.source.rows[i]
        pair = self.source.get(row)
        where = self.source.where(row)
        if pair.loser is None:  # an unpaired labelled image
            winner, note_w = decode_image_noted(pair.winner, f"{where} (image)")
            loser, note_l = None, None
        else:
            winner, note_w = decode_image_noted(pair.winner, f"{where} (preferred image)")
            loser, note_l = decode_image_noted(pair.loser, f"{where} (rejected image)")
        tiny = min(*winner.size, *(loser.size if loser else ())) < tiny_limit(self.resolution)
        notes = torch.tensor([(note_w == "composited") + (note_l == "composited"),
                              (note_w == "converted") + (note_l == "converted"), int(tiny)])
        return row, pair, winner, loser, notes

    def __getitem__(self, i: int) -> dict:
        row, pair, winner, loser, notes = self.decode_pair(i)
        images = paired_transform(winner, loser, self.resolution, self.seed, row, self.random_flip, self.center_crop)
        item = {"pixels_w": images.winner, "geometry": images.geometry, "caption": pair.caption, "row": row,
                "notes": notes}
        if images.loser is not None:
            item["pixels_l"] = images.loser
        if pair.label is not None:
            item["label"] = torch.tensor(pair.label, dtype=torch.long)
        if pair.score_w is not None and pair.score_l is not None:
            item["scores"] = torch.tensor([pair.score_w, pair.score_l], dtype=torch.float32)
        return item

    def report_images(self, composited: int, converted: int, tiny_rows: list[int]) -> None:
        """Record the image counts of a finished decoding pass in the source; one warning per kind."""
        src = self.source
        src.composited, src.converted, src.tiny_image_pairs = composited, converted, len(tiny_rows)
        if composited:
            log.warning("%s: composited %d image(s) with transparent pixels on a white background", src.name,
                        composited)
        if converted:
            log.warning("%s: converted %d 16-bit or 32-bit image(s) (modes I;16, I, F) to 8 bits by their value "
                        "range", src.name, converted)
        if tiny_rows:
            shown = ", ".join(src.label(r) for r in tiny_rows[:10]) + (", ..." if len(tiny_rows) > 10 else "")
            log.warning("%s: %d pair(s) have an image whose shorter side is below %d px (a quarter of the %d px "
                        "training resolution, at least %d px), upscaled 4x or more: %s", src.name, len(tiny_rows),
                        tiny_limit(self.resolution), self.resolution, TINY_PX, shown)

    def drop_bad_rows(self, policy: str, tokenizers: Sequence | None = None) -> int:
        """Decode every pair once; drop (``policy="skip"``) or raise on (``"error"``) undecodable rows. Counts
        composited, converted and tiny images (one warning each) and, given the text encoders' ``tokenizers``,
        the captions they truncate; :meth:`PairSource.summary` reports them."""
        bad, rows, notes = [], [], []
        for i in range(len(self)):
            try:
                row, *_, note = self.decode_pair(i)
                rows.append(row)
                notes.append(note)
            except BadImageError:
                if policy == "error":
                    raise  # the message names the row and which image
                bad.append(self.source.rows[i])
        if bad:
            log.warning("%s: skipped %d pair(s) with undecodable images (%s%s)", self.source.name, len(bad),
                        ", ".join(self.source.label(r) for r in bad[:10]), ", ..." if len(bad) > 10 else "")
            dropped = set(bad)
            self.source.rows = [r for r in self.source.rows if r not in dropped]
        self.source.bad_images_skipped = len(bad)
        self.report_images(**note_counts(rows, torch.stack(notes) if notes else torch.zeros(0, len(NOTES))))
        if tokenizers:
            check_captions(self.source, tokenizers)
        return len(bad)


def _as_list(tokenizers) -> list:
    return list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]


def count_truncated(tokenizers, captions: Sequence[str], batch_size: int = 1024) -> int:
    """How many of ``captions`` are longer than a tokenizer's ``model_max_length`` (77 for CLIP, special tokens
    included) and so get truncated; ``tokenizers`` is one tokenizer or a list (SDXL's two): a caption counts once
    if any of them truncates it. Each distinct caption is tokenized once."""
    toks = _as_list(tokenizers)
    if not toks:
        return 0
    counts = Counter(c or "" for c in captions)
    texts, over = list(counts), set()
    for tok in toks:
        limit = tok.model_max_length
        for k in range(0, len(texts), batch_size):
            chunk = [t for t in texts[k : k + batch_size] if t not in over]
            if chunk:
                ids = tok(chunk, truncation=False, padding=False, verbose=False)["input_ids"]
                over.update(t for t, x in zip(chunk, ids) if len(x) > limit)
    return sum(counts[t] for t in over)


def check_captions(source: PairSource, tokenizers) -> int:
    """Count the pairs whose caption the text encoders truncate, record it in ``source`` and warn once."""
    toks = _as_list(tokenizers)
    n = count_truncated(toks, [source.caption(r) for r in source.rows])
    source.truncated_captions = n
    if n:
        limit = min(t.model_max_length for t in toks)
        log.warning("%s: %d of %d caption(s) are longer than the text encoder's %d tokens and are truncated in "
                    "training", source.name, n, len(source), limit)
    return n


@torch.no_grad()
def encode_batch(backbone: Backbone, batch: dict) -> dict:
    """Turn a collated raw batch into the encoded batch the trainer uses: latents of both images (of the one image
    for unpaired data), the caption's conditioning (with SDXL time ids from each pair's geometry), rows and the
    optional scores and labels."""
    cond = backbone.encode_prompt(list(batch["caption"]))
    out = {
        "latents_w": backbone.encode_images(batch["pixels_w"]).cpu(),
        "prompt_embeds": cond.prompt_embeds.float().cpu(),
        "geometry": batch["geometry"],
        "row": torch.as_tensor(batch["row"]),
    }
    if "pixels_l" in batch:  # absent for unpaired images
        out["latents_l"] = backbone.encode_images(batch["pixels_l"]).cpu()
    if cond.pooled is not None:
        out["pooled"] = cond.pooled.float().cpu()
    for key in ("scores", "label"):
        if key in batch:
            out[key] = batch[key]
    return out


def batch_conditioning(backbone: Backbone, batch: dict, resolution: int) -> Conditioning:
    """The :class:`Conditioning` of an encoded batch."""
    time_ids = backbone.time_ids(batch["geometry"], resolution)
    return Conditioning(batch["prompt_embeds"], batch.get("pooled"), time_ids)
