"""How far an aligned testbed model moves the shape, read from ``diffalign eval`` folders (``images/base`` and
``images/adapter``, the same prompt and seed under the same file name).

For each folder: the mean distance the shape's centre of mass moved (pixels), the mean shift (x right, y down),
the mean cosine of each shift with the direction from the base image's shape to the image centre, the shape's mean
distance from the centre before and after, and how often the aligned image is the nearer to the centre (the
``centredness`` win rate, ties counting half) in the half of the images whose base shape lies farther from the
centre and in the other half. Also the contraction: per axis, the slope of the shift on the base shape's offset
from the centre (-1 would put every shape at the centre, 0 moves them all alike, whatever the mean shift); and how
often moving every base shape by the mean shift alone would bring it nearer (what a uniform move explains). It reads
what the win rate alone hides: whether a model moved the shapes a lot or a little, and towards where. Images where
either model drew no shape are left out (and counted).

    python scripts/shape_shift.py runs/generalise/centredness-seed0/dpo/eval [more eval folders]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def centres(folder: Path, names: list[str]):
    """[N, 2] shape centres in [0, 1] image units, whether a shape was found [N], and the image size, for the PNGs
    ``names`` of ``folder``."""
    import torch
    from PIL import Image

    from diffalign.evaluation.scoring import to_tensor
    from diffalign.testbed import differentiable_masks, shape_centroid

    images = to_tensor([Image.open(folder / n).convert("RGB") for n in names])
    x, y, found = shape_centroid(differentiable_masks(images).detach())
    return torch.stack([x, y], dim=1).double(), found, images.shape[-1]


def summary(eval_dir: Path) -> str:
    """One line of shift statistics for an eval folder."""
    import torch

    base_dir, adapter_dir = eval_dir / "images" / "base", eval_dir / "images" / "adapter"
    names = sorted(p.name for p in base_dir.glob("*.png"))
    missing = [n for n in names if not (adapter_dir / n).is_file()]
    if not names or missing:
        raise SystemExit(f"{eval_dir}: expected the same PNGs under images/base and images/adapter "
                         f"({len(names)} base images, {len(missing)} without an adapter image)")
    base, found_base, size = centres(base_dir, names)
    aligned, found_aligned, _ = centres(adapter_dir, names)
    both = found_base & found_aligned  # an image without a shape has no centre to compare
    base, aligned, names = base[both], aligned[both], [n for n, keep in zip(names, both.tolist()) if keep]
    shift, to_centre = aligned - base, 0.5 - base
    before, after = to_centre.norm(dim=1), (0.5 - aligned).norm(dim=1)
    cosine = (shift * to_centre).sum(1) / (shift.norm(dim=1) * before).clamp(min=1e-12)
    def nearer_than_base(distance):  # per image 1 if nearer the centre than the base shape, 0.5 on a tie, else 0
        return (distance < before).double() + 0.5 * (distance == before).double()

    nearer = nearer_than_base(after)
    uniform_nearer = nearer_than_base((to_centre - shift.mean(0)).norm(dim=1))  # all moved by the mean shift instead
    far = torch.zeros_like(before, dtype=torch.bool)
    far[before.argsort(descending=True)[: len(names) // 2]] = True  # the half farther from the centre, ties by rank
    mean_shift = shift.mean(0) * size
    spread = base - base.mean(0)  # the offset from the centre, less its mean: a least-squares slope per axis
    contraction = (spread * (shift - shift.mean(0))).sum(0) / (spread**2).sum(0).clamp(min=1e-12)
    return (f"{eval_dir}: moved {shift.norm(dim=1).mean() * size:.2f} px on average (mean shift "
            f"{mean_shift[0]:+.2f}, {mean_shift[1]:+.2f}; contraction x {contraction[0]:+.2f}, y {contraction[1]:+.2f}), "
            f"cosine with the way to the centre {cosine.mean():+.2f}, "
            f"distance from the centre {before.mean() * size:.2f} -> {after.mean() * size:.2f} px, nearer the centre "
            f"{nearer.mean():.3f} (base far from it: {nearer[far].mean():.3f}, near it: {nearer[~far].mean():.3f}; "
            f"by the mean shift alone: {uniform_nearer.mean():.3f}; "
            f"{len(names)} images of {size} px with a shape in both, {int((~both).sum())} left out)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="diffalign eval output folders")
    for eval_dir in parser.parse_args(argv).eval_dirs:
        print(summary(eval_dir))


if __name__ == "__main__":
    main()
