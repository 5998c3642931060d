"""``diffalign eval``: base vs aligned images on the same prompts and seeds, scored by every head, reported.

Output folder::

    images/<model>/p0003_s1.png   prompt 3, seed index 1 (reused when present, so an interrupted eval resumes;
                                  the seed is sampling.seed + 1 with the default shared seed policy)
    report.json                   mean scores, win rates vs base with 95% intervals, held-out pair accuracies
    report.html                   grids per prompt, the numbers, and plots (plots/*.png), beside the images
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.errors import DataError
from ..data.prompts import read_prompts
from ..files import atomic_save_image, atomic_write_text
from ..pipelines.grids import labelled_grid
from ..rewards import RewardModel
from ..rewards.combine import directions
from ..sampling.settings import Sampling
from .card import update_card_with_eval
from .metrics import outcomes, pair_accuracies, paired_difference, prompt_groups, win_rate
from .report import write_html
from .scoring import score_images


def model_names(adapters: Sequence[str | Path]) -> list[str]:
    """``base`` plus one unique name per adapter (its folder name)."""
    names = ["base"]
    for adapter in adapters:
        name = Path(adapter).resolve().name or "adapter"
        while name in names:
            name += "_"
        names.append(name)
    return names


def adapter_differences(adapters: Sequence[str], scores: Mapping[str, Mapping[str, list[float]]],
                        rewards: Mapping[str, RewardModel], groups: Sequence[int]) -> list[dict]:
    """Every pair of ``adapters`` (each earlier one as ``a``) under every head: how much higher ``a``'s win rate
    against the base is than ``b``'s on the same (prompt, seed) comparisons, with its 95% interval over prompts
    (:func:`~diffalign.evaluation.metrics.paired_difference`): whether one adapter is measurably better; and, as
    ``seed_low``/``seed_high``, the interval for these prompts on other seeds."""
    rows = []
    for i, a in enumerate(adapters):
        for b in adapters[i + 1:]:
            for head, reward in rewards.items():
                base = scores["base"][head]
                pair = (outcomes(scores[a][head], base, reward.higher_is_better),
                        outcomes(scores[b][head], base, reward.higher_is_better), groups)
                diff, low, high = paired_difference(*pair)
                _, seed_low, seed_high = paired_difference(*pair, over="seeds")
                rows.append({"a": a, "b": b, "head": head, "difference": diff, "low": low, "high": high,
                             "seed_low": seed_low, "seed_high": seed_high})
    return rows


@contextmanager
def shared_base_images(cache: Path, out: Path) -> Iterator[None]:
    """Around an evaluation into ``out`` whose base images other evaluations share (same base, prompts, seeds and
    sampling): they are copied in from ``cache`` when it exists, so ``generate`` draws none of them, and the first
    evaluation's are kept in ``cache`` for the next."""
    if cache.is_dir():
        shutil.copytree(cache, out / "images" / "base", dirs_exist_ok=True)
    yield
    if not cache.is_dir():
        shutil.copytree(out / "images" / "base", cache)


def reuse_images(earlier: Path, out: Path, moved: Mapping[int, int] | None = None) -> None:
    """Before evaluating into a new folder ``out``: copy in the images of an ``earlier`` evaluation of the same models
    on the same prompts and seeds, so evaluating on more seeds draws only the new ones (``generate`` keeps the files
    it finds). With ``moved`` the earlier evaluation was on other prompts, with the same seeds: its prompt ``i`` is
    ``out``'s prompt ``moved[i]``, and prompts not in ``moved`` are left out."""
    if not (earlier / "images").is_dir() or out.exists():
        return
    if moved is None:
        shutil.copytree(earlier / "images", out / "images")
        return
    for image in (earlier / "images").glob("*/p*_s*.png"):
        prompt, seed = image.stem[1:].split("_s")
        if int(prompt) in moved:
            target = out / "images" / image.parent.name / image_name(moved[int(prompt)], int(seed))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, target)


def image_name(prompt: int, seed: int) -> str:
    """The file name of a model's image of prompt index ``prompt`` at seed index ``seed`` (``p0003_s1.png``)."""
    return f"p{prompt:04d}_s{seed}.png"


def generate(base: str, adapter: str | None, scale: float, prompts: list[str], seeds: int, folder: Path,
             sampling: Sampling, device: str) -> list[Path]:
    """Images of one model for every (prompt, seed), in that order, drawn as ``sampling`` says; existing files
    are reused."""
    paths = [folder / image_name(i, s) for i in range(len(prompts)) for s in range(seeds)]
    todo = [k for k, p in enumerate(paths) if not p.is_file()]
    if todo:
        from ..pipelines import load_aligned_pipeline

        pipe = load_aligned_pipeline(base, [adapter] if adapter else [], [scale] if adapter else 1.0, device=device)
        pipe.set_progress_bar_config(disable=True)
        folder.mkdir(parents=True, exist_ok=True)
        by_prompt: dict[int, list[int]] = {}
        for k in todo:
            by_prompt.setdefault(k // seeds, []).append(k % seeds)
        bar = tqdm(total=len(todo), desc=f"generating {folder.name}", unit="image")
        for i, missing in by_prompt.items():
            # One call per prompt; each image has its own seeded generator, so it is the image a call with
            # that seed alone would draw (up to batched-arithmetic rounding).
            images = pipe(prompts[i], num_images_per_prompt=len(missing),
                          generator=sampling.generators(i, missing, seeds), **sampling.pipeline_kwargs()).images
            for s, image in zip(missing, images):
                path = paths[i * seeds + s]
                atomic_save_image(path, image)
            bar.update(len(missing))
        bar.close()
    return paths


def evaluate(base: str, adapters: Sequence[str | Path], prompts_file: str | Path, rewards: Mapping[str, RewardModel],
             out: str | Path, seeds: int = 4, scales: Sequence[float] | None = None, pairs: str | None = None,
             sampling: Sampling | None = None, device: str | None = None) -> dict:
    """Run the evaluation (see the module doc) and return the report. ``sampling`` defaults to
    :class:`Sampling` with the shared seed policy (every prompt on the same seeds)."""
    out, prompts = Path(out), read_prompts(prompts_file)
    sampling = sampling or Sampling(seed_policy="shared")
    _check_sampling(out, sampling)
    if seeds < 1:
        raise DataError(f"--seeds {seeds}: need at least one seed")
    scales = list(scales) if scales else [1.0] * len(adapters)
    if len(scales) != len(adapters):
        raise DataError(f"{len(adapters)} --adapter but {len(scales)} --scale")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = model_names(adapters)
    sources = [None, *adapters]
    images, scores = {}, {}
    for name, adapter, scale in zip(names, sources, [1.0, *scales]):
        images[name] = generate(base, str(adapter) if adapter else None, scale, prompts, seeds, out / "images" / name,
                                sampling, device)
        texts = [p for p in prompts for _ in range(seeds)]
        scores[name] = score_images(rewards, [Image.open(p).convert("RGB") for p in images[name]], texts)
    report = {"base": base, "prompts": prompts, "seeds": seeds, "steps": sampling.steps,
              "guidance": sampling.guidance, "sampling": sampling.as_dict(),
              "models": {n: {"adapter": str(a) if a else None, "scale": s} for n, a, s in zip(names, sources, [1.0, *scales])},
              "mean_scores": {n: {h: sum(v) / len(v) for h, v in scores[n].items()} for n in names},
              "win_rates": {}, "pair_accuracy": {}}
    groups = prompt_groups(len(prompts), seeds)
    for name in names[1:]:
        report["win_rates"][name] = {h: vars(win_rate(scores[name][h], scores["base"][h], r.higher_is_better, groups))
                                     for h, r in rewards.items()}
    report["differences"] = adapter_differences(names[1:], scores, rewards, groups)
    if pairs:
        report["pair_accuracy"] = held_out_accuracies(base, dict(zip(names[1:], adapters)), pairs, device,
                                                      sampling.height)
    report["scores"] = scores
    report["images"] = {n: [str(p.relative_to(out)) for p in images[n]] for n in names}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    grids = {}
    for name in names[1:]:
        grids[name] = out / "plots" / f"samples_{name}.png"
        n = min(len(prompts), 8)  # base over this adapter, first seed of the first prompts, enlarged and labelled
        atomic_save_image(grids[name], labelled_grid({m if m == "base" else "aligned": [
            Image.open(images[m][i * seeds]) for i in range(n)] for m in ("base", name)}))
    write_html(out, report, directions(rewards))
    for name, adapter in zip(names[1:], adapters):
        update_card_with_eval(Path(adapter), name, report, grids[name])
    return report


def _check_sampling(out: Path, sampling: Sampling) -> None:
    """An eval folder reuses its images, so a rerun must draw them the same way (reports written before the
    sampling block recorded only steps and guidance: the rest were the defaults)."""
    file = out / "report.json"
    if not file.is_file():
        return
    try:
        old = json.loads(file.read_text())
    except json.JSONDecodeError:
        return  # a torn report is rewritten; its images are what the current settings draw at worst
    was = {**Sampling(seed_policy="shared").as_dict(), "steps": old.get("steps"), "guidance": old.get("guidance"),
           **old.get("sampling", {})}
    changed = sorted(k for k, v in sampling.as_dict().items() if was.get(k) != v)
    if changed:
        raise DataError(f"{out} holds images drawn with other sampling settings ({', '.join(changed)} differ); use a "
                        "new --out or the same settings to resume")


def held_out_accuracies(base: str, adapters: Mapping[str, str | Path], pairs: str, device: str,
                        resolution: int | None = None) -> dict:
    """Implicit and ranking accuracy of each adapter on a held-out pairs dataset (at ``resolution``, default the
    model's native size)."""
    from ..config import DataConfig
    from ..data.dataset import RawPairDataset
    from ..data.readers import load_pairs
    from ..models import Backbone
    from ..pipelines import adapter_file

    source = load_pairs(DataConfig(dataset=pairs))
    backbone = Backbone.load(base)
    backbone.to(device)
    # The model's native size (the UNet's sample size times the VAE's downsampling), as its pipeline draws.
    resolution = resolution or backbone.default_resolution
    raw = RawPairDataset(source, resolution, seed=0, random_flip=False, center_crop=True)
    result = {}
    for name, adapter in adapters.items():
        backbone.unet.load_lora_adapter(str(adapter_file(adapter)), prefix="unet", adapter_name=name)
        backbone.unet.set_adapters([name])
        result[name] = pair_accuracies(backbone, raw, resolution, device=device)
        backbone.unet.delete_adapters(name)
    return result
