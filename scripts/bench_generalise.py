"""Do the shipped testbed recipes carry over to rewards nobody tuned them on? Every objective x reward x seed of the
whole pipeline (the pairs' images, training, the evaluation's seeds), measured in one run.

    python scripts/bench_generalise.py --out runs/generalise                                   # report rewards
    python scripts/bench_generalise.py --rewards left_position --seeds 0 --objectives dpo,kto

The recipes were tuned on ``shape_size`` (and looked at on ``vividness``): those are the *tuning* rewards. The
*report* rewards, never used to choose a setting, are ``left_position`` (geometry: where the shape sits),
``centredness`` (geometry, not monotone) and ``edge_sharpness`` (texture). Each run is ``bench_alignment``'s: from
the same base, pairs best-vs-worst of 8 (thumbs of the same images for KTO), the shipped ``testbed-*`` recipe,
the held-out prompts x 8 seeds; every run also measures the held-out pairs during training (``data.eval_pairs``).

Prints per objective and reward the mean win rate over seeds with its spread (min-max), the mean guard change and
minutes, and the Spearman rank correlation, over every run, between the final held-out implicit accuracy (the
signal ``diffalign sweep`` picks by, no reward needed) and the win rate. Resumable: finished runs are read back
from ``results.json``. Targets (issue: generalisation): mean win rate >= 0.70, guard drop <= 5 points, each run
<= 15 CPU-minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.demo import FULL, align_and_evaluate, is_online, make_testbed_pairs, objective_overrides  # noqa: E402
from diffalign.sweep import spearman  # noqa: E402

REPORT_REWARDS = ("left_position", "centredness", "edge_sharpness")
OFFLINE = ("dpo", "mapo", "inpo", "smpo", "kto")
ONLINE = ("d3po", "ddpo", "grpo", "reward_backprop")
TARGET_WIN, TARGET_DROP, TARGET_MINUTES = 0.70, 0.05, 15.0


def summarise(results: list[dict]) -> str:
    lines = ["| objective | reward | seeds | mean win rate (min-max) | guard change, points | minutes | target met |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["objective"], r["reward"]) for r in results}, key=lambda k: (OFFLINE + ONLINE + (k[0],)).index(k[0]))
    for name, reward in keys:
        runs = [r for r in results if r["objective"] == name and r["reward"] == reward]
        wins = [r["win_rate"]["rate"] for r in runs]
        drops = [100 * (r["prompt_following"]["aligned"]["colour"] - r["prompt_following"]["base"]["colour"]) for r in runs]
        minutes = [r["seconds"] / 60 for r in runs]
        met = statistics.fmean(wins) >= TARGET_WIN and statistics.fmean(drops) >= -100 * TARGET_DROP \
            and max(minutes) <= TARGET_MINUTES
        lines.append(f"| {name} | {reward} | {len(runs)} | {statistics.fmean(wins):.3f} ({min(wins):.2f}-{max(wins):.2f}) "
                     f"| {statistics.fmean(drops):+.1f} | {statistics.fmean(minutes):.1f} | {'yes' if met else 'no'} |")
    # How well each held-out-pair signal (no reward needed; what `diffalign sweep` picks by) ranks the win rates.
    lines.append("")
    for key, label in (("heldout_implicit_acc", "implicit accuracy"), ("heldout_margin", "margin"),
                       ("heldout_loss", "loss (negated: lower is better)")):
        sign = -1 if key == "heldout_loss" else 1
        paired = [(sign * r["heldout"][key], r["win_rate"]["rate"]) for r in results
                  if r.get("heldout", {}).get(key) is not None]
        if len(paired) >= 3:
            rho = spearman([a for a, _ in paired], [w for _, w in paired])
            lines.append(f"Spearman rank correlation of the final held-out {label} with the win rate over "
                         f"{len(paired)} runs: {rho:+.2f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/generalise", help="output folder")
    parser.add_argument("--objectives", default=",".join(OFFLINE + ONLINE), help="comma-separated objectives")
    parser.add_argument("--rewards", default=",".join(REPORT_REWARDS), help="comma-separated testbed rewards")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the whole pipeline")
    parser.add_argument("--testbed", choices=("sd15", "sdxl"), default="sd15", help="the testbed model's architecture")
    parser.add_argument("--set", action="append", default=[], metavar="OBJECTIVE:KEY=VALUE",
                        help="config override for one objective, e.g. dpo:optim.lr=1e-4 (repeatable)")
    args = parser.parse_args()
    overrides = objective_overrides(args.set)
    out = Path(args.out)
    record = out / "results.json"
    results = json.loads(record.read_text()) if record.is_file() else []
    done = {(r["objective"], r["reward"], r["seed"]) for r in results}
    for seed in map(int, args.seeds.split(",")):
        for reward in args.rewards.split(","):
            budget = dataclasses.replace(FULL, seed=seed, testbed=args.testbed)
            shared = out / f"{reward}-seed{seed}"
            start = time.time()
            pairs = make_testbed_pairs(shared / "shared", reward, budget)
            pair_seconds = time.time() - start
            for name in args.objectives.split(","):
                if (name, reward, seed) in done:
                    continue
                run = shared / name
                for stale in ("adapter", "eval"):
                    shutil.rmtree(run / stale, ignore_errors=True)
                base_images = shared / "shared" / "base_images"
                if base_images.is_dir():
                    shutil.copytree(base_images, run / "eval" / "images" / "base", dirs_exist_ok=True)
                r = align_and_evaluate(run, name, reward, budget, pairs, overrides.get(name, []))
                if not is_online(name):  # making the pairs is part of an offline run, as in bench_alignment
                    r["seconds"] += pair_seconds
                if not base_images.is_dir():
                    shutil.copytree(run / "eval" / "images" / "base", base_images)
                r["seed"] = seed
                results.append(r)
                record.write_text(json.dumps(results, indent=1) + "\n")
                print(f"{name} {reward} seed {seed}: win {r['win_rate']['rate']:.3f}, held-out implicit "
                      f"{r['heldout'].get('heldout_implicit_acc')}, {r['seconds'] / 60:.1f} min", flush=True)
    text = summarise(results)
    (out / "results.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
