"""``diffalign demo``: the main job end to end, offline, on a tiny SDXL-architecture model.

Builds the tiny model and a small Pick-a-Pic-format dataset, trains Diffusion-DPO LoRA with the tiny
recipe, saves it, and renders a before/after grid (same prompts, same seeds; scale 0 is the base).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import load_config
from .pipelines import image_grid, load_aligned_pipeline
from .testing import save_tiny_pipeline, write_pickapic_parquet
from .trainer import train

PROMPTS = ["a red square on a blue background", "a yellow square on a green background",
           "a blue square on a yellow background", "a green square on a red background"]


def run_demo(out: Path, recipe: Path, steps: int | None = None) -> dict[str, Path]:
    """Run the demo into ``out``; returns the paths it wrote."""
    if not recipe.is_file():
        raise FileNotFoundError(f"demo recipe {str(recipe)!r} not found; pass --recipe assets/recipes/tiny-sdxl-dpo.yaml")
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-sdxl"
    if not (model / "model_index.json").is_file():
        save_tiny_pipeline(model, "sdxl")
    data = write_pickapic_parquet(out / "data" / "pickapic.parquet", n=32, size=48)
    overrides = [f"model.pretrained={model}", f"data.dataset={data}", f"train.output_dir={out / 'adapter'}",
                 f"cache.dir={out / 'cache'}", "log.to=tensorboard"]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    cfg = load_config(recipe, overrides)
    result = train(cfg)

    pipe = load_aligned_pipeline(str(model), result.output_dir)
    res = cfg.data.resolution
    rows = []
    for scale in (0.0, 1.0):  # before, after
        pipe.set_adapters(["aligned_0"], adapter_weights=[scale])
        for i, prompt in enumerate(PROMPTS):
            g = torch.Generator().manual_seed(i)
            rows.append(pipe(prompt, num_inference_steps=cfg.train.validation_steps, guidance_scale=5.0,
                             generator=g, height=res, width=res).images[0])
    grid = out / "before_after.png"
    image_grid(rows, cols=len(PROMPTS)).save(grid)
    paths = {"model": model, "data": data, "adapter": result.adapter, "card": result.output_dir / "README.md",
             "grid": grid, "logs": result.output_dir / "logs"}
    last = result.history[-1]
    print(f"\ntrained {result.steps} steps: loss {last['loss']:.4f}, implicit accuracy {last['implicit_acc']:.2f}")
    for name, path in paths.items():
        print(f"{name:>8}: {path}")
    print("   grid: top row = base (adapter scale 0), bottom row = aligned; same prompts and seeds")
    return paths
