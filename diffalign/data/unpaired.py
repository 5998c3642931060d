"""Unpaired feedback for Diffusion-KTO: images each labelled desirable (1) or undesirable (0).

Forms (``data.dataset``):

- a JSONL file, one ``{"prompt": ..., "image": "relative/path.png", "label": 1}`` per line, or a CSV with the
  columns ``prompt, image, label``; image paths are relative to the file's folder, which they may not leave;
- a folder holding ``unpaired.jsonl`` (or ``unpaired.csv``), as ``diffalign make-pairs --pairing thumbs`` and
  ``diffalign labels-to-pairs --unpaired`` write;
- a Hugging Face dataset (hub id, ``save_to_disk`` folder, parquet) with a caption column (``caption`` or
  ``prompt``), an image column (``image`` or ``jpg``) and a ``label`` column (bool or 0/1).

Labels are 1/0, true/false (also as strings). The rows become a :class:`~diffalign.data.readers.PairSource` whose
pairs carry the image as ``winner``, no ``loser`` and the ``label``, so decoding, transforms, the latent cache and
their checks are the pairs' own. Exact repeats (same caption, image and label) are dropped and counted; data with
one class only is refused (KTO's reference point needs both).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..config import DataConfig
from .errors import DataError
from .local_rows import file_ids, local_image, local_label, local_row_name, read_local_rows
from .readers import Pair, PairSource, drop_repeats, image_ids, leave_out_prompts, open_hf_dataset

log = logging.getLogger(__name__)

UNPAIRED_FILES = ("unpaired.jsonl", "unpaired.csv")
UNPAIRED_REQUIRED = ("prompt", "image", "label")
CAPTION_COLUMNS, IMAGE_COLUMNS = ("caption", "prompt"), ("image", "jpg")
LOW_SHARE = 0.2  # a desirable share outside [LOW_SHARE, 1 - LOW_SHARE] is warned about


def parse_label(value, where: str) -> int:
    """1 (desirable) or 0 (undesirable) from 1/0, true/false or their strings; an error naming ``where``."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "0", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise DataError(f"{where}: label={value!r}; expected 1 (desirable) or 0 (undesirable), or true/false")


def unpaired_file(folder: Path) -> Path | None:
    """The unpaired file a dataset folder holds (``unpaired.jsonl``, else ``unpaired.csv``), or None."""
    return next((folder / n for n in UNPAIRED_FILES if (folder / n).is_file()), None)


def load_unpaired(cfg: DataConfig) -> PairSource:
    """Open ``cfg.dataset`` as unpaired labelled images (see the module doc), drop exact repeats, apply
    ``max_pairs`` (here: images), refuse one-class data and warn when one class is rare."""
    spec = cfg.dataset
    if not spec:
        raise DataError("data.dataset is empty; name an unpaired .jsonl/.csv ({prompt, image, label}), a folder "
                        "holding unpaired.jsonl, or a dataset with caption, image and label columns")
    path = Path(spec)
    if path.is_dir() and unpaired_file(path):
        path = unpaired_file(path)
        log.info("%s: reading the unpaired labels in %s", spec, path.name)
    elif path.is_dir() and (path / "pairs.jsonl").is_file():
        raise DataError(f"{spec}: holds pairs.jsonl (preference pairs) but no {' or '.join(UNPAIRED_FILES)}; KTO "
                        "trains on unpaired labels: make them with `diffalign make-pairs --pairing thumbs` or "
                        "`diffalign labels-to-pairs --unpaired`")
    source = _local(path) if path.suffix in (".jsonl", ".csv") else _hf(spec, cfg.split)
    drop_repeats(source)
    if len(source) == 0:
        raise DataError(f"{source.name}: no labelled images")
    if cfg.exclude_prompts:
        leave_out_prompts(source, cfg.exclude_prompts)
    if cfg.max_pairs is not None:
        source.rows = source.rows[: cfg.max_pairs]
    good = sum(bool(source.desirable(r)) for r in source.rows)
    if good in (0, len(source)):
        which = "desirable (label 1)" if good else "undesirable (label 0)"
        raise DataError(f"{source.name}: every image is {which} ({len(source)} of {len(source)}); KTO needs both "
                        "desirable and undesirable images")
    share = good / len(source)
    if not LOW_SHARE <= share <= 1 - LOW_SHARE:
        log.warning("%s: only %.0f%% of the images are %s; consider objective.desirable_share=0.5 (class-balanced "
                    "sampling, as the official sampler)", source.name, 100 * min(share, 1 - share),
                    "desirable" if share < 0.5 else "undesirable")
    return source


def _local(path: Path) -> PairSource:
    root = path.parent.resolve()
    raw = read_local_rows(path, UNPAIRED_REQUIRED)
    digest = hashlib.sha256(b"unpaired:" + path.read_bytes())
    items, sizes = [], {}
    for i, r in enumerate(raw):
        where = local_row_name(path, i)
        f = local_image(root, r, "image", where)
        st = f.stat()
        digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        sizes[f] = st.st_size
        items.append(Pair(str(r["prompt"] or ""), f, None, label=parse_label(r["label"], where)))

    def keys() -> list[tuple]:
        ids = file_ids(sizes)
        return [(p.caption, ids[p.winner], p.label) for p in items]

    return PairSource(str(path), digest.hexdigest(), items.__getitem__, list(range(len(items))),
                      caption_of=lambda i: items[i].caption, label_of=lambda i: local_label(path, i), keys=keys,
                      desirable=lambda i: items[i].label == 1)


def _column(ds, spec: str, names: tuple[str, ...], what: str) -> str:
    found = next((c for c in names if c in ds.column_names), None)
    if found is None:
        raise DataError(f"{spec}: no {what} column ({' or '.join(names)}); unpaired data needs a caption, an image "
                        f"and a label column (found {', '.join(ds.column_names)})")
    return found


def _hf(spec: str, split: str) -> PairSource:
    ds = open_hf_dataset(spec, split)
    caption, image = _column(ds, spec, CAPTION_COLUMNS, "caption"), _column(ds, spec, IMAGE_COLUMNS, "image")
    _column(ds, spec, ("label",), "label")
    labels = [parse_label(v, f"{spec}, row {i}") for i, v in enumerate(ds["label"])]
    captions = [c or "" for c in ds[caption]]
    images = ds.select_columns([image])

    def get(i: int) -> Pair:
        return Pair(captions[i], images[i][image], None, label=labels[i])

    def keys() -> list[tuple]:
        return list(zip(captions, image_ids(ds, image), labels))

    fingerprint = getattr(ds, "_fingerprint", None) or hashlib.sha256(spec.encode()).hexdigest()
    return PairSource(spec, f"unpaired:{fingerprint}", get, list(range(len(labels))), caption_of=captions.__getitem__,
                      keys=keys, desirable=lambda i: labels[i] == 1)
