"""What the package needs at run time, shipped inside it: recipes, prompt lists, accelerate launcher configs and
the testbed model.

Read through :mod:`importlib.resources`, so an installed wheel works from any folder. A recipe or a prompt list
can be named by its bare name (``sdxl-dpo``, ``animals``) wherever a file path is accepted.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def resource_dir(name: str) -> Path:
    """The folder ``name`` (``recipes``, ``prompts``, ``accelerate``, ``testbed``) inside the installed package."""
    folder = Path(str(resources.files(__name__) / name))
    if not folder.is_dir():
        raise FileNotFoundError(f"diffalign's {name}/ folder is missing from the installed package ({folder}); "
                                "reinstall diffalign")
    return folder


def builtin_recipes() -> list[str]:
    """Names of the shipped recipes (``sdxl-dpo``, ``testbed-d3po``, ...)."""
    return sorted(p.stem for p in resource_dir("recipes").glob("*.yaml"))


def builtin_prompt_lists() -> list[str]:
    """Names of the shipped prompt lists (``animals``, ...)."""
    return sorted(p.stem for p in resource_dir("prompts").glob("*.txt"))


def _named(path: str | Path, folder: str, suffix: str) -> Path:
    """``path`` itself when it exists or looks like a path; else the shipped file of that name, when there is one."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    shipped = resource_dir(folder) / (path.name if path.suffix == suffix else path.name + suffix)
    return shipped if shipped.is_file() else path


def recipe_path(path: str | Path) -> Path:
    """A recipe file: a path, or the bare name of a shipped recipe (``sdxl-dpo`` or ``sdxl-dpo.yaml``)."""
    return _named(path, "recipes", ".yaml")


def prompts_path(path: str | Path) -> Path:
    """A prompt list: a path, or the bare name of a shipped list (``animals``)."""
    return _named(path, "prompts", ".txt")
