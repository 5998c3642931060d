"""Print the README's configuration reference (markdown) from the config dataclasses' help strings: one table of
the sections, then each built-in objective's own options under its name.

    python scripts/config_table.py --write   # replace the reference in README.md
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from diffalign.config import Config, options_class
from diffalign.registry import BUILTIN_OBJECTIVES

START, END = "<!-- config-table -->", "<!-- /config-table -->"


def _rows(prefix: str, instance) -> list[str]:
    return [f"| `{prefix}.{f.name}` | `{getattr(instance, f.name)!r}` | {f.metadata.get('help', '')} |"
            for f in dataclasses.fields(instance)]


def table() -> str:
    head = ["| key | default | meaning |", "|---|---|---|"]
    rows = list(head)
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.name == "objective":
            name = dataclasses.fields(type(defaults.objective))[0]
            rows.append(f"| `objective.name` | `{defaults.objective.name!r}` | {name.metadata['help']} The section's "
                        "other keys are that objective's own options (below). |")
            continue
        rows += _rows(section.name, getattr(defaults, section.name))
    parts = ["\n".join(rows), "", "The `objective:` section holds `name` and the options of that objective "
             "(a plug-in objective declares its own the same way, as an `Options` dataclass):"]
    for name in BUILTIN_OBJECTIVES:
        parts += ["", f"**`{name}`**", "", "\n".join(head + _rows("objective", options_class(name)()))]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        text = readme.read_text()
        if START not in text:  # first run: put markers around the old single table
            text = re.sub(r"(## Configuration reference\n\n)(\| key \| default \| meaning \|\n(?:\|.*\n)+)",
                          lambda m: f"{m.group(1)}{START}\n{m.group(2)}{END}\n", text, count=1)
        text = re.sub(re.escape(START) + r"\n.*?" + re.escape(END), lambda m: f"{START}\n{table()}{END}", text,
                      count=1, flags=re.S)
        readme.write_text(text)
    else:
        print(table(), end="")
