"""The label file: JSONL, one D3PO label line per prompt and annotator, as
:func:`diffalign.sampling.human.read_labels` reads it::

    {"prompt_id": 3, "annotator": "a1", "scores": [2, 0, 1], "mode": "rank"}

Appends are flushed and fsynced before :meth:`LabelStore.add` returns, so a label the page was told is saved
survives a crash; an undo rewrites the file atomically (temporary file, fsync, rename). A torn last line (a
crash mid-append) is dropped on open and the file rewritten without it, so the next append starts clean. One
server per file: an exclusive lock on ``<file>.lock`` refuses a second one instead of letting two interleave.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from ..data.errors import DataError
from ..data.local_rows import read_utf8
from ..files import atomic_write_text, default_mode

log = logging.getLogger(__name__)

ANNOTATOR = re.compile(r"[A-Za-z0-9_\-. ]{1,64}")
MODE = re.compile(r"[A-Za-z0-9_\-]{1,32}")
FIELDS = ("prompt_id", "annotator", "scores", "mode")


class LabelError(DataError):
    """A label that is refused; the message names the field. ``status`` is the HTTP status the API answers."""

    status = 400


class DuplicateLabel(LabelError):
    """The annotator already labelled that prompt (undo it first)."""

    status = 409


def check_annotator(annotator: object) -> str:
    """``annotator`` itself when it is a valid name (1-64 letters, digits, ``_-.`` or spaces), else a
    :class:`LabelError` naming the field."""
    if not isinstance(annotator, str) or not ANNOTATOR.fullmatch(annotator) or not annotator.strip():
        raise LabelError(f"annotator must be 1-64 letters, digits, '_', '-', '.' or spaces, got {annotator!r}")
    return annotator


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float (10**400): training could not read it either
        return False


class LabelStore:
    """The label file of one served folder. Thread-safe: every read and mutation holds one lock."""

    def __init__(self, path: str | Path, per_prompt: int, prompt_ids: Iterable[int]) -> None:
        self.path, self.per_prompt = Path(path), per_prompt
        self.prompt_ids = frozenset(prompt_ids)
        self._mutex = threading.Lock()
        self._lines: list[tuple[str, dict]] = []  # (the line as stored, its parsed label), in file order
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, default_mode())
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise DataError(f"{self.path} is being served by another `diffalign label` (lock {self.lock_path}); "
                            "stop it first or give another --labels file") from None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ----- lifetime -----
    def close(self) -> None:
        """Release the file lock (another server may then open the file). Idempotent."""
        if getattr(self, "_lock_fd", None) is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ----- reading -----
    def _load(self) -> None:
        if not self.path.is_file():
            return
        text = read_utf8(self.path)
        raw = text.split("\n")
        complete = text.endswith("\n")
        if complete:
            raw.pop()  # the empty string after the final newline
        last = max((n for n, line in enumerate(raw) if line.strip()), default=None)
        repair = not complete and bool(text)
        for n, line in enumerate(raw):
            if not line.strip():
                continue
            where = f"{self.path}, line {n + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if n == last:  # a crash mid-append: that label was never acknowledged
                    log.warning("%s: torn last line dropped (%s)", where, e.msg)
                    repair = True
                    continue
                raise DataError(f"{where}: not valid JSON ({e.msg}); fix or remove that line") from None
            try:
                label = self._validate(row, stored=True)
            except LabelError as e:
                raise DataError(f"{where}: {e}") from None
            self._lines.append((line, label))
        if repair:
            self._rewrite()

    def done(self, annotator: str) -> set[int]:
        """Prompt ids ``annotator`` has labelled."""
        with self._mutex:
            return {label["prompt_id"] for _, label in self._lines if label.get("annotator") == annotator}

    def labels(self) -> list[dict]:
        """Every stored label, in file order."""
        with self._mutex:
            return [dict(label) for _, label in self._lines]

    # ----- writing -----
    def add(self, line: object) -> dict:
        """Validate ``line`` (:class:`LabelError` naming the field; :class:`DuplicateLabel` when that annotator
        already labelled that prompt), append it and fsync. Returns the stored label."""
        label = self._validate(line)
        text = json.dumps(label, allow_nan=False)
        with self._mutex:
            if any(old.get("annotator") == label["annotator"] and old["prompt_id"] == label["prompt_id"]
                   for _, old in self._lines):
                raise DuplicateLabel(f"prompt_id {label['prompt_id']}: already labelled by {label['annotator']!r}; "
                                     "undo that label first")
            new = not self.path.exists()
            with open(self.path, "ab") as f:
                size = f.tell()
                try:
                    f.write((text + "\n").encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    f.truncate(size)  # a failed write (disk full) leaves no half line behind
                    raise
            if new:
                os.chmod(self.path, default_mode())
                self._sync_folder()
            self._lines.append((text, label))
        return dict(label)

    def undo(self, annotator: str) -> dict | None:
        """Remove ``annotator``'s most recent label (rewriting the file atomically) and return it; None when
        there is none."""
        check_annotator(annotator)
        with self._mutex:
            index = next((i for i in range(len(self._lines) - 1, -1, -1)
                          if self._lines[i][1].get("annotator") == annotator), None)
            if index is None:
                return None
            kept = self._lines[:index] + self._lines[index + 1:]
            self._rewrite(kept)
            removed = self._lines[index][1]
            self._lines = kept
        return dict(removed)

    def _rewrite(self, lines: list[tuple[str, dict]] | None = None) -> None:
        lines = self._lines if lines is None else lines
        atomic_write_text(self.path, "".join(text + "\n" for text, _ in lines))
        self._sync_folder()  # the rename itself must reach the disk too

    def _sync_folder(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot fsync a folder; the file itself is synced
            pass
        finally:
            os.close(fd)

    # ----- validation -----
    def _validate(self, line: object, stored: bool = False) -> dict:
        """The label as stored (only :data:`FIELDS`, in that order). A line already in the file (``stored``)
        may carry other keys (hand-written files): they are kept as they were; a new one may not."""
        if not isinstance(line, dict):
            raise LabelError(f"a label must be a JSON object with {', '.join(FIELDS[:3])}, got {type(line).__name__}")
        unknown = sorted(k for k in line if k not in FIELDS)
        if unknown and not stored:
            raise LabelError(f"unknown field(s) {', '.join(map(repr, unknown))}; a label has "
                             f"{', '.join(FIELDS)} (mode optional)")
        pid = line.get("prompt_id")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise LabelError(f"prompt_id must be an integer, got {pid!r}")
        if pid not in self.prompt_ids:
            ids = sorted(self.prompt_ids)
            raise LabelError(f"prompt_id {pid} is not a prompt of this folder (ids {ids[0]}..{ids[-1]})" if ids
                             else f"prompt_id {pid}: this folder has no prompts")
        scores = line.get("scores")
        if not isinstance(scores, list) or len(scores) != self.per_prompt:
            got = f"{len(scores)} scores" if isinstance(scores, list) else repr(scores)
            raise LabelError(f"scores must be a list of {self.per_prompt} numbers (one per image of prompt {pid}), "
                             f"got {got}")
        for i, s in enumerate(scores):
            if not _is_number(s):
                raise LabelError(f"scores[{i}] must be a number, got {s!r}")
            if not _is_finite(s):
                raise LabelError(f"scores[{i}] must be a finite number, got {s!r}")
        if stored:  # D3PO also reads unnamed labels: they belong to no annotator here
            if "annotator" in line and not isinstance(line["annotator"], str):
                raise LabelError(f"annotator must be a string, got {line['annotator']!r}")
            return dict(line)
        annotator = check_annotator(line.get("annotator"))
        label = {"prompt_id": pid, "annotator": annotator, "scores": list(scores)}
        if line.get("mode") is not None:
            mode = line["mode"]
            if not isinstance(mode, str) or not MODE.fullmatch(mode):
                raise LabelError(f"mode must be a short name (letters, digits, '_' or '-'), got {mode!r}")
            label["mode"] = mode
        return label
