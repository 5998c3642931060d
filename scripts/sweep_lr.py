"""Learning-rate sweep of one objective on the tiny offline models: how fast and how stably the loss falls.

    python scripts/sweep_lr.py diffalign/resources/recipes/tiny-sd15-inpo.yaml --lrs 1e-4,3e-4,1e-3,3e-3 --steps 30

For each learning rate it trains from the same start on the same synthetic pairs (whose preferred image has a
larger, centred square) and prints the mean loss and implicit accuracy over the first and last fifth of the run.
The tiny models have random weights: this tunes the tiny recipes' optimisation, not real-model alignment.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()

    from diffalign.config import load_config
    from diffalign.testing import save_tiny_pipeline, write_pickapic_parquet
    from diffalign.training.trainer import train

    kind = "sd15" if "sd15" in Path(args.recipe).name else "sdxl"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = save_tiny_pipeline(work / "model", kind)
        data = write_pickapic_parquet(work / "pairs.parquet", n=args.pairs, size=48, scores=True)
        rows = []
        for lr in args.lrs.split(","):
            cfg = load_config(args.recipe, [f"model.pretrained={model}", f"data.dataset={data}", f"optim.lr={lr}",
                                            f"train.max_steps={args.steps}", f"train.output_dir={work / lr}",
                                            f"cache.dir={work / 'cache'}", "log.to=none", "train.checkpoint_every=0",
                                            "train.validation_prompts=[]", *args.set])
            h = train(cfg).history
            fifth = max(1, len(h) // 5)

            def mean(key, part):
                return sum(m[key] for m in part) / len(part)

            rows.append((lr, mean("loss", h[:fifth]), mean("loss", h[-fifth:]), mean("implicit_acc", h[-fifth:])))
    print(f"\n{args.recipe}: {args.steps} steps, {args.pairs} pairs\n")
    print("| lr | loss, first fifth | loss, last fifth | implicit acc, last fifth |\n|---|---|---|---|")
    for lr, first, last, acc in rows:
        print(f"| {lr} | {first:.4f} | {last:.4f} | {acc:.2f} |")


if __name__ == "__main__":
    main()
