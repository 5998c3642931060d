"""Steady-state cost of a training step, measured in one run.

The cache (issue: foundation), on Diffusion-DPO:
  (a) cached   - the trainer's real step, training from the latent + text-embedding cache
  (b) uncached - the same step, decoding images and running the VAE and text encoders every step
  (c) bare     - only the UNet work of a DPO step: policy forward + backward on 2B latents, reference forward
The objectives, each from the cache, as a ratio to (a): MaPO, InPO (policy inversion, the official code),
InPO (cached reference inversion), SmPO (policy ReNoise inversion). ``--paths cached,cached-gc`` shows what
gradient checkpointing does to time and peak memory.

Seconds per step = (time of N2 steps - time of N1 steps) / (N2 - N1), so start-up does not count. All paths are
timed in one process, interleaved round-robin, and each ratio is the median of per-round ratios, because a shared
2-core machine drifts by 30% over minutes; peak memory (GPU: max allocated; CPU: peak RSS after a reset) comes
from a fresh process per path that loads only what that path needs, with the step's own (transient) memory
beside it: the peak minus what was resident just before the timed steps, which the ~1 GB floor of a CPU
process would otherwise hide.

    python scripts/bench_train.py tiny-sdxl-dpo            # tiny model, built offline
    python scripts/bench_train.py RECIPE --set model.pretrained=... --set data.dataset=...

D3PO recipes (objective.name: d3po) print instead the time of one online round split into sampling, scoring and
training, for several trajectory lengths (``--d3po-steps``), after one warm-up round:

    python scripts/bench_train.py tiny-sd15-d3po --d3po-steps 4,8,16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _reset_peak_memory() -> None:
    """Start peak-memory accounting now, so model loading and cache building do not count."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set size (VmHWM)


def _proc_status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_memory_mb() -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else _proc_status_mb("VmRSS")


def _peak_memory_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _proc_status_mb("VmHWM")


def _block_time(step, n: int) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - start


# config overrides per path; "bare" runs on the "uncached" trainer
VARIANTS = {
    "cached": [],
    "uncached": ["cache.enabled=false"],
    "mapo": ["objective.name=mapo"],
    "inpo-policy": ["objective.name=inpo"],
    "inpo-cached": ["objective.name=inpo", "objective.inversion_model=reference", "objective.inversion_cache=true",
                    "data.caption_dropout=0"],
    "smpo": ["objective.name=smpo", "objective.beta=500"],
    "cached-gc": ["train.gradient_checkpointing=true"],  # not in the default --paths: `--paths cached,cached-gc`
}


def _trainer(recipe: str, overrides: list[str], variant: str):
    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    cfg = load_config(recipe, overrides + ["log.to=none", "train.validation_prompts=[]", "train.checkpoint_every=0",
                                           "objective.name=dpo"] + VARIANTS[variant])
    return Trainer(cfg)


def _cycling_step(trainer):
    """The trainer's real step over its own epochs."""
    state = {"it": iter(()), "micro": 0, "epoch": 0}

    def step():
        batch = next(state["it"], None)
        if batch is None:
            state["it"], state["epoch"] = iter(trainer.feed.epoch_loader(state["epoch"])), state["epoch"] + 1
            batch = next(state["it"])
        trainer.training_step(batch, state["micro"])
        state["micro"] += 1
    return step


def _bare_step(trainer):
    """Only the UNet work of a DPO step on the trainer's shapes."""
    import torch

    from diffalign.lora import reference_mode
    from diffalign.models import Conditioning

    n, dev, backbone, unet = trainer.cfg.train.batch_size, trainer.device, trainer.backbone, trainer.unet
    item = next(iter(trainer.feed.epoch_loader(0)))
    item = {k: v[0] for k, v in trainer.feed.encoded(item).items()}
    x = torch.randn(2 * n, *item["latents_w"].shape, device=dev)
    t = torch.randint(0, 1000, (2 * n,), device=dev)
    cond = Conditioning(item["prompt_embeds"][None], item["pooled"][None] if "pooled" in item else None,
                        backbone.time_ids(item["geometry"][None], trainer.feed.resolution)).repeat(2 * n).to(dev)

    def step():
        with trainer.accelerator.autocast():
            pred = backbone.predict(x, t, cond, unet=unet)
        trainer.accelerator.backward(pred.float().pow(2).mean())
        with reference_mode(trainer.accelerator.unwrap_model(unet)), trainer.accelerator.autocast():
            backbone.predict(x, t, cond, unet=unet)
        for p in trainer.lora_params:
            p.grad = None
    return step


def worker(mode: str, recipe: str, overrides: list[str], n1: int, n2: int, repeats: int, paths: list[str]) -> dict:
    """``prepare``: build the caches. ``timing``: all paths in this process, interleaved, so machine drift hits
    them alike. ``memory-<path>``: a few steps of one path in a fresh process, for its own peak memory."""
    import statistics

    if mode == "prepare":
        for variant in ("cached", "inpo-cached"):
            _trainer(recipe, overrides, variant)
        return {"mode": mode}
    if mode.startswith("memory-"):
        path = mode.removeprefix("memory-")
        trainer = _trainer(recipe, overrides, "cached" if path == "bare" else path)
        step = _bare_step(trainer) if path == "bare" else _cycling_step(trainer)
        step()  # optimizer state and caches exist from here on
        _reset_peak_memory()
        before = _current_memory_mb()
        _block_time(step, 3)
        peak = _peak_memory_mb()
        return {"mode": mode, "peak_mb": peak, "step_mb": peak - before}
    trainers = {v: _trainer(recipe, overrides, v) for v in paths if v != "bare"}
    steps = {v: _cycling_step(t) for v, t in trainers.items()}
    if "bare" in paths:
        steps["bare"] = _bare_step(trainers.get("uncached") or _trainer(recipe, overrides, "uncached"))
    for step in steps.values():  # warm-up
        _block_time(step, 2)
    samples: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate, so no path always runs first
            samples[name].append((_block_time(steps[name], n2) - _block_time(steps[name], n1)) / (n2 - n1))
    # The paths of one round share the machine's drift: the median of per-round ratios cancels most of it.
    ratios = {name: statistics.median(x / y for x, y in zip(samples[name], samples["cached"])) for name in names}
    device = str(next(iter(trainers.values())).device)
    return {"mode": mode, "sec_per_step": {k: statistics.median(v) for k, v in samples.items()},
            "ratio_to_cached": ratios, "samples": samples, "device": device}


def _tiny_setup(recipe: str, work: Path, pairs: int, resolution: int) -> list[str]:
    from diffalign.config import load_config
    from diffalign.testing import save_tiny_pipeline, write_pickapic_parquet

    cfg = load_config(recipe)
    if cfg.model.pretrained and cfg.data.dataset:
        return []
    kind = "sd15" if "sd15" in Path(recipe).name else "sdxl"
    model = save_tiny_pipeline(work / f"tiny-{kind}", kind)
    data = write_pickapic_parquet(work / "pairs.parquet", n=pairs, size=int(resolution * 1.5), scores=True)
    return [f"model.pretrained={model}", f"data.dataset={data}"]


def d3po_rounds(recipe: str, overrides: list[str], steps: list[int], rounds: int) -> list[dict]:
    """Seconds per round (sampling, scoring, training) for each trajectory length, medians over ``rounds``."""
    import statistics

    from diffalign.config import load_config
    from diffalign.training.trainer import Trainer

    rows = []
    for n in steps:
        cfg = load_config(recipe, overrides + ["log.to=none", "train.validation_prompts=[]", "train.checkpoint_every=0",
                                               f"sampling.steps={n}", "objective.eval_every=0"])
        trainer = Trainer(cfg)
        unet, samples = trainer.accelerator.unwrap_model(trainer.unet), []
        for index in range(rounds + 1):  # round 0 warms up
            rnd = trainer.feed.source.new_round(index, unet, trainer.accelerator.autocast)
            start = time.perf_counter()
            for i, batch in enumerate(trainer.feed.source.batches(rnd, cfg.train.batch_size)):
                trainer.training_step(batch, index * 10_000 + i)
            train_s = time.perf_counter() - start
            if index:
                samples.append({"sampling": rnd.metrics["time_sampling"], "scoring": rnd.metrics["time_scoring"],
                                "training": train_s, "pairs": len(rnd.pairs)})
        med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        rows.append({"steps": n, **med, "train_per_pair_step": med["training"] / max(med["pairs"] * n, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--pairs", type=int, default=64, help="pairs in the generated dataset (tiny recipes)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--n1", type=int, default=2)
    parser.add_argument("--n2", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians over them")
    parser.add_argument("--paths", default="cached,uncached,bare,mapo,inpo-policy,inpo-cached,smpo",
                        help="comma-separated paths to measure")
    parser.add_argument("--d3po-steps", default="4,8,16", help="D3PO recipes: trajectory lengths to time")
    parser.add_argument("--d3po-rounds", type=int, default=3, help="D3PO recipes: timed rounds per length")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from diffalign.config import load_config

    if load_config(args.recipe).objective.name == "d3po":
        with tempfile.TemporaryDirectory() as tmp:
            from diffalign.testing import save_tiny_pipeline

            cfg, work = load_config(args.recipe, args.set), Path(tmp)
            model = cfg.model.pretrained or str(save_tiny_pipeline(work / "tiny", "sdxl" if "sdxl" in args.recipe else "sd15"))
            rows = d3po_rounds(args.recipe, [f"model.pretrained={model}", f"train.output_dir={work / 'out'}", *args.set],
                               [int(n) for n in args.d3po_steps.split(",")], args.d3po_rounds)
        print(f"\n{args.recipe}: seconds per online round, median of {args.d3po_rounds} rounds after a warm-up\n")
        print("| steps per trajectory | sampling | scoring | training | pairs | training per (pair, step) |\n"
              "|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['steps']} | {r['sampling']:.3f} | {r['scoring']:.4f} | {r['training']:.3f} | {r['pairs']:.0f} | "
                  f"{r['train_per_pair_step']:.4f} |")
        return
    paths = args.paths.split(",")
    if args.worker:
        print(json.dumps(worker(args.worker, args.recipe, args.set, args.n1, args.n2, args.repeats, paths)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        overrides = _tiny_setup(args.recipe, work, args.pairs, args.resolution) + [
            f"data.resolution={args.resolution}", f"train.batch_size={args.batch}", "train.grad_accum=1",
            f"cache.dir={work / 'cache'}", f"train.output_dir={work / 'out'}"] + args.set
        results = {}
        for mode in ["prepare", "timing"] + [f"memory-{p}" for p in paths]:
            cmd = [sys.executable, __file__, args.recipe, "--worker", mode, "--n1", str(args.n1), "--n2", str(args.n2),
                   "--repeats", str(args.repeats), "--paths", args.paths]
            cmd += [a for kv in overrides for a in ("--set", kv)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr: a worker's traceback shows
            results[mode] = json.loads(out.strip().splitlines()[-1])
    timing = results["timing"]
    sec, ratio = timing["sec_per_step"], timing["ratio_to_cached"]
    mem = {p: results[f"memory-{p}"]["peak_mb"] for p in paths}
    step_mem = {p: results[f"memory-{p}"]["step_mb"] for p in paths}
    print(f"\n{args.recipe}: {args.resolution} px, {args.batch} pairs/step, device {timing['device']}; s/step = median "
          f"over {args.repeats} interleaved rounds of (T({args.n2}) - T({args.n1})) / {args.n2 - args.n1}\n")
    print("| path | s/step | time vs (a) cached DPO | peak memory (MB) | memory vs (a) | step's own memory (MB) |\n"
          "|---|---|---|---|---|---|")
    for p in paths:
        print(f"| {p} | {sec[p]:.4f} | {ratio[p]:.3f} | {mem[p]:.0f} | {mem[p] / mem['cached']:.3f} | "
              f"{step_mem[p]:.0f} |")
    targets = {"uncached": ("(a)/(b) time <= 0.85", 1 / ratio.get("uncached", float("nan"))),
               "bare": ("(a)/(c) time <= 1.10", 1 / ratio.get("bare", float("nan"))),
               "mapo": ("MaPO/DPO time <= 0.80", ratio.get("mapo", float("nan"))),
               "inpo-cached": ("cached InPO/DPO time <= 1.30", ratio.get("inpo-cached", float("nan")))}
    print()
    for p, (label, value) in targets.items():
        if p in paths:
            print(f"{label}: {value:.3f}")
    if "uncached" in paths:
        print(f"(a)/(b) peak memory < 1: {mem['cached'] / mem['uncached']:.3f}")
    print("raw samples (s/step):", json.dumps(timing["samples"]))

if __name__ == "__main__":
    main()
