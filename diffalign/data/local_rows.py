"""Local JSONL / CSV rows, as the pair, unpaired and label readers share them: UTF-8 text, rows named by their line,
image paths that may not leave the dataset folder, and an identity per image file for finding repeats."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import DataError


def read_utf8(path: Path) -> str:
    """The text of ``path`` as UTF-8 (a leading byte-order mark is dropped); a one-line :class:`DataError` naming
    the line and byte offset of the first byte that is not UTF-8."""
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data[:at].count(b"\n") + 1
        raise DataError(f"{path}, line {line} (byte {at}): not UTF-8 (byte 0x{data[at]:02x}: {e.reason}); save the "
                        "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 OLD > NEW`") from None


LOCAL_REQUIRED = ("prompt", "chosen", "rejected")


def read_local_rows(path: Path, required: tuple[str, ...] = LOCAL_REQUIRED) -> list[dict]:
    """The rows of a local JSONL/CSV file as dicts; an error names the line (row) lacking a ``required`` key."""
    if not path.is_file():
        raise DataError(f"data.dataset={str(path)!r}: no such file")
    text = read_utf8(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}")
        return list(reader)
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}, line {n}: missing key(s) {', '.join(missing)}; expected {', '.join(required)}")
        rows.append(row)
    return rows


def local_label(path: Path, i: int) -> str:
    """Row ``i`` of a local file as its user sees it: ``line i+1`` (JSONL) or ``row i+2`` (CSV, the header is 1)."""
    return f"row {i + 2}" if path.suffix == ".csv" else f"line {i + 1}"


def local_row_name(path: Path, i: int) -> str:
    """How an error names row ``i`` of a local pairs file: its line (JSONL) or row with the header as 1 (CSV)."""
    return f"{path}, {local_label(path, i)}"


def local_image(root: Path, row: dict, key: str, where: str) -> Path:
    """The image file ``row[key]`` names, relative to the dataset folder ``root``, which it may not leave."""
    f = (root / str(row[key])).resolve()
    if not f.is_relative_to(root):
        raise DataError(f"{where}: {key} path {row[key]!r} leaves the dataset folder {root}")
    if not f.is_file():
        raise DataError(f"{where}: {key} image {row[key]!r} does not exist")
    return f


def file_ids(sizes: dict[Path, int]) -> dict[Path, Any]:
    """An identity per image file: its path, or the hash of its bytes where another file has the same size (only
    those can be equal, so most files are never read)."""
    by_size = defaultdict(list)
    for f, size in sizes.items():
        by_size[size].append(f)
    ids: dict[Path, Any] = {}
    for files in by_size.values():
        for f in files:
            ids[f] = hashlib.sha256(f.read_bytes()).digest() if len(files) > 1 else str(f)
    return ids


def score_value(row: dict, key: str, where: str) -> float | None:
    """``row[key]`` as a number, None where it is missing or empty; an error names the row and key."""
    value = row.get(key)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {key}={value!r} is not a number") from None
