"""``diffalign demo``: the main job end to end, offline, on the testbed model that really draws.

1. ``make-pairs``: the testbed draws K images for each training prompt; a programmatic reward (default
   ``shape_size``: bigger shapes preferred) picks best and worst. The same for the held-out prompts.
2. ``train``: Diffusion-DPO LoRA with the shipped recipe ``testbed-dpo``.
3. ``eval``: base and aligned on held-out prompts x seeds (same seeds): reward win rate with its 95% interval,
   prompt following (the testbed checker) before and after as the guard, implicit and ranking accuracy on the
   held-out pairs; a before/after grid and ``report.md``.

:func:`align_and_evaluate` is the shared core of the demo and ``scripts/bench_alignment.py``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import testbed as tb
from .config import load_config
from .evaluation.report import prompt_bounds
from .files import atomic_copy, atomic_write_text
from .resources import builtin_recipes, recipe_path
from .rewards import load_reward
from .sampling.settings import Sampling


@dataclass(frozen=True)
class Budget:
    """How much the demo (or one benchmark run) draws, trains and evaluates."""

    train_prompts: int = 128  # training prompts used (the first N of the testbed's 128)
    held_out_prompts: int = 16  # held-out prompts used for evaluation and held-out pairs
    per_prompt: int = 8  # images per prompt for make-pairs (best vs worst of 8: clearer preferences than of 4)
    held_out_per_prompt: int = 8  # images per held-out prompt for the held-out pairs (every ordered pair of them)
    sample_steps: int = tb.SAMPLING.steps  # denoising steps for pairs and evaluation
    eval_seeds: int = 8  # seeds per held-out prompt in the evaluation
    train_steps: int | None = None  # None: the recipe's train.max_steps
    seed: int = 0  # of the whole pipeline: the pairs' images, training (train.seed) and the evaluation's seeds
    testbed: str = "sd15"  # which testbed model: the SD1.5 or the SDXL architecture (same scenes, same checker)
    same_start: bool = False  # training pairs: a prompt's images from one x_T, differing by η = 1 noise (make-pairs)
    # training pairs also best vs worst of 8 img2img variants of each prompt's best image (make-pairs --refine): pairs
    # that differ in detail, not layout. Adopted on the tuning rewards (docs/benchmarks.md, "Pairs that differ in
    # detail"); 0: none
    refine: float = 0.35

    def sampling(self, offset: int = 0, **changes) -> Sampling:
        """The testbed's sampling at this budget's steps, seeded ``offset`` past this budget's seed (seed 0: the
        seeds every earlier measurement used)."""
        return dataclasses.replace(tb.SAMPLING, steps=self.sample_steps, seed=self.seed * 1_000_003 + offset, **changes)


FULL = Budget()
QUICK = Budget(train_prompts=12, held_out_prompts=4, per_prompt=2, held_out_per_prompt=2, sample_steps=6, eval_seeds=2,
               train_steps=4)


def objective_overrides(items: list[str]) -> dict[str, list[str]]:
    """``["dpo:optim.lr=1e-4", ...]`` (the benchmark scripts' ``--set``) -> ``{"dpo": ["optim.lr=1e-4"], ...}``."""
    overrides: dict[str, list[str]] = {}
    for item in items:
        name, _, override = item.partition(":")
        overrides.setdefault(name, []).append(override)
    return overrides


def is_online(objective: str) -> bool:
    """Whether ``objective`` samples its own rollouts (no pairs needed)."""
    from .registry import objective_class

    return objective_class(objective).data in ("rollouts", "rewarded_rollouts", "prompts")


def write_prompt_files(out: Path, budget: Budget) -> tuple[Path, Path]:
    """The testbed's training and held-out prompts (cut to the budget) as text files under ``out``."""
    train, held = tb.split_prompts()
    out.mkdir(parents=True, exist_ok=True)
    files = out / "train_prompts.txt", out / "held_out_prompts.txt"
    atomic_write_text(files[0], "\n".join(train[: budget.train_prompts]) + "\n")
    atomic_write_text(files[1], "\n".join(held[: budget.held_out_prompts]) + "\n")
    return files


def make_testbed_pairs(out: Path, reward: str, budget: Budget, adapter: str | None = None) -> tuple[str, str]:
    """Reward-labelled pairs from the testbed for the training and held-out prompts: (train, held-out) pairs.jsonl.
    Beside the training pairs, ``unpaired.jsonl`` holds thumbs of the same images (each prompt's top half by the
    reward 1, its bottom half 0) for KTO."""
    from .sampling.make_pairs import make_pairs

    train_prompts, held_prompts = write_prompt_files(out / "prompts", budget)
    heads = {reward: load_reward(reward)}
    kwargs = dict(per_prompt=budget.per_prompt, adapter=adapter, same_start=budget.same_start, refine=budget.refine,
                  sampling=budget.sampling(eta=1.0) if budget.same_start else budget.sampling())
    model = str(tb.testbed_path(budget.testbed))
    make_pairs(model, train_prompts, heads, out / "pairs", pairing="thumbs", **kwargs)
    train = make_pairs(model, train_prompts, heads, out / "pairs", **kwargs)  # the same images
    # Every ordered pair of the held-out images (28 per prompt, not 1): the held-out accuracies then move in steps
    # of 1/448, not 1/16, fine enough to rank runs (what `diffalign sweep` picks by).
    held = make_pairs(model, held_prompts, heads, out / "held_out_pairs", per_prompt=budget.held_out_per_prompt,
                      pairing="all", sampling=budget.sampling(10_000))
    return str(train), str(held)


def testbed_recipe(objective: str, testbed: str = "sd15") -> Path:
    """The shipped recipe of ``objective`` on the ``testbed`` model: ``testbed-<testbed>-<objective>`` where that
    testbed has settings of its own (the SDXL twin's DPO: its step sizes differ from the SD1.5 testbed's), else
    ``testbed-<objective>``."""
    name = objective.replace("_", "-")
    own = f"testbed-{testbed}-{name}"
    return recipe_path(own if own in builtin_recipes() else f"testbed-{name}")


def train_on_testbed(out: Path, objective: str, pairs: str, budget: Budget, reward: str, prompts: Path,
                     overrides: list[str] = (), eval_pairs: str | None = None):
    """Train the shipped recipe (:func:`testbed_recipe`) from the testbed into ``out / "adapter"``: from ``pairs``,
    or, for an online objective (D3PO, DDPO, GRPO), on ``prompts`` with ``reward``; ``eval_pairs`` are measured
    during training (``heldout_*`` metrics)."""
    from .registry import objective_class
    from .training.trainer import train

    base = [f"model.pretrained={tb.testbed_path(budget.testbed)}", f"train.output_dir={out / 'adapter'}",
            f"cache.dir={out / 'cache'}", "log.to=none"]
    if is_online(objective):  # it samples its own rollouts and scores them with the reward
        # the evaluation (and any objective.guard) draws from the training prompts with its own fixed noise: the
        # held-out prompts stay for the test
        base += [f"data.prompts={prompts}", f"data.eval_prompts={prompts}", f"objective.reward=[{reward}]"]
    elif objective_class(objective).data == "unpaired":  # KTO: thumbs of the images the pairs came from
        base.append(f"data.dataset={Path(pairs).with_name('unpaired.jsonl')}")
    else:
        base.append(f"data.dataset={pairs}")
    if budget.train_steps is not None:
        base.append(f"train.max_steps={budget.train_steps}")
    if budget.seed:
        base.append(f"train.seed={budget.seed}")
    if eval_pairs:
        base.append(f"data.eval_pairs={eval_pairs}")
    return train(load_config(testbed_recipe(objective, budget.testbed), base + list(overrides)))


def evaluate_on_testbed(out: Path, adapter: Path, reward: str, budget: Budget, held_pairs: str | None,
                        folder: str = "eval") -> dict:
    """Base vs aligned on the held-out prompts x ``budget.eval_seeds``, into ``out / folder``: ``diffalign eval``'s
    report plus prompt following before and after (the guard)."""
    from .evaluation.evaluate import evaluate
    from .evaluation.scoring import to_tensor

    _, held_prompts = write_prompt_files(out / "prompts", budget)
    report = evaluate(str(tb.testbed_path(budget.testbed)), [adapter], held_prompts, {reward: load_reward(reward)},
                      out / folder, seeds=budget.eval_seeds, pairs=held_pairs,
                      sampling=budget.sampling(seed_policy="shared"))
    texts = [p for p in report["prompts"] for _ in range(report["seeds"])]
    following = {}
    for name, files in report["images"].items():
        images = to_tensor([Image.open(out / folder / f).convert("RGB") for f in files])
        following[name] = tb.prompt_following(images, texts)
    aligned = next(n for n in report["images"] if n != "base")
    win = report["win_rates"][aligned][reward]
    means = report["mean_scores"]
    return {"reward": reward, "win_rate": win,
            "mean_reward": {"base": means["base"][reward], "aligned": means[aligned][reward]},
            "prompt_following": {"base": following["base"], "aligned": following[aligned]},
            "pair_accuracy": report["pair_accuracy"].get(aligned, {}),
            "grid": str(out / folder / "plots" / f"samples_{aligned}.png"), "eval_report": str(out / folder / "report.html")}


def align_and_evaluate(out: Path, objective: str, reward: str, budget: Budget, pairs: tuple[str, str],
                       overrides: list[str] = ()) -> dict:
    """Train ``objective`` on the testbed (from the training ``pairs``, or online for D3PO) and evaluate it,
    with accuracies on the held-out pairs; timed."""
    start = time.time()
    prompts, _ = write_prompt_files(out / "prompts", budget)
    result = train_on_testbed(out, objective, pairs[0], budget, reward, prompts, overrides, eval_pairs=pairs[1])
    trained = time.time() - start
    summary = evaluate_on_testbed(out, result.output_dir, reward, budget, pairs[1])
    last = result.history[-1] if result.history else {}
    summary["heldout"] = {k: v for k, v in last.items() if k.startswith("heldout_")}
    summary["warnings"] = result.warnings
    summary.update(objective=objective, testbed=budget.testbed, steps=result.steps, train_seconds=trained, adapter=str(result.output_dir),
                   images_sampled=int(sum(h.get("samples", 0) for h in result.history)),
                   final_loss=last.get("loss"), seconds=time.time() - start)
    return summary


def format_report(summary: dict) -> str:
    """A short markdown report of a demo run (``summary["seconds"]`` is the whole run, pairs included)."""
    w, before, after = summary["win_rate"], summary["prompt_following"]["base"], summary["prompt_following"]["aligned"]
    low, high = prompt_bounds(w)
    acc = summary["pair_accuracy"]
    lines = [
        f"# diffalign demo: Diffusion-DPO on the {summary.get('testbed', 'sd15').upper()} testbed, reward "
        f"`{summary['reward']}`", "",
        f"- reward win rate of aligned vs base (held-out prompts x seeds): **{w['rate']:.3f}** "
        f"(95% CI over prompts {low:.3f}-{high:.3f}, n={w['n']})",
        f"- mean reward: base {summary['mean_reward']['base']:.4f} -> aligned {summary['mean_reward']['aligned']:.4f}",
        f"- prompt following (both colours right): base {before['colour']:.3f} -> aligned {after['colour']:.3f}; "
        f"shape {before['shape']:.3f} -> {after['shape']:.3f}",
    ]
    if acc:
        lines.append(f"- held-out pairs: implicit accuracy {acc['implicit_accuracy']:.3f}, ranking accuracy "
                     f"{acc['ranking_accuracy']:.3f} ({int(acc['pairs'])} pairs)")
    lines += [f"- {summary['steps']} training steps; time: pairs {summary['pair_seconds']:.0f} s, training "
              f"{summary['train_seconds']:.0f} s, all {summary['seconds']:.0f} s", "",
              "![base (top row) and aligned (bottom row), same held-out prompts and seeds](before_after.png)", ""]
    return "\n".join(lines)


def run_demo(out: Path, quick: bool = False, reward: str = "shape_size", steps: int | None = None,
             testbed: str = "sd15") -> dict[str, Path]:
    """Run the demo into ``out`` on the ``testbed`` model (``"sd15"`` or ``"sdxl"``); returns the paths it wrote."""
    budget = dataclasses.replace(QUICK if quick else FULL, testbed=testbed)
    if steps is not None:
        budget = dataclasses.replace(budget, train_steps=steps)
    start = time.time()
    pairs = make_testbed_pairs(out, reward, budget)
    pair_seconds = time.time() - start
    summary = align_and_evaluate(out, "dpo", reward, budget, pairs)
    summary.update(pair_seconds=pair_seconds, seconds=summary["seconds"] + pair_seconds)  # the whole run
    atomic_copy(summary["grid"], out / "before_after.png")  # eval's base-over-aligned grid, enlarged, labelled
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "report.md", format_report(summary))
    print("\n" + (out / "report.md").read_text())
    paths = {"pairs": Path(pairs[0]), "adapter": Path(summary["adapter"]), "grid": out / "before_after.png",
             "report": out / "report.md", "eval": Path(summary["eval_report"])}
    for name, path in paths.items():
        print(f"{name:>8}: {path}")
    print("          (grid: top row = base, bottom row = aligned; same held-out prompts and seeds)")
    return paths
