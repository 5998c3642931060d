"""Scoring images and preference datasets with reward heads (``diffalign score``).

Images are scored at their own size (heads resize inside), batched where consecutive images share a size.
Several heads combine into one score by a weighted sum (lower-is-better heads count negatively); that combined
score is what soft-label objectives read as ``chosen_score`` / ``rejected_score`` or ``score_0`` / ``score_1``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ..data.errors import DataError
from ..data.images import decode_image
from ..data.local_rows import local_image, local_row_name, read_local_rows
from ..data.prompts import read_prompts
from ..data.readers import local_pairs_file, open_hf_dataset
from ..files import atomic_write, atomic_write_text
from ..rewards import RewardModel, score
from ..rewards.combine import combine, directions

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """Same-size PIL images -> float [B, 3, H, W] in [0, 1]."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def score_images(rewards: Mapping[str, RewardModel], images: Sequence[Image.Image], prompts: Sequence[str],
                 batch_size: int = 8) -> dict[str, list[float]]:
    """Every head's score of every image, ``{head: [score per image]}``."""
    out: dict[str, list[float]] = {name: [] for name in rewards}
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < batch_size and images[end].size == images[start].size:
            end += 1
        batch, texts = to_tensor(images[start:end]), list(prompts[start:end])
        for name, reward in rewards.items():
            out[name].extend(score(reward, batch, texts, name=name).tolist())
        start = end
    return out


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"images folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"images folder {str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def score_folder(rewards: Mapping[str, RewardModel], images: str | Path, prompts: str | Path, out: str | Path,
                 batch_size: int = 8) -> Path:
    """Score the images of a folder (sorted by name) against ``prompts`` (one per image, or one for all);
    write one JSON line per image: ``{"path", "prompt", <head>: score, ...}``."""
    files, texts = _image_files(Path(images)), read_prompts(prompts)
    if len(texts) == 1:
        texts = texts * len(files)
    if len(texts) != len(files):
        raise DataError(f"{prompts}: {len(texts)} prompts for {len(files)} images in {images}; give one prompt per "
                        "image (in file-name order) or a single prompt for all")
    pil = [decode_image(f, str(f)) for f in files]
    scores = score_images(rewards, pil, texts, batch_size)
    lines = [json.dumps({"path": str(f), "prompt": t, **{n: scores[n][i] for n in rewards}})
             for i, (f, t) in enumerate(zip(files, texts))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def score_dataset(rewards: Mapping[str, RewardModel], dataset: str | Path, out: str | Path | None = None,
                  weights: Sequence[float] | None = None, batch_size: int = 8) -> Path:
    """Add reward scores to a pairs dataset. Local pairs (JSONL/CSV) get ``chosen_score`` / ``rejected_score``
    (combined) and ``chosen_<head>`` / ``rejected_<head>`` and are written as JSONL in the same folder (image
    paths stay relative); Pick-a-Pic data (parquet, folder, hub id) gets ``score_0`` / ``score_1`` and
    ``score_0_<head>`` / ``score_1_<head>`` and is written as one parquet file."""
    path = Path(dataset)
    if path.is_dir() and local_pairs_file(path):  # a make-pairs folder: the same rule as data.dataset
        path = local_pairs_file(path)
    if path.suffix in (".jsonl", ".csv"):
        return _score_local(rewards, path, out, weights, batch_size)
    if out is None or Path(out).suffix != ".parquet":
        raise DataError(f"--out must name a .parquet file for the Pick-a-Pic dataset {str(dataset)!r}, got {out!r}")
    return _score_pickapic(rewards, str(dataset), Path(out), weights, batch_size)


def _score_local(rewards, path: Path, out, weights, batch_size) -> Path:
    out = Path(out) if out else path.with_name(f"{path.stem}.scored.jsonl")
    if out.suffix != ".jsonl" or out.resolve().parent != path.resolve().parent:
        raise DataError(f"--out {str(out)!r}: scored local pairs are written as .jsonl in the dataset's own folder "
                        f"({path.resolve().parent}) so that image paths stay relative")
    if out.resolve() == path.resolve():
        raise DataError(f"--out {str(out)!r} would overwrite the dataset it reads; choose another name")
    rows, root = read_local_rows(path), path.resolve().parent
    for i, row in enumerate(tqdm(rows, desc="scoring pairs", unit="pair")):
        where = local_row_name(path, i)
        images = [decode_image(local_image(root, row, key, where), f"{where}: {key}") for key in ("chosen", "rejected")]
        s = score_images(rewards, images, [str(row["prompt"] or "")] * 2, batch_size)
        row["chosen_score"], row["rejected_score"] = combine(s, directions(rewards), weights)
        for name in rewards:
            row[f"chosen_{name}"], row[f"rejected_{name}"] = s[name]
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out


def _score_pickapic(rewards, spec: str, out: Path, weights, batch_size) -> Path:
    ds = open_hf_dataset(spec, "train")
    missing = [c for c in ("caption", "jpg_0", "jpg_1") if c not in ds.column_names]
    if missing:
        raise DataError(f"{spec}: missing column(s) {', '.join(missing)} (Pick-a-Pic layout: caption, jpg_0, jpg_1)")
    columns: dict[str, list[float]] = {}
    for i, row in enumerate(tqdm(ds.select_columns(["caption", "jpg_0", "jpg_1"]), desc="scoring pairs", unit="pair")):
        images = [decode_image(row[f"jpg_{k}"], f"{spec}, row {i}: jpg_{k}") for k in (0, 1)]
        s = score_images(rewards, images, [row["caption"] or ""] * 2, batch_size)
        for k, value in zip((0, 1), combine(s, directions(rewards), weights)):
            columns.setdefault(f"score_{k}", []).append(value)
            for name in rewards:
                columns.setdefault(f"score_{k}_{name}", []).append(s[name][k])
    for name, values in columns.items():
        if name in ds.column_names:
            ds = ds.remove_columns(name)
        ds = ds.add_column(name, values)
    return atomic_write(out, lambda tmp: ds.to_parquet(str(tmp)))
