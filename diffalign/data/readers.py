"""Preference-pair readers: Pick-a-Pic (hub / local dataset / parquet) and local pairs (JSONL / CSV, or a folder
holding ``pairs.jsonl`` / ``pairs.csv`` such as the output of ``diffalign make-pairs``).

Every reader yields the same :class:`PairSource`: a list of rows with the caption and both images
(winner first), decoded lazily. Ties are dropped and counted unless asked to keep them; so are pairs whose two
images are identical and repeated pairs (same caption, same winner, same loser).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .local_rows import file_ids, local_image, local_label, local_row_name, read_local_rows, score_value

log = logging.getLogger(__name__)

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PICKAPIC_UIDS = ("image_0_uid", "image_1_uid")  # Pick-a-Pic v2's image ids: used instead of hashing the bytes
LOCAL_PAIRS_FILES = ("pairs.jsonl", "pairs.csv")  # what a folder given as a local-pairs dataset holds
SAVE_TO_DISK_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")


@dataclass
class Pair:
    """One row: a preference pair (``winner`` preferred to ``loser``), or one unpaired labelled image (``winner``
    the image, ``loser`` None, ``label`` 1 desirable / 0 undesirable: Diffusion-KTO's data)."""

    caption: str
    winner: Any  # bytes, a path, or a PIL image: decoded by :func:`~diffalign.data.images.decode_image`
    loser: Any
    score_w: float | None = None
    score_l: float | None = None
    label: int | None = None


# Counts that only the pass decoding every image (or reading every caption with the tokenizer) knows; None
# until that pass ran. A cache records them in its meta.json, so a reused cache restores them.
CHECKED_COUNTS = ("bad_images_skipped", "composited", "converted", "tiny_image_pairs", "truncated_captions")


@dataclass
class PairSource:
    """Preference pairs (or unpaired labelled images, ``desirable`` set) with their provenance. ``rows[i]`` is the
    source row index of pair ``i``."""

    name: str
    fingerprint: str
    get: Any  # callable: source row index -> Pair
    rows: list[int]
    ties_dropped: int = 0
    scores: Any = None  # callable: source row index -> (score_w, score_l), read without decoding images
    score_keys: Any = None  # callable: source row index -> the columns of (score_w, score_l), for messages
    caption_of: Any = None  # callable: source row index -> caption, read without decoding images
    label_of: Any = None  # callable: source row index -> how messages name it ("row 3", "line 4")
    keys: Any = None  # callable: () -> per source row (caption, winner id, loser id) for dropping repeats
    duplicates_dropped: int = 0
    identical_dropped: int = 0
    kept: int | None = None  # pairs actually trained on when a cache skipped rows that stay in ``rows``
    bad_images_skipped: int | None = None
    composited: int | None = None  # images with transparent pixels composited on images.BACKGROUND
    converted: int | None = None  # 16/32-bit images (modes I;16, I, F) scaled to 8 bits by their range
    tiny_image_pairs: int | None = None  # pairs with an image whose shorter side is below the tiny limit
    truncated_captions: int | None = None  # captions longer than the text encoder's token limit
    desirable: Any = None  # unpaired data: callable source row index -> bool (label 1), read without decoding

    @property
    def unit(self) -> str:
        """What a row is, for messages: ``pairs``, or ``images`` for unpaired data."""
        return "images" if self.desirable else "pairs"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Pair:
        return self.get(self.rows[i])

    def caption(self, row: int) -> str:
        """Source row ``row``'s caption, read without decoding its images where the reader can."""
        return self.caption_of(row) if self.caption_of else self.get(row).caption

    def label(self, row: int) -> str:
        """How a message names source row ``row``: ``row 3`` (datasets), ``line 4`` (JSONL), ``row 5`` (CSV)."""
        return self.label_of(row) if self.label_of else f"row {row}"

    def where(self, row: int) -> str:
        return f"{self.name}, {self.label(row)}"

    def counts(self) -> dict[str, int | None]:
        """What loading kept and dropped; the counts of :data:`CHECKED_COUNTS` are None until checked."""
        return {"pairs": self.kept if self.kept is not None else len(self.rows), "ties_dropped": self.ties_dropped,
                "duplicates_dropped": self.duplicates_dropped, "identical_dropped": self.identical_dropped,
                **{k: getattr(self, k) for k in CHECKED_COUNTS}}

    def summary(self) -> str:
        """One line: pairs kept, what was dropped and what was converted (``?``: not checked yet)."""
        c = {k: "?" if v is None else v for k, v in self.counts().items()}
        if self.desirable:
            good = sum(map(bool, map(self.desirable, self.rows)))
            return (f"{self.name}: {c['pairs']} images kept ({good} desirable, {len(self) - good} undesirable of "
                    f"{len(self)} read: {good / max(1, len(self)):.0%} desirable); dropped {c['duplicates_dropped']} "
                    f"duplicate(s), {c['bad_images_skipped']} bad image(s); images: {c['composited']} composited on "
                    f"white, {c['converted']} converted from 16/32-bit, {c['tiny_image_pairs']} tiny; "
                    f"{c['truncated_captions']} truncated caption(s)") + (" (?: not checked yet)" if "?" in c.values() else "")
        line = (f"{self.name}: {c['pairs']} pairs kept; dropped {c['ties_dropped']} tie(s), "
                f"{c['duplicates_dropped']} duplicate(s), {c['identical_dropped']} identical-image pair(s), "
                f"{c['bad_images_skipped']} with bad images; images: {c['composited']} composited on white, "
                f"{c['converted']} converted from 16/32-bit, {c['tiny_image_pairs']} pair(s) with a tiny image; "
                f"{c['truncated_captions']} truncated caption(s)")
        return line + (" (?: not checked yet)" if "?" in c.values() else "")

    def restore_counts(self, counts: dict) -> None:
        """Set the checked counts from a record (a cache's meta.json); unknown ones stay None."""
        for k in CHECKED_COUNTS:
            if isinstance(counts.get(k), int):
                setattr(self, k, counts[k])

    def score_pairs(self) -> list[tuple[float, float]]:
        """``(score_w, score_l)`` of every pair, in label order; an error naming the first row without both,
        or with a score that is not finite (NaN, inf)."""
        out = []
        for row in self.rows:
            w, l = self.scores(row) if self.scores else (None, None)
            keys = self.score_keys(row) if self.score_keys else ("winner score", "loser score")
            for value, key in zip((w, l), keys):
                if value is not None and not math.isfinite(value):
                    raise DataError(f"{self.where(row)}: {key}={value!r} is not finite; reward scores must be finite "
                                    "numbers (re-score or drop the row)")
            if w is None or l is None:
                raise DataError(f"{self.where(row)}: no reward scores; soft-label objectives (smpo) need "
                                "score_0/score_1 columns (Pick-a-Pic layout) or chosen_score/rejected_score (local "
                                "pairs) on every pair, e.g. written by `diffalign score --dataset ...` or your reward "
                                "model")
            out.append((float(w), float(l)))
        return out

    def score_range(self) -> tuple[float, float]:
        """(min, max) of the reward scores over the pairs, for SmPO's min-max normalisation."""
        flat = [s for pair in self.score_pairs() for s in pair]
        lo, hi = min(flat), max(flat)
        if hi <= lo:
            raise DataError(f"{self.name}: every reward score is {lo}; soft labels need scores that differ")
        return lo, hi


# ----- loading -----
def local_pairs_file(folder: Path) -> Path | None:
    """The local-pairs file a dataset folder holds (``pairs.jsonl``, else ``pairs.csv``), or None."""
    for name in LOCAL_PAIRS_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_pairs(cfg: DataConfig) -> PairSource:
    """Open ``cfg.dataset`` with the reader its form calls for, drop ties, identical-image pairs and duplicates,
    apply ``max_pairs``."""
    spec = cfg.dataset
    if not spec:
        raise DataError("data.dataset is empty; name a hub id, a dataset folder, parquet file(s) or a pairs .jsonl/.csv")
    path = Path(spec)
    if path.is_dir() and local_pairs_file(path):
        path = local_pairs_file(path)
        log.info("%s: reading the local pairs in %s", spec, path.name)
    if path.suffix in (".jsonl", ".csv"):
        source = _local_pairs(path, cfg)
    else:
        source = _pickapic(spec, cfg)
    drop_repeats(source)
    if len(source) == 0:
        dropped = [f"{n} {what}" for n, what in ((source.ties_dropped, "ties dropped"),
                                                   (source.identical_dropped, "identical-image pairs dropped"),
                                                   (source.duplicates_dropped, "duplicates dropped")) if n]
        hint = "; set data.keep_ties=true to keep them" if source.ties_dropped else ""
        why = f" ({', '.join(dropped)}{hint})" if dropped else ""
        raise DataError(f"{source.name}: no usable preference pairs{why}")
    if source.ties_dropped:
        log.info("%s: dropped %d tied pairs, %d remain", source.name, source.ties_dropped, len(source))
    if cfg.exclude_prompts:
        leave_out_prompts(source, cfg.exclude_prompts)
    if cfg.max_pairs is not None:
        source.rows = source.rows[: cfg.max_pairs]
    return source


def leave_out_prompts(source: PairSource, prompts_file: str) -> None:
    """Drop the pairs (unpaired data: images) whose caption is one of the prompts in ``prompts_file``
    (``data.exclude_prompts``), matched after stripping surrounding white space; log how many. An error when none
    remain; a warning when none matched (most likely the wrong file)."""
    from .prompts import read_prompts

    excluded = set(read_prompts(prompts_file))
    before = len(source.rows)
    source.rows = [r for r in source.rows if source.caption(r).strip() not in excluded]
    left_out = before - len(source.rows)
    if not source.rows:
        raise DataError(f"{source.name}: every one of its {before} {source.unit} has a prompt in "
                        f"data.exclude_prompts={prompts_file}; nothing is left to train on")
    if left_out:
        log.info("%s: left out %d %s whose prompt is in data.exclude_prompts=%s, %d remain", source.name, left_out,
                 source.unit, prompts_file, len(source.rows))
    else:
        log.warning("%s: none of the %d prompts in data.exclude_prompts=%s is a caption here; nothing was left out",
                    source.name, len(excluded), prompts_file)


def _some(source: PairSource, rows: list[int], n: int = 5) -> str:
    return ", ".join(source.label(r) for r in rows[:n]) + (", ..." if len(rows) > n else "")


def drop_repeats(source: PairSource) -> None:
    """Drop pairs whose two images are the same and pairs repeating an earlier one (same caption, winner and
    loser; unpaired data: same caption, image and label); count both and warn once each."""
    if source.keys is None:
        return
    keys = source.keys()
    seen, rows, identical, duplicates = set(), [], [], []
    for row in source.rows:
        caption, w, l = keys[row]
        if w is not None and w == l:
            identical.append(row)
        elif w is not None and l is not None and (caption, w, l) in seen:
            duplicates.append(row)
        else:
            seen.add((caption, w, l))
            rows.append(row)
    source.rows, source.identical_dropped, source.duplicates_dropped = rows, len(identical), len(duplicates)
    if identical:
        log.warning("%s: dropped %d pair(s) whose two images are identical (%s)", source.name, len(identical),
                    _some(source, identical))
    if duplicates:
        what = "image(s) repeating an earlier one's caption, image and label" if source.desirable else \
            "pair(s) repeating an earlier one's caption and images"
        log.warning("%s: dropped %d duplicate %s (%s)", source.name, len(duplicates), what, _some(source, duplicates))


# ----- Pick-a-Pic and other HF datasets -----
def _folder_contents(path: Path) -> str:
    kinds = Counter(p.suffix or p.name for p in path.iterdir() if p.is_file())
    dirs = sum(p.is_dir() for p in path.iterdir())
    parts = [f"{n} {k}" for k, n in kinds.most_common(5)] + ([f"{dirs} folder(s)"] if dirs else [])
    return ", ".join(parts) or "nothing"


def open_hf_dataset(spec: str, split: str):
    import datasets

    path = Path(spec)
    is_glob = any(ch in spec for ch in "*?[")
    if not path.exists() and not is_glob and (spec.startswith((".", "/", "~")) or path.suffix == ".parquet"):
        raise DataError(f"data.dataset={spec!r}: no such file or folder")
    try:
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=[str(path)], split="train")
        if is_glob and spec.endswith(".parquet"):
            files = sorted(glob.glob(spec))
            if not files:
                raise DataError(f"data.dataset={spec!r}: the pattern matches no file")
            return datasets.load_dataset("parquet", data_files=files, split="train")
        if path.is_dir():
            if local_pairs_file(path):
                raise DataError(f"{spec}: holds {local_pairs_file(path).name}, a local-pairs dataset, not a Hugging "
                                f"Face one; pass {local_pairs_file(path)}")
            if any((path / f).is_file() for f in SAVE_TO_DISK_FILES):
                ds = datasets.load_from_disk(str(path))  # save_to_disk output: one Dataset or a DatasetDict
                return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            parquet = sorted(str(p) for p in path.rglob("*.parquet"))
            if parquet and not any(path.glob("*.json")):
                return datasets.load_dataset("parquet", data_files=parquet, split="train")
            if not parquet and not any(path.rglob("*.arrow")):
                raise DataError(f"{spec}: a folder matching no dataset layout; looked for {' or '.join(LOCAL_PAIRS_FILES)} "
                                f"(local pairs, as `diffalign make-pairs --out` writes), {'/'.join(SAVE_TO_DISK_FILES)} "
                                "(a `save_to_disk` folder) and *.parquet or *.arrow files (Pick-a-Pic layout: "
                                f"{', '.join(PICKAPIC_COLUMNS)}); found {_folder_contents(path)}")
        return datasets.load_dataset(spec, split=split)  # a hub id, or a folder in a hub dataset's layout
    except DataError:
        raise
    except Exception as e:  # offline, missing split, unreadable files
        raise DataError(f"data.dataset={spec!r} (split {split!r}) cannot be opened: {type(e).__name__}: {e}") from None


def _digest(value: Any) -> Any:
    """An identity of one stored image: a hash of its bytes (or of its path when only a path is stored)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        value = value.encode()
    return hashlib.blake2b(value, digest_size=16).digest() if isinstance(value, (bytes, bytearray)) else None


def image_ids(ds, column: str) -> list:
    """A hash of every image of ``column`` (of its bytes, or its path if only that is stored), read in batches
    without decoding."""
    out: list = []
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=256):
        out.extend(_digest(v) for v in batch.column(0).to_pylist())
    return out


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
    captions: list = []  # the caption column, read on first use

    def all_captions() -> list:
        if len(captions) != len(labels):
            captions[:] = ds["caption"]
        return captions

    def caption_of(i: int) -> str:
        return all_captions()[i] or ""

    def scores(i: int) -> tuple[float | None, float | None]:
        return (s0[i], s1[i]) if labels[i] != 0 else (s1[i], s0[i])

    def score_keys(i: int) -> tuple[str, str]:
        return ("score_0", "score_1") if labels[i] != 0 else ("score_1", "score_0")

    def get(i: int) -> Pair:
        r = images[i]
        first = labels[i] != 0  # label 1 (or a kept tie): image 0 is the winner
        w, l = ("0", "1") if first else ("1", "0")
        return Pair(r["caption"] or "", r[f"jpg_{w}"], r[f"jpg_{l}"], *scores(i))

    def keys() -> list[tuple]:
        if set(PICKAPIC_UIDS) <= set(ds.column_names):
            id0, id1 = ds[PICKAPIC_UIDS[0]], ds[PICKAPIC_UIDS[1]]
        else:
            id0, id1 = image_ids(ds, "jpg_0"), image_ids(ds, "jpg_1")
        return [(c or "", a, b) if label != 0 else (c or "", b, a)
                for c, a, b, label in zip(all_captions(), id0, id1, labels)]

    fingerprint = getattr(ds, "_fingerprint", None) or hashlib.sha256(spec.encode()).hexdigest()
    return PairSource(spec, f"{fingerprint}:{cfg.keep_ties}", get, rows, ties, scores, score_keys, caption_of,
                      keys=keys)


def _local_pairs(path: Path, cfg: DataConfig) -> PairSource:
    root = path.parent.resolve()
    raw = read_local_rows(path)
    digest = hashlib.sha256(path.read_bytes())
    rows, ties, pairs, sizes = [], 0, [], {}
    for i, r in enumerate(raw):
        where = local_row_name(path, i)
        files = []
        for key in ("chosen", "rejected"):
            f = local_image(root, r, key, where)
            st = f.stat()
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
            files.append(f)
            sizes[f] = st.st_size
        scores = [score_value(r, k, where) for k in ("chosen_score", "rejected_score")]
        pairs.append(Pair(str(r["prompt"] or ""), files[0], files[1], *scores))
        if str(r.get("tie", "")).lower() in ("true", "1") and not cfg.keep_ties:
            ties += 1
        else:
            rows.append(i)

    def keys() -> list[tuple]:
        ids = file_ids(sizes)
        return [(p.caption, ids[p.winner], ids[p.loser]) for p in pairs]

    return PairSource(str(path), f"{digest.hexdigest()}:{cfg.keep_ties}", pairs.__getitem__, rows, ties,
                      lambda i: (pairs[i].score_w, pairs[i].score_l), lambda i: ("chosen_score", "rejected_score"),
                      lambda i: pairs[i].caption, lambda i: local_label(path, i), keys)
