"""Does ``diffalign sweep`` recover a good setting on rewards nobody tuned for? For each report reward: the testbed's
pairs (``bench_alignment``'s, reused when that script made them in the same ``--out``), one sweep of a shipped
recipe over learning rate x beta (x steps) with the dense held-out pairs. Every trial is judged by its win rate on
the held-out prompts x 8 seeds (the test, which no pick sees). ``diffalign sweep --reward`` picks by the win rate on
*validation* prompts: all 128 training prompts x 8 fresh seeds, as a user would validate on prompts of their own
that are not the test's (earlier rounds: 64, every 2nd; 32, every 4th; before them 16, every 8th, whose folders hold
trials judged on those 16: give a new ``--out``).

    python scripts/bench_sweep.py --out runs/generalise                        # DPO, the report rewards, seed 0
    python scripts/bench_sweep.py --objective mapo --lr 1e-4,3e-4,1e-3 --beta 1000,5000 --rewards centredness
    python scripts/bench_sweep.py --out runs/generalise_sdxl --testbed sdxl --rewards shape_size   # its own --out

Prints each sweep's table (its win rate column: validation), then per reward the grid's best test win rate and the
test win rate of what each pick would have chosen: the reward pick (validation win rate) and each reward-free pick
(``diffalign.sweep.PICKS``), bold where within 0.05 of the best (the issue's target), and how many rewards each pick
got within 0.05 and not measurably worse than the best trial (the 95% interval over prompts of the paired
difference in test win rate, on the same comparisons, holds 0), with that interval taken over prompts (other prompts
like these) and over seeds (these 16 prompts, all the held-out combinations the testbed has).
``--test-seeds 32`` judges every trial on 32 seeds of the held-out prompts instead of 8 (the first 8 reused): the
grid's win rates on these prompts known well enough to tell 0.05 apart; the picks do not change.
The reward pick reads 128 validation prompts (every training prompt; ``--validation-prompts 64`` or ``32`` for the
earlier every 2nd or 4th): each trial is validated on the 32 first, as its record holds, then on the N (the largest
earlier validation's images reused); the report's file name says which.
``--hold-out`` (``sweep --hold-out-prompts``): the trials never train on the validation prompts' pairs. The reward
pick validates on 32 training prompts (every 4th) x ``--validation-seeds`` seeds, held out of every trial's training;
the chosen setting (and each ``--also LR:BETA``) is then trained on every pair, as ``best.yaml`` would, and judged on
the test at 8 and ``--test-seeds`` seeds (the 8 reproduce the full grid's earlier 8-seed win rates where the
pipeline matches). Its own folders (``sweep-<objective>-holdout``, ``full-<objective>-<lr>-<beta>``); the grid's
best comes from the full grid's run (this script without ``--hold-out``), not from here.
Resumable (``diffalign sweep`` reads finished trials back). A folder made before the reward pick moved to the
validation prompts holds test-prompt win rates in its trials: give a new ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign import testbed as tb  # noqa: E402
from diffalign.demo import FULL, make_testbed_pairs, testbed_recipe, write_prompt_files  # noqa: E402
from diffalign.evaluation.evaluate import reuse_images  # noqa: E402
from diffalign.evaluation.metrics import paired_difference  # noqa: E402
from diffalign.evaluation.report import comparisons  # noqa: E402
from diffalign.files import atomic_write_text  # noqa: E402
from diffalign.rewards import load_reward  # noqa: E402
from diffalign.sweep import (  # noqa: E402
    DEFAULT_PICK,
    MIN_VALIDATION_PROMPTS,
    PICKS,
    Trial,
    choose,
    run_sweep,
    spearman,
    sweep_table,
    win_rate_vs_base,
)

TARGET_GAP = 0.05
# The reward pick's validation prompts (every training prompt). Each trial is first validated on the 32 of
# `diffalign sweep`'s floor (every 4th, its trial record), then on these: 128 brought the pick within 0.05 of the
# grid's best 32-seed test win rate on 8 of 9 (reward, seed) cases, 64 on 7 and 32 on 6 (docs/benchmarks.md,
# "128 validation prompts").
PICK_VALIDATION_PROMPTS = 128


def outcomes_in(folder: Path, reward: str) -> tuple[list[float], list[int]]:
    """The outcome of each test comparison of the adapter evaluated into ``folder`` against the base, and its
    prompt."""
    return comparisons(json.loads((folder / "report.json").read_text()), reward, load_reward(reward).higher_is_better)


def validation_prompts(n: int) -> list[str]:
    """``n`` training prompts spread over the list (every 128/n-th): the default 32 are every 4th, so the 32 are
    among the 64."""
    train = tb.split_prompts()[0]
    return train[:: max(1, len(train) // n)][:n]


def earlier_validation(folder: Path, trials: list[Trial], n: int) -> tuple[list[str], str]:
    """The largest validation every one of these trials already has whose prompts are all among the ``n``: its
    prompts and the trial subfolder its evaluation is in (the 32 of the trial record, or an earlier ``val<m>``)."""
    found = (validation_prompts(MIN_VALIDATION_PROMPTS), "eval")
    for m in range(MIN_VALIDATION_PROMPTS + 1, n):
        if set(validation_prompts(m)) <= set(validation_prompts(n)) \
                and all((folder / t.name / f"val{m}" / "report.json").is_file() for t in trials):
            found = (validation_prompts(m), f"val{m}")
    return found


def revalidate(folder: Path, trials: list[Trial], base: str, reward: str, n: int, budget) -> list[Trial]:
    """The trials with their win rates on ``n`` validation prompts, what the reward pick then reads: every trial
    evaluated on them into ``val<n>``, the images (its own and the base's) of the prompts it shares with the largest
    earlier validation copied over under their new prompt index (same seeds)."""
    prompts = validation_prompts(n)
    earlier, earlier_name = earlier_validation(folder, trials, n)
    file = folder / f"validation{n}_prompts.txt"
    atomic_write_text(file, "\n".join(prompts) + "\n")
    moved = {old: prompts.index(p) for old, p in enumerate(earlier) if p in prompts}
    for t in trials:
        reuse_images(folder / t.name / earlier_name, folder / t.name / f"val{n}", moved)
    return [dataclasses.replace(t, win_rate=win_rate_vs_base(base, folder / t.name / "run", reward, str(file),
                                                             budget.eval_seeds,
                                                             budget.sampling(20_000, seed_policy="shared"),
                                                             folder / f"val{n}_base_images", folder / t.name / f"val{n}"))
            for t in trials]


def hold_out_row(args, budget, reward: str, shared: Path, held_pairs: str, held_prompts: Path, axes: dict,
                 overrides: list[str], base: str) -> str:
    """The ``--hold-out`` reading for one reward: the grid trained without the validation prompts' pairs and picked
    by its win rate on them, then the pick (and ``--also``) trained on every pair and judged on the test."""
    recipe = str(testbed_recipe(args.objective, args.testbed))
    validation = shared / "shared" / "prompts" / "holdout_validation_prompts.txt"
    atomic_write_text(validation, "\n".join(validation_prompts(MIN_VALIDATION_PROMPTS)) + "\n")
    trials, best = run_sweep(recipe, axes, held_pairs, shared / f"sweep-{args.objective}-holdout", overrides,
                             reward=reward, prompts=str(validation), seeds=args.validation_seeds,
                             sampling=budget.sampling(20_000, seed_policy="shared"), hold_out_prompts=True)
    print(f"\n## {args.objective} on {reward}, seed {args.seed}, validation prompts held out of training\n\n"
          f"{sweep_table(trials, best)}", flush=True)
    points = [best.values] + [dict(zip(axes, (float(v) for v in also.split(":")))) for also in args.also]
    cells = []
    for values in points:
        name = "-".join(f"{v:g}" for v in values.values())
        folder = shared / f"full-{args.objective}-{name}"
        [point], _ = run_sweep(recipe, {k: [v] for k, v in values.items()}, held_pairs, folder, overrides)
        adapter = folder / point.name / "run"
        rates = []
        for seeds, test in ((FULL.eval_seeds, "test"), (args.test_seeds, f"test{args.test_seeds}")):
            if seeds != FULL.eval_seeds:
                reuse_images(folder / "test", folder / test)
            rates.append(win_rate_vs_base(base, adapter, reward, str(held_prompts), seeds,
                                          budget.sampling(seed_policy="shared"), shared / f"full-{test}_base_images",
                                          folder / test))
        cells.append(f"{name}: {rates[0]:.3f} / {rates[1]:.3f}")
    return f"| {reward} | {best.values} | {best.win_rate:.3f} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/generalise", help="output folder (bench_alignment's, to reuse its pairs)")
    parser.add_argument("--objective", default="dpo", help="the shipped testbed recipe to sweep (a paired objective)")
    parser.add_argument("--rewards", default="report",
                        help="comma-separated testbed rewards, or 'tuning' / 'report' for the benchmark's sets")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole pipeline (pairs, training, evaluation)")
    parser.add_argument("--testbed", choices=("sd15", "sdxl"), default="sd15", help="the testbed model's architecture")
    parser.add_argument("--refine", type=float, default=FULL.refine, metavar="STRENGTH",
                        help="training pairs also best vs worst of img2img variants of each prompt's best image "
                             "(make-pairs --refine); 0: the images alone, as in docs/benchmarks.md's older sweep "
                             "tables")
    parser.add_argument("--lr", default="3e-4,1e-3,3e-3", help="learning rates")
    parser.add_argument("--beta", default="20000,80000,320000",
                        help="betas (around testbed-dpo's 80000 on ε errors; the earlier v-error recipe's grid, "
                             "in the older sweep tables of docs/benchmarks.md, was 1000,5000,20000)")
    parser.add_argument("--max-steps", default="", help="training steps (default: the recipe's)")
    parser.add_argument("--validation-prompts", type=int, default=PICK_VALIDATION_PROMPTS,
                        help="training prompts the reward pick validates on (every 128/N-th); more than 32: each trial "
                             "is validated again on them, the largest earlier validation's images reused, and the pick "
                             "reads those")
    parser.add_argument("--test-seeds", type=int, default=FULL.eval_seeds,
                        help="seeds per held-out test prompt (more: the grid's win rates on these prompts known "
                             "better; the first 8 are the default test's, whose images are reused)")
    parser.add_argument("--hold-out", action="store_true",
                        help="the reward pick validates on 32 training prompts held out of every trial's training "
                             "(sweep --hold-out-prompts); the pick is then trained on every pair and tested")
    parser.add_argument("--validation-seeds", type=int, default=32,
                        help="--hold-out: seeds per validation prompt (32 x 32: the images of 128 prompts x 8)")
    parser.add_argument("--also", action="append", default=[], metavar="LR:BETA",
                        help="--hold-out: also train this grid point on every pair and test it (repeatable)")
    args = parser.parse_args()
    budget = dataclasses.replace(FULL, seed=args.seed, testbed=args.testbed, refine=args.refine)
    axes = {"optim.lr": [float(v) for v in args.lr.split(",")], "objective.beta": [float(v) for v in args.beta.split(",")]}
    if args.max_steps:
        axes["train.max_steps"] = [int(v) for v in args.max_steps.split(",")]
    picks = ("reward", *PICKS)  # "reward": `sweep --reward` on the validation prompts
    lines = ["| reward | trials | best test win rate | " + " | ".join(f"{p} pick" for p in picks)
             + " | reward pick - best [95% over prompts] [95% over seeds] | validation-test Spearman |",
             "|---|---|---|" + "---|" * (len(picks) + 2)]
    within = dict.fromkeys(picks, 0)
    tied = {over: dict.fromkeys(picks, 0) for over in ("prompts", "seeds")}
    test_name = "test" if args.test_seeds == FULL.eval_seeds else f"test{args.test_seeds}"
    base = str(tb.testbed_path(budget.testbed))
    for reward in tb.rewards_of(args.rewards):
        shared = Path(args.out) / f"{reward}-seed{args.seed}"
        train_pairs, held_pairs = make_testbed_pairs(shared / "shared", reward, budget)
        _, held_prompts = write_prompt_files(shared / "shared" / "prompts", budget)
        validation = shared / "shared" / "prompts" / "validation_prompts.txt"
        # every 4th training prompt: a win rate's noise is mostly which prompts, so more prompts than the test's 16
        atomic_write_text(validation, "\n".join(validation_prompts(MIN_VALIDATION_PROMPTS)) + "\n")
        overrides = [f"model.pretrained={base}", f"data.dataset={train_pairs}",
                     f"cache.dir={shared / 'sweep-cache'}", "log.to=none", f"train.seed={args.seed}",
                     "train.heldout_every=0"]  # the pick reads only the final held-out measurement
        if args.hold_out:
            lines.append(hold_out_row(args, budget, reward, shared, held_pairs, held_prompts, axes, overrides, base))
            continue
        folder = shared / f"sweep-{args.objective}"
        trials, best = run_sweep(str(testbed_recipe(args.objective, args.testbed)), axes, held_pairs, folder, overrides,
                                 reward=reward, prompts=str(validation), seeds=budget.eval_seeds,
                                 sampling=budget.sampling(20_000, seed_policy="shared"))
        print(f"\n## {args.objective} on {reward}, seed {args.seed}, {args.testbed} testbed (win rate: validation)\n\n"
              f"{sweep_table(trials, best)}", flush=True)
        if test_name != "test":  # the default test's images are this test's first seeds: drawn once
            for t in trials:
                reuse_images(folder / t.name / "test", folder / t.name / test_name)
        test = {t.name: win_rate_vs_base(base, folder / t.name / "run", reward, str(held_prompts), args.test_seeds,
                                         budget.sampling(seed_policy="shared"), folder / f"{test_name}_base_images",
                                         folder / t.name / test_name)
                for t in trials}
        if args.validation_prompts != MIN_VALIDATION_PROMPTS:
            trials = revalidate(folder, trials, base, reward, args.validation_prompts, budget)
            best = choose(trials, by_reward=True)
        top_trial = max(trials, key=lambda t: test[t.name])
        top = test[top_trial.name]
        picked = {"reward": best.name, **{pick: choose(trials, by_reward=False, pick=pick).name for pick in PICKS}}
        won = {pick: test[name] for pick, name in picked.items()}
        close = {pick for pick in picks if top - won[pick] <= TARGET_GAP}
        within.update({pick: within[pick] + 1 for pick in close})
        # the grid's best is the largest of several noisy estimates on the same test comparisons: a pick whose
        # paired difference from it holds 0 in its 95% interval over prompts is not measurably worse
        # (over prompts: for other prompts like these; over seeds: for these 16, all the testbed holds out)
        best_points, groups = outcomes_in(folder / top_trial.name / test_name, reward)
        gaps = {over: {pick: paired_difference(outcomes_in(folder / name / test_name, reward)[0], best_points, groups,
                                               over=over) for pick, name in picked.items()} for over in tied}
        for over, counts in tied.items():
            counts.update({pick: counts[pick] + 1 for pick, (_, _, high) in gaps[over].items() if high >= 0})
        gap, low, high = gaps["prompts"]["reward"]
        _, seed_low, seed_high = gaps["seeds"]["reward"]
        rho = spearman([t.win_rate for t in trials], [test[t.name] for t in trials])
        lines.append(f"| {reward} | {len(trials)} | {top:.3f} ({top_trial.values}) | "
                     + " | ".join(f"**{won[p]:.3f}**" if p in close else f"{won[p]:.3f}" for p in picks)
                     + f" | {gap:+.3f} [{low:+.2f}, {high:+.2f}] [{seed_low:+.2f}, {seed_high:+.2f}] | {rho:+.2f} |")
    if args.hold_out:
        text = ("| reward | hold-out pick | its validation win rate | " + " | ".join(
            ["pick trained on every pair: test win rate, 8 / N seeds"] + [f"{a}: 8 / N seeds" for a in args.also])
            + " |\n|" + "---|" * (4 + len(args.also)) + "\n" + "\n".join(lines[2:]) + "\n")
        name = f"sweep-{args.objective}-seed{args.seed}-{args.rewards.replace(',', '+')}-holdout-test{args.test_seeds}.md"
        (Path(args.out) / name).write_text(text)
        print("\n" + text)
        return
    n = len(lines) - 2
    text = "\n".join(lines) + f"\n\nTest win rate ({args.test_seeds} seeds per held-out prompt) of each pick's " \
        f"trial. Bold: within {TARGET_GAP} of the grid's best. Within {TARGET_GAP}, of {n}: " + ", ".join(
            f"{p} {within[p]}" + (" (the default without a reward)" if p == DEFAULT_PICK else "") for p in picks) + \
        "".join(f". Not measurably worse than the best (its paired difference's 95% interval over {over} holds 0): "
                + ", ".join(f"{p} {tied[over][p]}" for p in picks) for over in tied) + "\n"
    suffix = (f"-val{args.validation_prompts}" if args.validation_prompts != MIN_VALIDATION_PROMPTS else "") + \
        (f"-{test_name}" if test_name != "test" else "")
    (Path(args.out) / f"sweep-{args.objective}-seed{args.seed}-{args.rewards.replace(',', '+')}{suffix}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
