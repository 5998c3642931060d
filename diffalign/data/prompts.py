"""Prompt lists: a ``.txt`` file with one prompt per line, or ``.jsonl`` with a ``"prompt"`` key per line."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError
from .local_rows import read_utf8


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in ``path`` (a file, or the name of a shipped list such as ``animals``) in file order; blank lines are skipped; an error names the file and line.
    The file must be UTF-8 (a byte-order mark is allowed); other encodings give an error naming the line and byte."""
    from ..resources import prompts_path

    path = prompts_path(path)
    if not path.is_file():
        raise DataError(f"prompts file {str(path)!r} does not exist (expected .txt, one prompt per line, or .jsonl)")
    prompts = []
    for n, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(f"{path}, line {n}: expected an object with a string \"prompt\"")
        prompts.append(row["prompt"])
    if not prompts:
        raise DataError(f"prompts file {str(path)!r} holds no prompts")
    return prompts
