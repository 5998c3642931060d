"""Command line: ``diffalign train | generate | demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .data.readers import DataError
from .models import ModelLoadError
from .trainer import OutputDirError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, OutputDirError, FileNotFoundError, KeyError, ImportError)
REPO_RECIPES = Path(__file__).resolve().parents[1] / "assets" / "recipes"


def _train(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from .trainer import train

    cfg = load_config(args.config, args.set)
    result = train(cfg)
    if PartialState().is_main_process:
        print(f"adapter: {result.adapter}\nmodel card: {result.output_dir / 'README.md'}")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .pipelines import image_grid, load_aligned_pipeline

    pipe = load_aligned_pipeline(args.base, args.adapter or [], args.scale or 1.0,
                                 device="cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i, prompt in enumerate(args.prompt):
        g = torch.Generator().manual_seed(args.seed + i)
        kw = {"height": args.height, "width": args.width} if args.height else {}
        img = pipe(prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=g, **kw).images[0]
        path = out / f"{i:03d}.png"
        img.save(path)
        images.append(img)
        print(path)
    if len(images) > 1:
        image_grid(images).save(out / "grid.png")
        print(out / "grid.png")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), Path(args.recipe), steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align diffusion models with human preferences.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA adapter from a recipe")
    p.add_argument("--config", "-c", help="YAML recipe (defaults < recipe < --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_steps=100")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="generate images from a base model with aligned adapters")
    p.add_argument("--base", required=True, help="base model: hub id or local diffusers folder")
    p.add_argument("--adapter", action="append", help="adapter folder (repeatable)")
    p.add_argument("--scale", type=float, action="append", help="adapter scale, one per --adapter (default 1.0)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed+i")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--out", default="generated", help="output folder")
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="offline end-to-end run on a tiny SDXL-architecture model")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--recipe", default=str(REPO_RECIPES / "tiny-sdxl-dpo.yaml"), help="recipe to train with")
    p.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "generate" and args.scale and len(args.scale) != len(args.adapter or []):
        print(f"error: {len(args.adapter or [])} --adapter but {len(args.scale)} --scale", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
