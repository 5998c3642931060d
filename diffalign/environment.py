"""The software a run was made with, written beside its results so that a rerun can tell why its numbers differ.

A fresh install of the same code on the same seeds need not give the same numbers: the testbed benchmark's pairs
(img2img variants from stock diffusers, rewards as coarse as a JPEG's size in bytes) and its training (peft's LoRA,
torch's kernels) go through libraries whose newer releases may change a draw or a rounding
(``docs/benchmarks.md``, "A fresh install"). So every run folder and benchmark record names the versions.
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
