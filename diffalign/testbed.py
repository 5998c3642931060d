"""The testbed: a tiny model that really draws, its scenes, its prompt-following checker and its rewards.

Scenes are one flat shape on a flat background, e.g. "a red circle on a gray background" (32 px). The shape's
size, position and saturation are random and not in the prompt, so the programmatic rewards ``shape_size``
(larger is better), ``vividness`` (more saturated), ``left_position`` (further left), ``centredness`` (nearer the
centre), ``middle_size`` (nearer a middling size) and ``edge_sharpness`` (crisper edges) ask for something the base
model does not already do, while the checker measures what the prompt does ask for: shape colour, background
colour, shape.

The model itself (``diffalign/resources/testbed``) is trained from scratch on these scenes by ``scripts/make_testbed.py``.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from .sampling.settings import Sampling

# One testbed per architecture, trained alike on the same scenes (scripts/make_testbed.py --arch).
TESTBED_DIRS = {"sd15": Path(str(resources.files("diffalign.resources") / "testbed")),
                "sdxl": Path(str(resources.files("diffalign.resources") / "testbed_sdxl"))}
RESOLUTION = 32

SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 50), "blue": (40, 70, 230),
                 "yellow": (235, 215, 40), "purple": (150, 50, 200), "cyan": (40, 200, 210)}
BACKGROUND_COLOURS = {"black": (20, 20, 20), "white": (235, 235, 235), "gray": (128, 128, 128),
                      **SHAPE_COLOURS}
SHAPES = ("circle", "square", "triangle")
HALF_SIZE = (5.0, 11.0)  # half the shape's extent in pixels at 32 px
SATURATION = (0.6, 1.0)  # 1 = the palette colour, lower = mixed toward its own grey
MASK_THRESHOLD = 0.15  # RGB distance (in [0, 1] units) from the background that counts as shape
# How the testbed is sampled wherever its accuracy is reported (card, tests, demo, benchmark).
SAMPLING = Sampling(steps=20, guidance=5.0)
# The alignment benchmark's reward sets (scripts/bench_alignment.py, bench_sweep.py): recipes are chosen on the
# tuning rewards; the report rewards are never used to choose a setting, so they show whether the choice carries over.
REWARD_SETS = {"tuning": ("shape_size", "vividness", "jpeg_compressibility", "middle_size"),
               "report": ("left_position", "centredness", "edge_sharpness")}


def rewards_of(text: str) -> list[str]:
    """``"report"`` / ``"tuning"`` / a comma-separated list of reward names (the set names may be mixed in)."""
    return [reward for item in text.split(",") for reward in REWARD_SETS.get(item, (item,))]


def testbed_path(kind: str = "sd15") -> Path:
    """The committed testbed pipeline folder of architecture ``kind`` (``"sd15"`` or ``"sdxl"``); an error naming
    the script that makes it when missing."""
    if kind not in TESTBED_DIRS:
        raise ValueError(f"testbed kind {kind!r}: expected one of {sorted(TESTBED_DIRS)}")
    folder = TESTBED_DIRS[kind]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"testbed model not found in {folder}; make it with scripts/make_testbed.py --arch {kind}")
    return folder


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    half_size: float = 8.0
    cx: float = 16.0
    cy: float = 16.0
    saturation: float = 1.0

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_prompts() -> list[str]:
    """Every prompt of the grammar: 3 shapes x 6 colours x 8 other backgrounds = 144."""
    return [Scene(s, c, b).prompt for s, c, b in itertools.product(SHAPES, SHAPE_COLOURS, BACKGROUND_COLOURS)
            if c != b]


def split_prompts() -> tuple[list[str], list[str]]:
    """(training, held-out) prompts: every ninth combination is held out (16 prompts), so every shape, colour
    and background word is trained but the held-out combinations never are."""
    prompts = all_prompts()
    return [p for i, p in enumerate(prompts) if i % 9 != 4], [p for i, p in enumerate(prompts) if i % 9 == 4]


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """``"a red circle on a gray background"`` -> ``("circle", "red", "gray")``."""
    words = prompt.lower().replace(",", " ").split()
    try:
        colour, shape = words[1], words[2]
        background = words[words.index("background") - 1]
    except (IndexError, ValueError):
        raise ValueError(f"prompt {prompt!r} is not a testbed prompt: expected 'a COLOUR SHAPE on a COLOUR background'") from None
    if shape not in SHAPES or colour not in SHAPE_COLOURS or background not in BACKGROUND_COLOURS:
        raise ValueError(f"prompt {prompt!r}: expected a shape in {SHAPES}, a colour in {list(SHAPE_COLOURS)} and a "
                         f"background in {list(BACKGROUND_COLOURS)}")
    return shape, colour, background


def random_scene(prompt: str, rng: random.Random, size: int = RESOLUTION) -> Scene:
    """A scene for ``prompt`` with random size, position and saturation (all kept inside the frame)."""
    shape, colour, background = parse_prompt(prompt)
    half = rng.uniform(*HALF_SIZE) * size / RESOLUTION
    margin = half + 2 * size / RESOLUTION
    return Scene(shape, colour, background, half, rng.uniform(margin, size - margin), rng.uniform(margin, size - margin),
                 rng.uniform(*SATURATION))


def shape_rgb(colour: str, saturation: float) -> tuple[int, int, int]:
    """The palette colour mixed toward its own luminance grey (``saturation`` 1 = the palette colour)."""
    rgb = np.array(SHAPE_COLOURS[colour], dtype=np.float64)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    return tuple(int(round(v)) for v in np.clip(grey + saturation * (rgb - grey), 0, 255))


def render(scene: Scene, size: int = RESOLUTION, supersample: int = 8) -> Image.Image:
    """Draw ``scene`` anti-aliased (drawn ``supersample`` times larger, then box-filtered down)."""
    k = supersample
    img = Image.new("RGB", (size * k, size * k), BACKGROUND_COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    x0, y0 = (scene.cx - scene.half_size) * k, (scene.cy - scene.half_size) * k
    x1, y1 = (scene.cx + scene.half_size) * k, (scene.cy + scene.half_size) * k
    fill = shape_rgb(scene.colour, scene.saturation)
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # apex up, base at the bottom
        draw.polygon([(scene.cx * k, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((size, size), Image.BOX)


@dataclass
class Analysis:
    """What the checker sees in one image."""

    shape: str | None  # None: no shape found
    colour: str | None
    background: str
    area: float  # fraction of the image covered by the shape
    chroma: float  # mean (max - min) channel value over the shape's pixels, in [0, 1]


def _palette(colours: dict[str, tuple[int, int, int]]) -> tuple[list[str], Tensor]:
    return list(colours), torch.tensor(list(colours.values()), dtype=torch.float32) / 255


def shape_masks(images: Tensor) -> tuple[Tensor, Tensor]:
    """(background colour [B,3] = median of the one-pixel border, shape mask [B,H,W]) with isolated pixels
    removed (a pixel stays when at least 3 of its 8 neighbours are shape too)."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2)
    background = border.median(dim=2).values
    far = (images - background[:, :, None, None]).norm(dim=1) > MASK_THRESHOLD
    neighbours = F.avg_pool2d(far[:, None].float(), 3, stride=1, padding=1, count_include_pad=False)[:, 0] * 9 - far.float()
    return background, far & (neighbours >= 3)


def _shape_class(mask: Tensor) -> str | None:
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if mask.sum() < 6:
        return None
    top, bottom, left, right = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
    box = mask[top : bottom + 1, left : right + 1].float()
    fill = box.mean().item()
    h = box.shape[0]
    upper, lower = box[: h // 2].sum().item(), box[h - h // 2 :].sum().item()
    if upper < 0.6 * lower:  # a triangle with its apex up has a third of the lower half's area above the middle
        return "triangle"
    return "square" if fill > 0.88 else "circle"


def analyse(images: Tensor) -> list[Analysis]:
    """Read shape, shape colour (by hue, so saturation does not matter) and background colour (nearest palette
    colour) from images [B, 3, H, W] in [0, 1]."""
    images = images.detach().float().cpu()
    background, masks = shape_masks(images)
    bg_names, bg_palette = _palette(BACKGROUND_COLOURS)
    hue_names, hue_palette = _palette(SHAPE_COLOURS)
    hue_palette = F.normalize(hue_palette - hue_palette.mean(dim=1, keepdim=True), dim=1)
    out = []
    for img, bg, mask in zip(images, background, masks):
        bg_name = bg_names[(bg_palette - bg).norm(dim=1).argmin().item()]
        shape = _shape_class(mask)
        if shape is None:
            out.append(Analysis(None, None, bg_name, 0.0, 0.0))
            continue
        pixels = img[:, mask].T  # [N, 3]
        rgb = pixels.median(dim=0).values
        colour = hue_names[(hue_palette @ (rgb - rgb.mean())).argmax().item()]
        chroma = (pixels.max(dim=1).values - pixels.min(dim=1).values).mean().item()
        out.append(Analysis(shape, colour, bg_name, mask.float().mean().item(), chroma))
    return out


def followed(images: Tensor, prompts: list[str]) -> list[dict[str, bool]]:
    """Per image [B, 3, H, W] generated from testbed ``prompts``: whether the checker reads the shape colour, the
    background colour and the shape the prompt names, ``colour`` (both colours) and ``all`` (all three)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = []
    for seen, prompt in zip(analyse(images), prompts):
        shape, colour, background = parse_prompt(prompt)
        ok = {"shape_colour": seen.colour == colour, "background": seen.background == background,
              "shape": seen.shape == shape}
        ok["colour"] = ok["shape_colour"] and ok["background"]
        ok["all"] = ok["colour"] and ok["shape"]
        out.append(ok)
    return out


def prompt_following(images: Tensor, prompts: list[str]) -> dict[str, float]:
    """Accuracy of shape colour, background colour, shape and all three together, plus ``colour`` (both colours
    right), for images [B, 3, H, W] generated from testbed ``prompts``."""
    judged = followed(images, prompts)
    return {key: sum(ok[key] for ok in judged) / len(prompts)
            for key in ("shape_colour", "background", "colour", "shape", "all")}


class PromptColours:
    """1 where the checker reads both colours the prompt names (the shape's and the background's), else 0: the
    benchmark's guard per image, as a reward head, so an online run can use it as ``objective.guard`` (what CLIP
    similarity is for a real model). Not differentiable."""

    name, differentiable, higher_is_better = "prompt_colours", False, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return torch.tensor([float(ok["colour"]) for ok in followed(images, prompts)])


SOFT_MASK_WIDTH = 0.05  # RGB-distance width of the sigmoid whose slope stands in for the hard mask's gradient


def differentiable_masks(images: Tensor) -> Tensor:
    """The shape masks [B,H,W] of :func:`shape_masks`, exactly in value, with the gradient of a soft mask
    (``sigmoid((distance - MASK_THRESHOLD) / SOFT_MASK_WIDTH)``, the background held fixed): a straight-through
    estimator, so the testbed rewards can train reward backprop without changing a single score."""
    background, hard = shape_masks(images.detach().float())
    distance = ((images.float() - background[:, :, None, None]) ** 2).sum(dim=1).add(1e-12).sqrt()
    soft = torch.sigmoid((distance - MASK_THRESHOLD) / SOFT_MASK_WIDTH)
    return hard.float() + (soft - soft.detach())


class ShapeSize:
    """Fraction of the image the shape covers (scale: 0-1; bigger shapes score higher). Differentiable through
    :func:`differentiable_masks` (exact values, a soft mask's gradient)."""

    name, differentiable, higher_is_better = "shape_size", True, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return differentiable_masks(images).mean(dim=(1, 2))


class Vividness:
    """Mean chroma (max - min channel) of the shape's pixels (scale: 0-1; 0 when no shape is found).
    Differentiable: chroma directly, the mask through :func:`differentiable_masks`."""

    name, differentiable, higher_is_better = "vividness", True, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        images = images.float()
        mask = differentiable_masks(images)
        chroma = images.max(dim=1).values - images.min(dim=1).values
        return (chroma * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp(min=1)


MIDDLE_COVERAGE = 0.2  # about the median fraction of the frame a random scene's shape covers (0.19 over 600 scenes)


def shape_found(mask: Tensor) -> Tensor:
    """Per image [B], whether its mask [B,H,W] holds a shape (at least one mask pixel)."""
    return mask.detach().sum(dim=(1, 2)) >= 1


class MiddleSize:
    """How close the fraction of the image the shape covers is to :data:`MIDDLE_COVERAGE`: ``1 - |coverage - 0.2| /
    0.8`` (scale: 0-1; 1 at the middling size, 0 when no shape is found). Not monotone: the preferred direction
    depends on the image, as for ``centredness`` (half the training scenes' shapes should grow and half shrink; the
    base model draws larger ones, three quarters of which should shrink). Differentiable through
    :func:`differentiable_masks`."""

    name, differentiable, higher_is_better = "middle_size", True, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        mask = differentiable_masks(images.float())
        coverage = mask.mean(dim=(1, 2))
        score = 1 - (coverage - MIDDLE_COVERAGE).abs() / max(MIDDLE_COVERAGE, 1 - MIDDLE_COVERAGE)
        return torch.where(shape_found(mask), score, torch.zeros_like(score))


def shape_centroid(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x, y) of the mask's centre of mass in [0, 1] image units (pixel i's centre at (i + 0.5) / size) and
    whether a shape was found (at least one mask pixel), per image."""
    b, h, w = mask.shape
    total = mask.sum(dim=(1, 2))
    xs = (torch.arange(w, dtype=mask.dtype, device=mask.device) + 0.5) / w
    ys = (torch.arange(h, dtype=mask.dtype, device=mask.device) + 0.5) / h
    safe = total.clamp(min=1e-6)
    return (mask * xs).sum(dim=(1, 2)) / safe, (mask * ys[:, None]).sum(dim=(1, 2)) / safe, shape_found(mask)


class LeftPosition:
    """How far left the shape sits: 1 - its centre of mass's x (scale: 0-1; 0.5 at the centre, 0 when no shape is
    found). The prompts never say where the shape goes; the base draws it anywhere. Differentiable through
    :func:`differentiable_masks`."""

    name, differentiable, higher_is_better = "left_position", True, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        x, _, found = shape_centroid(differentiable_masks(images.float()))
        return torch.where(found, 1 - x, torch.zeros_like(x))


class Centredness:
    """How close the shape's centre of mass is to the image centre: 1 - distance / (half the diagonal) (scale:
    0-1; 1 at the centre, 0 when no shape is found). Not monotone in x or y, unlike ``left_position``.
    Differentiable through :func:`differentiable_masks`."""

    name, differentiable, higher_is_better = "centredness", True, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        x, y, found = shape_centroid(differentiable_masks(images.float()))
        distance = ((x - 0.5) ** 2 + (y - 0.5) ** 2).add(1e-12).sqrt() / (0.5 * 2**0.5)
        return torch.where(found, 1 - distance, torch.zeros_like(x))


class EdgeSharpness:
    """How sharp the image's edges are: ``Σ Δ² / Σ |Δ|`` over horizontal and vertical neighbour differences of the
    luminance, divided by its range (scale: 0-1). An edge of contrast c spread over w pixels adds c to Σ|Δ| and c²/w
    to Σ Δ², so the score is 1/w: 1 for a hard step, 1/2 for one blurred over two pixels, whatever the contrast;
    noise lowers it (many small differences). A different kind of taste from the shape rewards: texture, not
    geometry or colour. Differentiable."""

    name, differentiable, higher_is_better = "edge_sharpness", True, True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        lum = (images.float() * torch.tensor([0.299, 0.587, 0.114], device=images.device)[:, None, None]).sum(dim=1)
        dx, dy = lum[:, :, 1:] - lum[:, :, :-1], lum[:, 1:] - lum[:, :-1]
        square = (dx**2).sum(dim=(1, 2)) + (dy**2).sum(dim=(1, 2))
        absolute = (dx.abs().sum(dim=(1, 2)) + dy.abs().sum(dim=(1, 2))).clamp(min=1e-6)
        span = (lum.flatten(1).max(dim=1).values - lum.flatten(1).min(dim=1).values).clamp(min=1e-3)
        return (square / absolute / span).clamp(max=1.0)
