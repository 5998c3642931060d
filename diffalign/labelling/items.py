"""What a folder to label holds: its prompts and each prompt's images.

Two layouts are recognised:

- a ``diffalign sample`` folder (D3PO trajectories): ``manifest.json`` with ``per_prompt`` and one entry per
  prompt (``prompt_id``, ``prompt``, ``images``); see :mod:`diffalign.sampling.human`;
- a ``diffalign make-pairs`` folder: ``scores.jsonl``, one record per finished prompt (``prompt_id``, ``prompt``,
  ``images``, ...), and ``make_pairs.json`` with the settings (``per_prompt``); see
  :mod:`diffalign.sampling.make_pairs`.

Image paths stay relative to the folder, as both layouts write them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from ..data.errors import DataError
from ..data.local_rows import read_utf8

MANIFEST = "manifest.json"  # diffalign sample (diffalign.sampling.human.MANIFEST; not imported: it pulls in torch)
SCORES = "scores.jsonl"  # diffalign make-pairs
SETTINGS = "make_pairs.json"


@dataclass
class Item:
    """One prompt to label: its id (as the label file names it), its text and its images (relative paths)."""

    prompt_id: int
    prompt: str
    images: list[str]


@dataclass
class LabelFolder:
    """A folder to label: which tool wrote it, how many images each prompt has, and its prompts by id."""

    folder: Path
    kind: Literal["sample", "make-pairs"]
    per_prompt: int
    items: list[Item]

    @property
    def prompt_ids(self) -> list[int]:
        return [item.prompt_id for item in self.items]


def read_items(folder: str | Path) -> LabelFolder:
    """The prompts and images of a ``diffalign sample`` folder (``manifest.json``) or a ``diffalign make-pairs``
    folder (``scores.jsonl``), in prompt-id order. A :class:`DataError` (one line) for a folder that is neither,
    a malformed manifest or record, or an image that is missing or lies outside the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give a `diffalign sample` or `diffalign make-pairs` output folder")
    if (folder / MANIFEST).is_file():
        result = _read_sample(folder)
    elif (folder / SCORES).is_file():
        result = _read_make_pairs(folder)
    else:
        raise DataError(f"{folder}: neither {MANIFEST} (a `diffalign sample` folder) nor {SCORES} (a "
                        "`diffalign make-pairs` folder); nothing to label")
    if not result.items:
        raise DataError(f"{folder}: no prompts to label in {MANIFEST if result.kind == 'sample' else SCORES}")
    for item in result.items:
        if len(item.images) != result.per_prompt:
            raise DataError(f"{folder}: prompt {item.prompt_id} has {len(item.images)} images, the folder's other "
                            f"prompts {result.per_prompt}; every prompt needs the same number")
        for image in item.images:
            _check_image(folder, item.prompt_id, image)
    return result


def _read_sample(folder: Path) -> LabelFolder:
    file = folder / MANIFEST
    try:
        manifest = json.loads(read_utf8(file))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("prompts"), list):
        raise DataError(f"{file}: no \"prompts\" list; is this a `diffalign sample` manifest?")
    per_prompt = manifest.get("per_prompt")
    if not _is_int(per_prompt) or per_prompt < 1:
        raise DataError(f"{file}: per_prompt must be a positive integer, got {per_prompt!r}")
    items = [_item(entry, f"{file}, prompts[{n}]") for n, entry in enumerate(manifest["prompts"])]
    return LabelFolder(folder, "sample", per_prompt, _unique_sorted(items, file))


def _read_make_pairs(folder: Path) -> LabelFolder:
    file = folder / SCORES
    records: dict[int, Item] = {}
    for line in read_utf8(file).splitlines():
        # as make-pairs itself does on resume: a torn or malformed line is a prompt not finished yet
        try:
            rec = json.loads(line)
            item = _item(rec, "")
        except (json.JSONDecodeError, DataError):
            continue
        records[item.prompt_id] = item  # a repeated prompt: the later line wins, as in make-pairs
    items = [records[pid] for pid in sorted(records)]
    per_prompt = len(items[0].images) if items else 0
    settings = folder / SETTINGS
    if settings.is_file():
        try:
            declared = json.loads(read_utf8(settings)).get("per_prompt")
        except (json.JSONDecodeError, AttributeError):
            raise DataError(f"{settings}: not a JSON object of make-pairs settings") from None
        if declared is not None:
            if not _is_int(declared) or declared < 1:
                raise DataError(f"{settings}: per_prompt must be a positive integer, got {declared!r}")
            per_prompt = declared
    return LabelFolder(folder, "make-pairs", per_prompt, items)


def _item(entry: object, where: str) -> Item:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: not a JSON object")
    pid, prompt, images = entry.get("prompt_id"), entry.get("prompt"), entry.get("images")
    if not _is_int(pid) or pid < 0:
        raise DataError(f"{where}: prompt_id must be a non-negative integer, got {pid!r}")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: prompt of prompt {pid} must be a string, got {prompt!r}")
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise DataError(f"{where}: images of prompt {pid} must be a non-empty list of paths, got {images!r}")
    return Item(pid, prompt, list(images))


def _unique_sorted(items: list[Item], file: Path) -> list[Item]:
    seen: set[int] = set()
    for item in items:
        if item.prompt_id in seen:
            raise DataError(f"{file}: prompt_id {item.prompt_id} appears twice")
        seen.add(item.prompt_id)
    return sorted(items, key=lambda item: item.prompt_id)


def _check_image(folder: Path, pid: int, image: str) -> None:
    """The image must be a file inside the folder: the page serves nothing else (see the /images route)."""
    rel = PurePosixPath(image)
    if rel.is_absolute() or ".." in rel.parts or "\\" in image:
        raise DataError(f"{folder}: image {image!r} of prompt {pid} is not a path inside the folder")
    path = folder / rel
    if not path.is_file():
        raise DataError(f"{folder}: image {image} of prompt {pid} is missing")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"{folder}: image {image} of prompt {pid} links outside the folder")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
