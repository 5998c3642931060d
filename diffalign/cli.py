"""Command line: ``diffalign train | generate | score | make-pairs | sample | label | labels-to-pairs | eval | export |
demo``.

Errors: our own error types (:data:`USER_ERRORS`: bad config, data, model, adapter, reward, output folder or
argument) print one ``error: ...`` line to stderr and exit 2; anything else is a bug and keeps its traceback. One
case prints both: a reward head that raises (:class:`~diffalign.rewards.RewardFailed`) prints the ``error:`` line
naming the head and the prompt(s), then the head's own traceback, and exits 2.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import traceback
from pathlib import Path

from .config import ConfigError, load_config
from .console import HelpFormatter, quiet_libraries
from .data.errors import DataError
from .models import ModelLoadError
from .pipelines.export import ExportError
from .rewards.base import RewardError, RewardFailed
from .sampling.settings import Sampling, add_sampling_arguments
from .sweep import DEFAULT_PICK, PICKS
from .training.checkpoint import OutputDirError
from .training.guards import TrainingStopped


class ArgumentError(ValueError):
    """A command-line value that is refused before anything loads (``--steps 0``, ``--height 30``, ...)."""


# Our own error types, each a one-line `error:`. FileNotFoundError is the one built-in: our code raises it for a
# missing user file (an adapter folder, a checkpoint to resume) with a message naming the path.
USER_ERRORS = (ConfigError, DataError, ExportError, ModelLoadError, OutputDirError, RewardError, ArgumentError,
               FileNotFoundError)


def _train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .training.trainer import train

    result = train(load_config(args.config, args.set))
    if not PartialState().is_main_process:
        return 1 if result.stopped else 0
    if result.interrupted:
        print(f"interrupted at step {result.steps}; checkpoint-{result.steps} is in {result.output_dir}. Resume "
              "with the same command plus --set train.resume=latest")
        return 0
    print(f"adapter: {result.adapter}\nmodel card: {result.output_dir / 'README.md'}")
    if result.stopped:  # an adapter, but not the run the config asked for: a script should notice
        print(f"stopped early: {result.stopped}", file=sys.stderr)
        return 1
    return 0


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .files import atomic_save_image
    from .pipelines import image_grid, load_aligned_pipeline

    pipe = load_aligned_pipeline(args.base, args.adapter or [], args.scale or 1.0,
                                 device="cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    sampling: Sampling = args.sampling
    for i, prompt in enumerate(args.prompt):
        img = pipe(prompt, generator=sampling.generators(i, [0], 1)[0], **sampling.pipeline_kwargs()).images[0]
        path = out / f"{i:03d}.png"
        atomic_save_image(path, img)
        images.append(img)
        print(path)
    if len(images) > 1:
        atomic_save_image(out / "grid.png", image_grid(images))
        print(out / "grid.png")


def _rewards(args: argparse.Namespace):
    from .rewards import load_rewards, parse_reward_options

    return load_rewards(args.reward, parse_reward_options(args.reward_option))


def _weights(args: argparse.Namespace) -> list[float] | None:
    if args.weights is None:
        return None
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise RewardError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
    if len(weights) != len(args.reward.split(",")):
        raise RewardError(f"--weights has {len(weights)} number(s) for {len(args.reward.split(','))} reward(s)")
    return weights


def _score(args: argparse.Namespace) -> None:
    from .evaluation.scoring import score_dataset, score_folder

    if bool(args.dataset) == bool(args.images or args.prompts) or bool(args.images) != bool(args.prompts):
        raise DataError("give either --images DIR with --prompts FILE, or --dataset PAIRS")
    weights, rewards = _weights(args), _rewards(args)
    if args.dataset:
        print(score_dataset(rewards, args.dataset, args.out, weights, args.batch_size))
    else:
        print(score_folder(rewards, args.images, args.prompts, args.out or "scores.jsonl", args.batch_size))


def _make_pairs(args: argparse.Namespace) -> None:
    from .sampling.make_pairs import make_pairs

    weights, rewards = _weights(args), _rewards(args)
    print(make_pairs(args.base, args.prompts, rewards, args.out, per_prompt=args.per_prompt, adapter=args.adapter,
                     pairing=args.pairing, margin=args.margin, weights=weights, sampling=args.sampling,
                     same_start=args.same_start, refine=args.refine))


def _sample(args: argparse.Namespace) -> None:
    from .sampling.human import sample_to_folder

    print(sample_to_folder(args.base, args.prompts, args.out, per_prompt=args.per_prompt, sampling=args.sampling))


def _labels_to_pairs(args: argparse.Namespace) -> None:
    from .labelling.convert import labels_to_pairs

    print(labels_to_pairs(args.folder, args.labels, args.out, unpaired=args.unpaired))


def _sweep(args: argparse.Namespace) -> None:
    from .sweep import run_sweep, sweep_table

    axes = {name: getattr(args, name).split(",") for name in ("lr", "beta", "max_steps") if getattr(args, name)}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ArgumentError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. --grid lora.rank=4,8")
        axes[key] = values.split(",")
    if not axes:
        raise ArgumentError("sweep: give at least one axis (--lr, --beta, --max-steps or --grid KEY=V1,V2)")
    trials, best = run_sweep(args.config, axes, args.eval_pairs, args.out, args.set, args.reward, args.prompts,
                             args.seeds, args.sampling, args.pick, args.hold_out_prompts)
    print(sweep_table(trials, best))
    print(f"best: {best.name} {best.values}\n{Path(args.out) / 'best.yaml'}")


def _eval(args: argparse.Namespace) -> None:
    from .evaluation.evaluate import evaluate
    from .evaluation.report import summary_text

    rewards = _rewards(args)
    report = evaluate(args.base, args.adapter, args.prompts, rewards, args.out, seeds=args.seeds, scales=args.scale,
                      pairs=args.pairs, sampling=args.sampling)
    print(summary_text(report))
    print(f"{Path(args.out) / 'report.json'}\n{Path(args.out) / 'report.html'}")


def _export(args: argparse.Namespace) -> None:
    from .pipelines.export import export_fused, export_kohya

    if args.fuse == bool(args.format):
        raise ExportError("give either --format kohya --out FILE.safetensors or --fuse --out PIPELINE_DIR")
    if args.fuse:
        print(export_fused(args.adapter, args.out, base=args.base, scale=args.scale))
    else:
        print(export_kohya(args.adapter, args.out))


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse values no run could use, before anything loads (:class:`ArgumentError`); the sampling flags become
    ``args.sampling``, a :class:`~diffalign.sampling.settings.Sampling` (its errors name the flag)."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in ("steps", "seeds", "per_prompt", "batch_size"):  # (demo's --steps is train.max_steps)
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ArgumentError(f"{flag(name)} {value}: must be at least 1")
    if getattr(args, "resolution", None) is not None:  # `sample --resolution N`: both sides
        if args.resolution <= 0 or args.resolution % 8:
            raise ArgumentError(f"--resolution {args.resolution}: must be a positive multiple of 8")
        args.height = args.width = args.resolution
    for name in ("scale", "margin"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not math.isfinite(value):
                raise ArgumentError(f"{flag(name)} {value}: must be a finite number")
    if hasattr(args, "guidance"):  # a sampling command
        try:
            args.sampling = Sampling.from_args(args)
        except ConfigError as e:
            raise ArgumentError(str(e)) from None


def _reward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", required=True, help="reward head(s), comma-separated: built-in name, entry point or "
                   "package.module:attr")
    p.add_argument("--reward-option", action="append", default=[], metavar="HEAD.KEY=VALUE",
                   help="keyword argument for a head, e.g. aesthetic.weights=sac+logos+ava1-l14-linearMSE.pth")
    p.add_argument("--weights", default=None, help="comma-separated weights of the heads' sum (default: all 1)")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick, reward=args.reward, steps=args.steps, testbed=args.testbed)


def _train_epilog() -> str:
    from .resources import builtin_recipes

    names = builtin_recipes()
    lines, line = [], " "
    for name in names:
        if len(line) + len(name) > 100:
            lines.append(line.rstrip(","))
            line = " "
        line += f" {name},"
    lines.append(line.rstrip(","))
    return ("config keys: every section.key, its default and meaning are listed in README.md, section\n"
            "  'Configuration reference' (or in Python: diffalign.config.valid_keys() and the fields' help).\n"
            "shipped recipes (give the name to --config, e.g. --config sdxl-dpo):\n" + "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align diffusion models with human preferences.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=HelpFormatter)  # every help shows its defaults

    p = add("train", help="train a LoRA adapter from a recipe",
                       description="Train a LoRA adapter: defaults < recipe (--config) < --set overrides.",
                       epilog=_train_epilog())
    p.add_argument("--config", "-c", help="YAML recipe: a file or a shipped recipe's name (defaults < recipe < --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, repeatable; the value is YAML, e.g. train.max_steps=100 or lora.targets=[to_q,to_v]")
    p.set_defaults(func=_train)

    p = add("generate", help="generate images from a base model with aligned adapters")
    p.add_argument("--base", required=True, help="base model: hub id or local diffusers folder")
    p.add_argument("--adapter", action="append", help="adapter folder (repeatable)")
    p.add_argument("--scale", type=float, action="append", help="adapter scale, one per --adapter (default 1.0)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    add_sampling_arguments(p, helps={"seed": "seed of the first prompt; prompt i uses seed+i"})
    p.add_argument("--out", default="generated", help="output folder")
    p.set_defaults(func=_generate)

    p = add("score", help="score images, or the two images of every pair of a dataset, with reward heads")
    _reward_args(p)
    p.add_argument("--images", help="folder of images, scored in file-name order")
    p.add_argument("--prompts", help="prompts of --images: .txt (one per line, or one for all) or .jsonl")
    p.add_argument("--dataset", help="pairs dataset: local .jsonl/.csv, or Pick-a-Pic parquet / folder / hub id")
    p.add_argument("--out", help="output: .jsonl (images, or local pairs in their own folder) or .parquet (Pick-a-Pic)")
    p.add_argument("--batch-size", type=int, default=8, help="images per reward call")
    p.set_defaults(func=_score)

    p = add("make-pairs", help="generate K images per prompt, score them and write a local-pairs dataset")
    _reward_args(p)
    p.add_argument("--base", required=True, help="base model: hub id or local diffusers folder")
    p.add_argument("--adapter", default=None, help="adapter folder to generate with (default: the base alone)")
    p.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl with \"prompt\"")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (K)")
    p.add_argument("--pairing", default="best-worst", choices=["best-worst", "all", "pareto", "thumbs"],
                   help="best vs worst, all ordered pairs above --margin, Pareto dominance across heads, or thumbs: "
                        "unpaired labels for KTO (unpaired.jsonl: each prompt's top half 1, bottom half 0)")
    p.add_argument("--margin", type=float, default=0.0, help="minimum combined-score gap for a pair (thumbs: the "
                                                               "distance from the prompt's median below which an "
                                                               "image gets no label)")
    add_sampling_arguments(p, helps={"seed": "image k of prompt i uses seed + i*K + k (with --seed-policy per_image)"})
    p.add_argument("--same-start", action="store_true",
                   help="a prompt's K images start from one x_T (image 0's) and differ only by the sampler's noise "
                        "(needs --eta > 0; drawn with DDIM where the model's scheduler has no eta): each pair then "
                        "shows which way to go from the same start")
    p.add_argument("--refine", type=float, default=0.0, metavar="STRENGTH",
                   help="also draw K img2img variants of each prompt's best image at this strength (0-1; 0.35 keeps "
                        "a testbed image's layout) and pair them too: pairs that differ in detail, not in layout")
    p.add_argument("--out", required=True, help="output folder (rerun with the same settings to resume)")
    p.set_defaults(func=_make_pairs)

    p = add("sample", help="D3PO human feedback: K images per prompt from one initial latent, with their "
                       "trajectories, for people to score")
    p.add_argument("--base", required=True, help="base model: hub id or local diffusers folder")
    p.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl with \"prompt\"")
    p.add_argument("--per-prompt", type=int, default=7, help="images per prompt (the D3PO paper: 7)")
    # 20 steps: the D3PO paper's trajectories; prompt i's x_T and step noise come from one generator (seed, i)
    add_sampling_arguments(p, skip=("seed_policy",), helps={"steps": "DDIM steps",
                           "seed": "prompt i's initial latent and noise use seed and i"}, steps=20)
    p.add_argument("--resolution", type=int, default=None, help="square image size, a multiple of 8: sets "
                   "--height and --width (default: the model's own size, as generate draws)")
    p.add_argument("--out", required=True, help="output folder (images/, trajectories/, manifest.json)")
    p.set_defaults(func=_sample)

    from .labelling.cli import add_label_command

    add_label_command(sub)

    p = add("labels-to-pairs", help="people's labels of a sample or make-pairs folder -> local pairs (DPO, MaPO, "
                                    "InPO, SmPO) or unpaired labels (KTO)")
    p.add_argument("folder", help="the labelled folder (a `diffalign sample` or `diffalign make-pairs` output)")
    p.add_argument("--labels", default=None, help="label file (default: FOLDER/labels.jsonl, as `diffalign label` "
                                                  "writes)")
    p.add_argument("--unpaired", action="store_true", help="write unpaired labels for KTO instead of pairs (thumbs: "
                   "liked by most annotators = 1; rankings: each prompt's top half 1, bottom half 0)")
    p.add_argument("--out", default=None, help="output .jsonl in FOLDER or a folder above it (default: "
                                               "FOLDER/human_pairs.jsonl, or FOLDER/human_unpaired.jsonl)")
    p.set_defaults(func=_labels_to_pairs)

    p = add("sweep", help="a small grid over lr / beta / steps (or any key) picked by held-out pairs, or by a "
                          "reward's win rate; resumable")
    p.add_argument("--config", "-c", help="YAML recipe: a file or a shipped recipe's name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every trial")
    p.add_argument("--eval-pairs", required=True, help="held-out pairs (never trained on) whose implicit accuracy "
                   "picks the setting when no --reward is given")
    p.add_argument("--lr", help="learning rates, comma-separated (optim.lr)")
    p.add_argument("--beta", help="β values, comma-separated (objective.beta)")
    p.add_argument("--max-steps", help="training step counts, comma-separated (train.max_steps)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="another axis (repeatable)")
    p.add_argument("--pick", default=DEFAULT_PICK, choices=PICKS,
                   help="the held-out signal to pick by without --reward (diffalign.sweep.PICKS says what each "
                        "maximises; the README's sweep section, how well each did on the testbed benchmark)")
    p.add_argument("--reward", help="pick by this head's win rate vs the base on --prompts instead")
    p.add_argument("--prompts", help="validation prompts for the win rate (.txt or .jsonl): not the prompts you will report on")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt for the win rate")
    p.add_argument("--hold-out-prompts", action="store_true",
                   help="the trials do not train on the pairs whose prompt is among --prompts (data.exclude_prompts), "
                        "so the pick is judged on prompts no trial saw; best.yaml trains on every pair")
    add_sampling_arguments(p, seed_policy="shared", helps={"steps": "denoising steps of the win-rate images"})
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.set_defaults(func=_sweep)

    p = add("eval", help="base vs aligned images on the same prompts and seeds, scored; report.json/html")
    _reward_args(p)
    p.add_argument("--base", required=True, help="base model: hub id or local diffusers folder")
    p.add_argument("--adapter", action="append", required=True, help="adapter folder (repeatable)")
    p.add_argument("--scale", type=float, action="append", help="adapter scale, one per --adapter (default 1.0)")
    p.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl with \"prompt\"")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (the same for every model)")
    p.add_argument("--pairs", default=None, help="held-out pairs dataset for implicit and ranking accuracy")
    add_sampling_arguments(p, seed_policy="shared")  # every prompt, and every model, on the same seeds
    p.add_argument("--out", required=True, help="output folder (rerun to resume: existing images are reused)")
    p.set_defaults(func=_eval)

    p = add("export", help="export an adapter: kohya format (A1111/ComfyUI) or a fused full pipeline")
    p.add_argument("adapter", help="a diffalign output folder (or its pytorch_lora_weights.safetensors)")
    p.add_argument("--format", choices=["kohya"], help="write the LoRA in this format to --out (a .safetensors file)")
    p.add_argument("--fuse", action="store_true", help="write a full diffusers pipeline with the adapter fused in")
    p.add_argument("--scale", type=float, default=1.0, help="--fuse: adapter scale to fuse at")
    p.add_argument("--base", default=None, help="--fuse: base model (default: the one in the adapter's config.yaml)")
    p.add_argument("--out", required=True, help="output file (--format) or folder (--fuse)")
    p.set_defaults(func=_export)

    p = add("demo", help="offline end to end on the testbed model: make-pairs, Diffusion-DPO, eval")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--reward", default="shape_size", help="programmatic reward that labels the pairs "
                   "(shape_size, vividness, jpeg_compressibility, ...)")
    p.add_argument("--quick", action="store_true", help="a smoke run in under a minute (few prompts, steps, seeds)")
    p.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--testbed", choices=["sd15", "sdxl"], default="sd15",
                   help="the testbed model's architecture (both draw the same scenes)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_arguments(args)
        if args.command == "generate" and args.scale and len(args.scale) != len(args.adapter or []):
            raise ArgumentError(f"{len(args.adapter or [])} --adapter but {len(args.scale)} --scale")
        quiet_libraries()
        status = args.func(args)
    except RewardFailed as e:  # one line naming the head and prompt(s), then the head's own traceback
        print(f"error: {e}", file=sys.stderr)
        cause = e.__cause__ or e
        traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
