"""Print the README's configuration reference (markdown) from the config dataclasses' help strings.

    python scripts/config_table.py --write   # replace the table in README.md
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from diffalign.config import Config


def table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    defaults = Config()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            value = getattr(getattr(defaults, section.name), f.name)
            rows.append(f"| `{section.name}.{f.name}` | `{value!r}` | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        text = readme.read_text()
        new = re.sub(r"(## Configuration reference\n\n)\| key \| default \| meaning \|\n(?:\|.*\n)+", lambda m: m.group(1) + table(),
                     text, count=1)
        readme.write_text(new)
    else:
        print(table(), end="")
