"""``diffalign make-pairs``: generate K images per prompt, score them, and write a local-pairs dataset.

Layout of the output folder::

    images/p00003_2.png   image k of prompt 3 (seed + 3·K + k with the default seed policy: sampling.settings)
    images/p00003_r2.png  with ``refine``: variant k of prompt 3's best image (img2img; its seed + REFINE_SEED_OFFSET)
    scores.jsonl          one line per finished prompt: prompt, image paths, seeds, every head's scores
    pairs.jsonl           the local-pairs dataset (data.md), rebuilt from scores.jsonl at the end
    unpaired.jsonl        instead, with ``pairing="thumbs"``: unpaired labels for KTO (the top half of each prompt's
                          images 1, the bottom half 0, by the combined score; ``margin`` drops the middle)
    make_pairs.json       the settings; a rerun with the same settings resumes, skipping finished prompts

A prompt is done when its line is in ``scores.jsonl``. Its images are scored in memory first, then each is written
atomically (temporary file, renamed), then the line is appended: a failing reward writes nothing of that prompt,
an interruption or error while saving removes the prompt's images written so far, and a resume clears temporary
files a hard kill left behind and regenerates every prompt without a line (same seeds, same images).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.errors import DataError
from ..data.prompts import read_prompts
from ..evaluation.scoring import score_images
from ..files import atomic_save_image, atomic_write_text
from ..rewards import RewardModel
from ..rewards.combine import PAIRINGS, combine, directions, pairs_from_scores, signed, thumbs_from_scores
from .settings import Sampling

log = logging.getLogger(__name__)

REFINE_SEED_OFFSET = 1_000_003  # a refined variant's seed: its image's seed plus this, so no draw reuses a seed


def _finished(out: Path, prompts: list[str]) -> dict[int, dict]:
    """Records of prompts already done, keeping only whole lines whose images exist (a kill mid-write loses at
    most the prompt being written)."""
    done: dict[int, dict] = {}
    file = out / "scores.jsonl"
    if not file.is_file():
        return done
    for line in file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        pid = rec.get("prompt_id")
        if isinstance(pid, int) and pid < len(prompts) and rec.get("prompt") == prompts[pid] \
                and all((out / p).is_file() for p in rec.get("images", []) + rec.get("variants", [])):
            done[pid] = rec
    return done


def _clear_partial(out: Path, done: dict[int, dict]) -> None:
    """Before resuming: remove temporary files a hard kill left in ``images/``, and rewrite ``scores.jsonl`` with
    only its whole, finished lines (so the next append never lands on a torn line)."""
    images = out / "images"
    if images.is_dir():
        for tmp in images.glob(".*.partial"):
            tmp.unlink(missing_ok=True)
    file = out / "scores.jsonl"
    if file.is_file():
        clean = "".join(json.dumps(done[i]) + "\n" for i in sorted(done))
        if file.read_text() != clean:
            atomic_write_text(file, clean)


def _save_prompt_images(out: Path, files: list[str], images: list) -> None:
    """Write one prompt's images, each atomically; on any error or interruption remove those already written."""
    written = []
    try:
        for img, f in zip(images, files):
            atomic_save_image(out / f, img)
            written.append(out / f)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _check_settings(out: Path, settings: dict) -> None:
    file = out / "make_pairs.json"
    if file.is_file():
        # folders made before the sampling block had no eta, negative prompt or seed policy: theirs were the defaults
        old = {**Sampling().as_dict(), **json.loads(file.read_text())}
        changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        if changed:
            raise DataError(f"{out} was made with other settings ({', '.join(changed)} differ); use a new --out or "
                            "the same settings to resume")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(settings, indent=2) + "\n")


def shared_start(pipe, generators: list[torch.Generator], sampling: Sampling) -> torch.Tensor:
    """The x_T of a prompt's images when they all start from one: each image's generator first draws an x_T, as the
    pipeline would from it, and every image takes the first one's. So image 0 is the image it would be with its own
    start, and image k's step noise is what image k's would be: only the start is shared."""
    from diffusers.utils.torch_utils import randn_tensor

    height, width = sampling.size(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    starts = [randn_tensor(shape, generator=g, dtype=pipe.unet.dtype) for g in generators]
    return starts[0].repeat(len(generators), 1, 1, 1)


def make_pairs(base: str, prompts_file: str | Path, rewards: Mapping[str, RewardModel], out: str | Path,
               per_prompt: int = 4, adapter: str | None = None, pairing: str = "best-worst", margin: float = 0.0,
               weights: list[float] | None = None, sampling: Sampling | None = None, device: str | None = None,
               same_start: bool = False, refine: float = 0.0) -> Path:
    """Generate (as ``sampling`` says; default :class:`Sampling`), score and pair; returns the path of
    ``pairs.jsonl`` (``unpaired.jsonl`` with ``pairing="thumbs"``). Resumable: finished prompts are skipped.
    ``same_start``: a prompt's images start from one x_T (:func:`shared_start`) and differ only by the sampler's η
    noise, so a pair shows which way to go *from the same start* (needs η > 0; a model whose scheduler has no η,
    as SDXL's Euler, draws with DDIM). ``refine`` (an img2img strength in (0, 1)): also draw K variants of each
    prompt's best image (the highest combined score), re-noised to that fraction of the schedule and denoised
    again, and pair them as well (the same ``pairing``): such a pair keeps the layout and differs in detail, so it
    says what the best image's details should be rather than which of two layouts is better."""
    from ..pipelines import load_aligned_pipeline

    if per_prompt < 2:
        raise DataError(f"--per-prompt {per_prompt}: need at least 2 images per prompt to make a pair")
    if pairing not in PAIRINGS:
        raise DataError(f"pairing {pairing!r}: choose one of {', '.join(PAIRINGS)}")
    out, prompts, sampling = Path(out), read_prompts(prompts_file), sampling or Sampling()
    if same_start and not sampling.eta:
        raise DataError(f"--same-start with --eta {sampling.eta}: from one x_T a deterministic sampler draws the same "
                        "image every time; give --eta > 0 (1: as stochastic as DDPM) and a scheduler that reads it "
                        "(DDIM)")
    if not 0 <= refine < 1:
        raise DataError(f"--refine {refine}: the img2img strength of the variants must be in (0, 1) (0: none); "
                        "0.35 keeps a testbed image's layout (docs/benchmarks.md, \"Pairs that differ in detail\")")
    settings = {"base": str(base), "adapter": str(adapter) if adapter else None, "prompts": prompts,
                "per_prompt": per_prompt, "rewards": list(rewards), "weights": weights, **sampling.as_dict(),
                **({"same_start": True} if same_start else {}),  # absent when off: older folders still resume
                **({"refine": refine} if refine else {})}
    _check_settings(out, settings)
    done = _finished(out, prompts)
    todo = [i for i in range(len(prompts)) if i not in done]
    if todo:
        _clear_partial(out, done)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_aligned_pipeline(base, [adapter] if adapter else [], device=device)
        pipe.set_progress_bar_config(disable=True)
        if same_start and "eta" not in inspect.signature(pipe.scheduler.step).parameters:
            from diffusers import DDIMScheduler

            # SDXL ships Euler, which has no η: from one start it would draw one image K times
            log.info("make-pairs --same-start: %s has no η; drawing with DDIM", type(pipe.scheduler).__name__)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        refiner, higher = (_img2img(pipe) if refine else None), directions(rewards)
        (out / "images").mkdir(exist_ok=True)
        for pid in tqdm(todo, desc="prompts", unit="prompt", initial=len(done), total=len(prompts)):
            seeds = [sampling.seed_of(pid, k, per_prompt) for k in range(per_prompt)]
            generators = sampling.generators(pid, range(per_prompt), per_prompt)
            start = shared_start(pipe, generators, sampling).to(pipe.device) if same_start else None
            images = pipe(prompts[pid], num_images_per_prompt=per_prompt, generator=generators, latents=start,
                          **sampling.pipeline_kwargs()).images
            files = [f"images/p{pid:05d}_{k}.png" for k in range(per_prompt)]
            scores = score_images(rewards, images, [prompts[pid]] * per_prompt)  # a failing head writes nothing
            record = {"prompt_id": pid, "prompt": prompts[pid], "images": files, "seeds": seeds, "scores": scores}
            if refiner is not None:
                best = max(range(per_prompt), key=combine(scores, higher, weights).__getitem__)
                variant_seeds = [s + REFINE_SEED_OFFSET for s in seeds]
                variants = refiner(prompts[pid], image=images[best], num_images_per_prompt=per_prompt, strength=refine,
                                   generator=[torch.Generator().manual_seed(s) for s in variant_seeds],
                                   **sampling.pipeline_kwargs(with_size=False)).images
                record.update(variant_of=best, variants=[f"images/p{pid:05d}_r{k}.png" for k in range(per_prompt)],
                              variant_seeds=variant_seeds,
                              variant_scores=score_images(rewards, variants, [prompts[pid]] * per_prompt))
                files, images = files + record["variants"], images + variants
            _save_prompt_images(out, files, images)
            with (out / "scores.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[pid] = record
    return write_pairs(out, [done[i] for i in sorted(done)], rewards, pairing, margin, weights)


def _img2img(pipe):
    """The img2img pipeline of ``pipe``'s own components (stock diffusers; nothing loaded again)."""
    from diffusers import AutoPipelineForImage2Image

    refiner = AutoPipelineForImage2Image.from_pipe(pipe)
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _groups(record: dict) -> list[tuple[list[str], dict[str, list[float]]]]:
    """The (images, scores) groups of one prompt that are paired among themselves: its K images, and with
    ``refine`` its K variants of the best one (a variant is never paired with an image of another layout)."""
    groups = [(record["images"], record["scores"])]
    if "variants" in record:
        groups.append((record["variants"], record["variant_scores"]))
    return groups


def write_pairs(out: Path, records: list[dict], rewards: Mapping[str, RewardModel], pairing: str, margin: float,
                weights: list[float] | None) -> Path:
    """Rebuild ``pairs.jsonl`` (``unpaired.jsonl`` for ``thumbs``; and a clean ``scores.jsonl``) from the per-prompt
    records."""
    lines, higher = [], directions(rewards)
    for rec in records:
        for images, scores in _groups(rec):
            combined = combine(scores, higher, weights)
            if pairing == "thumbs":
                for k, label in thumbs_from_scores(combined, margin):
                    lines.append(json.dumps({"prompt": rec["prompt"], "image": images[k], "label": label,
                                             "score": combined[k], **{n: scores[n][k] for n in rewards}}) + "\n")
                continue
            table = torch.tensor([scores[h] for h in rewards], dtype=torch.float64).T  # [K, heads]
            for w, l in pairs_from_scores(signed(table, list(higher.values())), pairing, combined, margin):
                row = {"prompt": rec["prompt"], "chosen": images[w], "rejected": images[l],
                       "chosen_score": combined[w], "rejected_score": combined[l]}
                for name in rewards:
                    row[f"chosen_{name}"], row[f"rejected_{name}"] = scores[name][w], scores[name][l]
                lines.append(json.dumps(row) + "\n")
    what, name = ("labels", "unpaired.jsonl") if pairing == "thumbs" else ("pairs", "pairs.jsonl")
    if not lines:
        raise DataError(f"{out}: no {what}: every prompt's images tie within margin {margin} ({pairing}); lower "
                        "--margin or raise --per-prompt")
    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out / name, "".join(lines))
    log.info("%s: %d %s from %d prompts", out / name, len(lines), what, len(records))
    return out / name
