"""The software a run was made with, written beside its results so that a rerun can tell why its numbers differ.

A fresh install of the same code on the same seeds need not give the same numbers: on a new machine the testbed
benchmark's pairs were byte-identical, yet training on them moved one KTO run's win rate from 0.820 to 0.371
(``docs/benchmarks.md``, "A fresh install"; the earlier versions were not recorded, so the cause is not traced).
So every run folder and benchmark record names the versions.
"""

from __future__ import annotations

import platform
from importlib import metadata

# the packages whose releases can move a run's numbers: sampling, training, image encoding, the array maths
PACKAGES = ("diffalign", "torch", "diffusers", "transformers", "peft", "accelerate", "pillow", "numpy",
            "open-clip-torch")


def package_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.14.1", ...}``: Python and each of :data:`PACKAGES` as installed
    (``"not installed"`` for an optional one that is absent)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
