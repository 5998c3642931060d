"""D3PO's human-feedback path: ``diffalign sample`` writes images + trajectories, people score them, training
reads both back.

``diffalign sample`` output::

    images/p00003_2.png                 sample 2 of prompt 3 (all samples of a prompt share x_T)
    trajectories/p00003.safetensors     that prompt's Rollouts (x_T ... x_0, timesteps, log-probs, conditioning)
    manifest.json                       settings + one entry per prompt: prompt_id, prompt, images, trajectory

Label file (JSONL), one line per prompt and annotator; several annotators of a prompt are averaged:
``{"prompt_id": 3, "scores": [0, 1, 0, 0, 1, 1, 0], "annotator": "a1"}``
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.errors import DataError
from ..data.local_rows import read_utf8
from ..data.prompts import read_prompts
from ..files import atomic_save_image, atomic_write_text
from ..models import Backbone, Conditioning
from .settings import Sampling
from .trajectories import Rollouts, sample_rollouts

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def sample_to_folder(base: str, prompts_file: str | Path, out: str | Path, per_prompt: int = 7,
                     sampling: Sampling | None = None, device: str | None = None) -> Path:
    """Sample ``per_prompt`` images per prompt from one shared ``x_T`` and store their trajectories (see the
    module doc), drawn as ``sampling`` says (default: 20 steps, the D3PO paper's, η 1) and square, by default at
    the model's own size (its UNet's sample size times the VAE's scale factor: what ``generate``, ``make-pairs``
    and ``eval`` draw). Resumable: prompts whose trajectory exists are skipped. Returns the manifest path."""
    out, prompts = Path(out), read_prompts(prompts_file)
    sampling = sampling or Sampling(steps=20)
    if per_prompt < 2:
        raise DataError(f"--per-prompt {per_prompt}: people need at least 2 images per prompt to compare")
    eta = sampling.trajectory_eta("--eta ")
    backbone = Backbone.load(base)
    height, width = sampling.size(backbone.default_resolution)
    if height != width:
        raise DataError(f"--height {height} --width {width}: trajectories are square; give one size")
    resolution, seed = height, sampling.seed
    settings = {"base": str(base), "per_prompt": per_prompt, "steps": sampling.steps, "guidance": sampling.guidance,
                "eta": eta, "seed": seed, "resolution": resolution, "negative_prompt": sampling.negative_prompt}
    manifest = _read_manifest(out) if (out / MANIFEST).is_file() else None
    if manifest is not None and any(manifest.get(k, "" if k == "negative_prompt" else None) != v
                                    for k, v in settings.items()):
        raise DataError(f"{out} holds samples made with other settings; use a new --out or the same settings")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "trajectories").mkdir(exist_ok=True)
    negative = backbone.at_resolution(backbone.encode_negative(sampling.negative_prompt), resolution)
    entries = []
    for pid, prompt in enumerate(tqdm(prompts, desc="sampling", unit="prompt")):
        entry = {"prompt_id": pid, "prompt": prompt, "trajectory": f"trajectories/p{pid:05d}.safetensors",
                 "images": [f"images/p{pid:05d}_{k}.png" for k in range(per_prompt)]}
        entries.append(entry)
        if (out / entry["trajectory"]).is_file():
            continue
        cond = backbone.at_resolution(backbone.encode_prompt([prompt]), resolution)
        g = torch.Generator().manual_seed(seed * 1_000_003 + pid)
        rollouts = sample_rollouts(backbone, backbone.unet, [prompt], cond, negative, per_prompt, sampling,
                                   resolution, g)
        for k, path in enumerate(entry["images"]):
            atomic_save_image(out / path, _to_pil(rollouts.images[0, k]))
        rollouts.images = None  # the PNGs are beside it
        rollouts.save(out / entry["trajectory"])  # last: its presence marks the prompt done
    atomic_write_text(out / MANIFEST, json.dumps({**settings, "prompts": entries}, indent=1) + "\n")
    return out / MANIFEST


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def _read_manifest(folder: Path) -> dict:
    file = folder / MANIFEST
    if not file.is_file():
        raise DataError(f"{folder}: no {MANIFEST}; data.rollouts must be a `diffalign sample` output folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON ({e.msg})") from None


def read_label_lines(labels: str | Path, manifest: dict) -> list[tuple[int, list[float]]]:
    """Every label line's ``(prompt_id, scores)`` in file order; errors name the line. A torn last line (no newline
    at the end and not valid JSON: a labelling page killed mid-write) is skipped with a warning."""
    labels, k = Path(labels), manifest["per_prompt"]
    if not labels.is_file():
        raise DataError(f"data.labels={str(labels)!r}: no such file")
    ids = {e["prompt_id"] for e in manifest["prompts"]}
    text = read_utf8(labels)
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{labels}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                log.warning("%s: ignoring the torn last line (%d characters, no newline)", labels, len(line))
                continue
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        pid, scores = row.get("prompt_id") if isinstance(row, dict) else None, row.get("scores") if isinstance(row, dict) else None
        if pid not in ids:
            raise DataError(f"{where}: prompt_id {pid!r} is not in the manifest (ids 0..{len(ids) - 1})")
        if not isinstance(scores, list) or len(scores) != k or not all(isinstance(s, (int, float)) for s in scores):
            raise DataError(f"{where}: scores must be a list of {k} numbers (one per image of prompt {pid}), got {scores!r}")
        bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
        if bad is not None:
            raise DataError(f"{where}: score {bad + 1} is not a finite number ({scores[bad]}); scores must be finite")
        out.append((pid, [float(s) for s in scores]))
    if not out:
        raise DataError(f"{labels}: no labels")
    return out


def read_labels(labels: str | Path, manifest: dict) -> dict[int, torch.Tensor]:
    """Mean score per sample for every labelled prompt: ``{prompt_id: Tensor[K]}``; errors name the line."""
    sums: dict[int, list] = {}
    for pid, scores in read_label_lines(labels, manifest):
        total, count = sums.get(pid, [torch.zeros(manifest["per_prompt"]), 0])
        sums[pid] = [total + torch.tensor(scores, dtype=torch.float32), count + 1]
    return {pid: total / count for pid, (total, count) in sorted(sums.items())}


def load_labelled_rollouts(labels: str | Path, folder: str | Path | None = None) -> tuple[Rollouts, torch.Tensor, dict]:
    """The stored rollouts of every labelled prompt (concatenated), their mean scores [P, K] and the sampling
    settings from the manifest."""
    folder = Path(folder) if folder else Path(labels).parent
    manifest = _read_manifest(folder)
    scores = read_labels(labels, manifest)
    entries = {e["prompt_id"]: e for e in manifest["prompts"]}
    parts = []
    for pid in scores:
        file = folder / entries[pid]["trajectory"]
        if not file.is_file():
            raise DataError(f"{folder}: trajectory {entries[pid]['trajectory']} of prompt {pid} is missing")
        parts.append(Rollouts.load(file))
    unlabelled = len(entries) - len(scores)
    if unlabelled:
        log.info("%s: %d of %d prompts have no labels and are not used", labels, unlabelled, len(entries))
    cat = lambda name: torch.cat([getattr(p.cond, name) for p in parts]) if getattr(parts[0].cond, name) is not None else None  # noqa: E731
    rollouts = Rollouts([p.prompts[0] for p in parts], torch.cat([p.latents for p in parts]), parts[0].timesteps,
                        torch.cat([p.log_probs for p in parts]),
                        Conditioning(cat("prompt_embeds"), cat("pooled"), cat("time_ids")), parts[0].negative)
    return rollouts, torch.stack(list(scores.values())), manifest
