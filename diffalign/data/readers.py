"""Preference-pair readers: Pick-a-Pic (hub / local dataset / parquet) and local pairs (JSONL / CSV).

Every reader yields the same :class:`PairSource`: a list of rows with the caption and both images
(winner first), decoded lazily. Ties are dropped and counted unless asked to keep them.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..config import DataConfig

log = logging.getLogger(__name__)

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


class DataError(ValueError):
    """A dataset that cannot be read as preference pairs; the message names the file, row or column."""


class BadImageError(DataError):
    """One image of one row cannot be decoded."""


@dataclass
class Pair:
    caption: str
    winner: Any  # bytes, a path, or a PIL image: decoded by :func:`decode_image`
    loser: Any
    score_w: float | None = None
    score_l: float | None = None


@dataclass
class PairSource:
    """Preference pairs with their provenance. ``rows[i]`` is the source row index of pair ``i``."""

    name: str
    fingerprint: str
    get: Any  # callable: source row index -> Pair
    rows: list[int]
    ties_dropped: int = 0
    scores: Any = None  # callable: source row index -> (score_w, score_l), read without decoding images

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Pair:
        return self.get(self.rows[i])

    def score_pairs(self) -> list[tuple[float, float]]:
        """``(score_w, score_l)`` of every pair, in label order; an error naming the first row without both."""
        out = []
        for row in self.rows:
            w, l = self.scores(row) if self.scores else (None, None)
            if w is None or l is None or w != w or l != l:
                raise DataError(f"{self.name}, row {row}: no reward scores; soft-label objectives (smpo) need "
                                "score_0/score_1 columns (Pick-a-Pic layout) or chosen_score/rejected_score (local "
                                "pairs) on every pair, e.g. written by `diffalign score` (planned) or your reward model")
            out.append((float(w), float(l)))
        return out

    def score_range(self) -> tuple[float, float]:
        """(min, max) of the reward scores over the pairs, for SmPO's min-max normalisation."""
        flat = [s for pair in self.score_pairs() for s in pair]
        lo, hi = min(flat), max(flat)
        if hi <= lo:
            raise DataError(f"{self.name}: every reward score is {lo}; soft labels need scores that differ")
        return lo, hi


def decode_image(value: Any, where: str) -> Image.Image:
    """A fully decoded RGB PIL image from bytes, a path, a datasets image dict or a PIL image."""
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
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, KeyError, TypeError) as e:
        detail = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise BadImageError(f"{where}: cannot decode image ({detail})") from None


def load_pairs(cfg: DataConfig) -> PairSource:
    """Open ``cfg.dataset`` with the reader its form calls for, drop ties, apply ``max_pairs``."""
    spec = cfg.dataset
    if not spec:
        raise DataError("data.dataset is empty; name a hub id, a dataset folder, parquet file(s) or a pairs .jsonl/.csv")
    path = Path(spec)
    if path.suffix in (".jsonl", ".csv"):
        source = _local_pairs(path, cfg)
    else:
        source = _pickapic(spec, cfg)
    if len(source) == 0:
        why = f" ({source.ties_dropped} ties dropped; set data.keep_ties=true to keep them)" if source.ties_dropped else ""
        raise DataError(f"{source.name}: no usable preference pairs{why}")
    if source.ties_dropped:
        log.info("%s: dropped %d tied pairs, %d remain", source.name, source.ties_dropped, len(source))
    if cfg.max_pairs is not None:
        source.rows = source.rows[: cfg.max_pairs]
    return source


# ----- Pick-a-Pic and other HF datasets -----
def open_hf_dataset(spec: str, split: str):
    import datasets

    path = Path(spec)
    is_glob = any(ch in spec for ch in "*?[")
    if not path.exists() and not is_glob and (spec.startswith((".", "/", "~")) or path.suffix == ".parquet"):
        raise DataError(f"data.dataset={spec!r}: no such file or folder")
    try:
        if path.suffix == ".parquet" or (path.is_dir() and not any(path.glob("*.json")) and any(path.rglob("*.parquet"))):
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
            return datasets.load_dataset("parquet", data_files=files, split="train")
        if is_glob and spec.endswith(".parquet"):
            files = sorted(glob.glob(spec))
            if not files:
                raise DataError(f"data.dataset={spec!r}: the pattern matches no file")
            return datasets.load_dataset("parquet", data_files=files, split="train")
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))  # save_to_disk output: one Dataset or a DatasetDict
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(spec, split=split)
    except DataError:
        raise
    except Exception as e:  # offline, missing split, unreadable files
        raise DataError(f"data.dataset={spec!r} (split {split!r}) cannot be opened: {type(e).__name__}: {e}") from None


def _pickapic(spec: str, cfg: DataConfig) -> PairSource:
    ds = open_hf_dataset(spec, cfg.split)
    missing = [c for c in PICKAPIC_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{spec}: missing column(s) {', '.join(missing)}; Pick-a-Pic layout needs "
                        f"{', '.join(PICKAPIC_COLUMNS)} (found {', '.join(ds.column_names)})")
    labels = ds["label_0"]
    rows, ties = [], 0
    for i, label in enumerate(labels):
        if label in (0, 1):
            rows.append(i)
        elif cfg.keep_ties:
            rows.append(i)
        else:
            ties += 1
    has_scores = {"score_0", "score_1"} <= set(ds.column_names)
    s0, s1 = (ds["score_0"], ds["score_1"]) if has_scores else ([None] * len(labels), [None] * len(labels))
    images = ds.select_columns(["caption", "jpg_0", "jpg_1"])

    def scores(i: int) -> tuple[float | None, float | None]:
        return (s0[i], s1[i]) if labels[i] != 0 else (s1[i], s0[i])

    def get(i: int) -> Pair:
        r = images[i]
        first = labels[i] != 0  # label 1 (or a kept tie): image 0 is the winner
        w, l = ("0", "1") if first else ("1", "0")
        return Pair(r["caption"] or "", r[f"jpg_{w}"], r[f"jpg_{l}"], *scores(i))

    fingerprint = getattr(ds, "_fingerprint", None) or hashlib.sha256(spec.encode()).hexdigest()
    return PairSource(spec, f"{fingerprint}:{cfg.keep_ties}", get, rows, ties, scores)


# ----- local pairs: JSONL / CSV with image paths relative to the file -----
LOCAL_REQUIRED = ("prompt", "chosen", "rejected")


def read_local_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data.dataset={str(path)!r}: no such file")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in LOCAL_REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(LOCAL_REQUIRED)}")
            return list(reader)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in LOCAL_REQUIRED if k not in row]
        if missing:
            raise DataError(f"{path}, line {n}: missing key(s) {', '.join(missing)}; expected {', '.join(LOCAL_REQUIRED)}")
        rows.append(row)
    return rows


def local_row_name(path: Path, i: int) -> str:
    """How an error names row ``i`` of a local pairs file: its line (JSONL) or row with the header as 1 (CSV)."""
    return f"{path}, row {i + 2}" if path.suffix == ".csv" else f"{path}, line {i + 1}"


def local_image(root: Path, row: dict, key: str, where: str) -> Path:
    """The image file ``row[key]`` names, relative to the dataset folder ``root``, which it may not leave."""
    f = (root / str(row[key])).resolve()
    if not f.is_relative_to(root):
        raise DataError(f"{where}: {key} path {row[key]!r} leaves the dataset folder {root}")
    if not f.is_file():
        raise DataError(f"{where}: {key} image {row[key]!r} does not exist")
    return f


def _local_pairs(path: Path, cfg: DataConfig) -> PairSource:
    root = path.parent.resolve()
    raw = read_local_rows(path)
    digest = hashlib.sha256(path.read_bytes())
    rows, ties, pairs = [], 0, []
    for i, r in enumerate(raw):
        where = local_row_name(path, i)
        files = []
        for key in ("chosen", "rejected"):
            f = local_image(root, r, key, where)
            st = f.stat()
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
            files.append(f)
        scores = [_score(r, k, where) for k in ("chosen_score", "rejected_score")]
        pairs.append(Pair(str(r["prompt"] or ""), files[0], files[1], *scores))
        if str(r.get("tie", "")).lower() in ("true", "1") and not cfg.keep_ties:
            ties += 1
        else:
            rows.append(i)
    return PairSource(str(path), f"{digest.hexdigest()}:{cfg.keep_ties}", pairs.__getitem__, rows, ties,
                      lambda i: (pairs[i].score_w, pairs[i].score_l))


def _score(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {key}={value!r} is not a number") from None
