"""What an online round costs, measured in one run on the testbed model.

    python scripts/bench_online.py                  # sampling overhead table + round split, ~3 minutes on 2 cores

1. Sampling with stored trajectories (``sample_rollouts``: every x_t, the log-probabilities, the decode) against a
   stock diffusers pipeline call that draws the same images (the testbed's pipeline with the same DDIM
   scheduler, η 1, CFG 5, the same number of images per prompt, prompt encoding and decode included on both
   sides), interleaved, the median of ``--repeats`` pairs, for several steps per trajectory and group sizes.
   Target: ratio <= 1.1.
2. One round of each online objective (D3PO, DDPO, GRPO; reward backprop has no rounds: one update is reported)
   split into sampling, scoring and training seconds, from the metrics each round logs, at two trajectory
   lengths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffalign import testbed as tb  # noqa: E402
from diffalign.sampling.settings import Sampling  # noqa: E402

PROMPTS = ["a red circle on a gray background", "a blue square on a white background",
           "a green triangle on a black background", "a yellow circle on a purple background"]


def sampling_overhead(steps_list: list[int], groups: list[int], repeats: int) -> list[dict]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffalign.models import Backbone
    from diffalign.sampling.trajectories import sample_rollouts

    path = str(tb.testbed_path())
    backbone = Backbone.load(path)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    res, rows = tb.RESOLUTION, []
    for steps in steps_list:
        for k in groups:
            sampling = Sampling(steps=steps, guidance=5.0, eta=1.0)

            def ours(k: int = k, sampling: Sampling = sampling) -> None:
                cond, negative = backbone.encode_prompt(PROMPTS), backbone.encode_prompt([""])
                sample_rollouts(backbone, backbone.unet, PROMPTS, cond, negative, k, sampling, res,
                                torch.Generator().manual_seed(0), shared_noise=False)

            def stock(k: int = k, steps: int = steps) -> None:
                pipe(PROMPTS, num_images_per_prompt=k, num_inference_steps=steps, guidance_scale=5.0, eta=1.0,
                     height=res, width=res, generator=torch.Generator().manual_seed(0), output_type="pt")

            ours(), stock()  # warm-up
            times: dict[str, list[float]] = {"ours": [], "stock": []}
            for _ in range(repeats):
                for name, fn in (("ours", ours), ("stock", stock)):
                    start = time.perf_counter()
                    with torch.no_grad():
                        fn()
                    times[name].append(time.perf_counter() - start)
            a, b = statistics.median(times["ours"]), statistics.median(times["stock"])
            rows.append({"steps": steps, "per_prompt": k, "images": k * len(PROMPTS), "ours": a, "stock": b,
                         "ratio": a / b})
            print(f"steps {steps:3d}, {k} per prompt: ours {a:.3f} s, stock {b:.3f} s, ratio {a / b:.3f}", flush=True)
    return rows


def round_split(steps_list: list[int]) -> list[dict]:
    from diffalign.config import load_config
    from diffalign.resources import recipe_path
    from diffalign.training.trainer import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(tb.split_prompts()[0][:32]) + "\n")
        for steps in steps_list:
            for name in ("d3po", "ddpo", "grpo", "reward-backprop"):
                out = Path(tmp) / f"{name}-{steps}"
                max_steps = 1 if name == "reward-backprop" else 4
                cfg = load_config(recipe_path(f"testbed-{name}"), [
                    f"model.pretrained={tb.testbed_path()}", f"data.prompts={prompts}", "objective.reward=[shape_size]",
                    f"train.output_dir={out}", f"sampling.steps={steps}", f"train.max_steps={max_steps}",
                    "log.to=none"])
                trainer = Trainer(cfg)  # loading is not part of a round
                start = time.perf_counter()
                result = trainer.train()
                total = time.perf_counter() - start  # the loop: rounds, updates, and writing the adapter
                rounds = [h for h in result.history if "time_sampling" in h]
                sampling = sum(h["time_sampling"] for h in rounds)
                scoring = sum(h["time_scoring"] for h in rounds)
                n = max(len(rounds), 1)
                images = sum(h.get("samples", 0) for h in rounds) / n or cfg.train.batch_size
                row = {"objective": name, "steps": steps, "rounds": len(rounds), "images": images,
                       "sampling": sampling / n, "scoring": scoring / n, "training": (total - sampling - scoring) / n}
                rows.append(row)
                print(f"{name:16s} {steps:3d} steps: per round sampling {row['sampling']:.2f} s, scoring "
                      f"{row['scoring']:.3f} s, training {row['training']:.2f} s, {images:.0f} images",
                      flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10,20,40", help="steps per trajectory (comma-separated)")
    parser.add_argument("--groups", default="2,8", help="images per prompt (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing pairs per setting")
    parser.add_argument("--skip-rounds", action="store_true", help="only the sampling-overhead table")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = sampling_overhead([int(s) for s in args.steps.split(",")], [int(g) for g in args.groups.split(",")],
                             args.repeats)
    print("\n| steps | per prompt | images | sample_rollouts (s) | stock pipeline (s) | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['per_prompt']} | {r['images']} | {r['ours']:.3f} | {r['stock']:.3f} | "
              f"{r['ratio']:.3f} |")
    if args.skip_rounds:
        return
    split = round_split([10, 20])
    print("\n| objective | steps | images per round | sampling (s) | scoring (s) | training (s) |\n|---|---|---|---|---|---|")
    for r in split:
        print(f"| {r['objective']} | {r['steps']} | {r['images']:.0f} | {r['sampling']:.2f} | {r['scoring']:.3f} | "
              f"{r['training']:.2f} |")


if __name__ == "__main__":
    main()
