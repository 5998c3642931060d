"""Steady-state cost of a Diffusion-DPO step, measured in one run, three ways:

  (a) cached   - the trainer's real step, training from the latent + text-embedding cache
  (b) uncached - the same step, decoding images and running the VAE and text encoders every step
  (c) bare     - only the UNet work of a DPO step: policy forward + backward on 2B latents, reference forward

Seconds per step = (time of N2 steps - time of N1 steps) / (N2 - N1), so start-up does not count. The three
paths are timed in one process, interleaved round-robin, and each ratio is the median of per-round ratios, because a shared 2-core
machine drifts by 30% over minutes; peak memory (GPU: max allocated; CPU: peak RSS after a reset) comes from a
fresh process per path that loads only what that path needs.

    python scripts/bench_train.py assets/recipes/tiny-sdxl-dpo.yaml            # tiny model, built offline
    python scripts/bench_train.py RECIPE --set model.pretrained=... --set data.dataset=...
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


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _block_time(step, n: int) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - start


def _steppers(trainer, cached_dataset) -> dict:
    """One step function per path, all on the same trainer (the uncached one, which has the encoders)."""
    import torch
    from torch.utils.data import DataLoader

    from diffalign.lora import reference_mode
    from diffalign.models import Conditioning

    n, dev, backbone, unet = trainer.cfg.train.batch_size, trainer.device, trainer.backbone, trainer.unet

    def cycling(make_loader):
        state = {"it": iter(()), "micro": 0}

        def next_batch():
            batch = next(state["it"], None)
            if batch is None:
                state["it"] = iter(make_loader())
                batch = next(state["it"])
            state["micro"] += 1
            return batch, state["micro"]
        return next_batch

    cached_batches = cycling(lambda: DataLoader(cached_dataset, batch_size=n, shuffle=True, drop_last=True))
    raw_batches = cycling(lambda: trainer._epoch_loader(0))

    item = cached_dataset[0]
    x = torch.randn(2 * n, *item["latents_w"].shape, device=dev)
    t = torch.randint(0, 1000, (2 * n,), device=dev)
    cond = Conditioning(item["prompt_embeds"][None], item["pooled"][None] if "pooled" in item else None,
                        backbone.time_ids(item["geometry"][None], trainer.resolution)).repeat(2 * n).to(dev)

    def bare():
        with trainer.accelerator.autocast():
            pred = backbone.predict(x, t, cond, unet=unet)
        trainer.accelerator.backward(pred.float().pow(2).mean())
        with reference_mode(trainer.accelerator.unwrap_model(unet)), trainer.accelerator.autocast():
            backbone.predict(x, t, cond, unet=unet)
        for p in trainer.lora_params:
            p.grad = None

    return {"cached": lambda: trainer.training_step(*cached_batches()),
            "uncached": lambda: trainer.training_step(*raw_batches()),
            "bare": bare}


def worker(mode: str, recipe: str, overrides: list[str], n1: int, n2: int, repeats: int) -> dict:
    """``prepare``: build the cache. ``timing``: all paths in this process, interleaved, so machine drift hits
    them alike. ``memory-<path>``: a few steps of one path in a fresh process, for its own peak memory."""
    from diffalign.config import load_config
    from diffalign.data.cache import CachedPairDataset, cache_folder
    from diffalign.models import model_fingerprint
    from diffalign.trainer import Trainer

    path = mode.removeprefix("memory-")
    # the uncached path needs the encoders loaded; the others train from the cache without them
    cached = mode == "prepare" or (mode.startswith("memory-") and path != "uncached")
    cfg = load_config(recipe, overrides + [f"cache.enabled={str(cached).lower()}", "log.to=none",
                                           "train.validation_prompts=[]", "train.checkpoint_every=0"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    if mode == "prepare":
        return {"mode": mode, "setup_s": time.perf_counter() - t0, "device": str(trainer.device)}
    if cached:
        dataset = trainer.dataset
    else:
        m = cfg.model
        dataset = CachedPairDataset(cache_folder(model_fingerprint(m.pretrained, m.vae, m.revision), trainer.dataset,
                                                 cfg.cache.dtype, Path(cfg.cache.dir)))
    steps = _steppers(trainer, dataset)
    if mode.startswith("memory-"):
        steps[path]()
        _reset_peak_memory()
        _block_time(steps[path], 4)
        return {"mode": mode, "peak_mb": _peak_memory_mb()}
    import statistics

    for step in steps.values():  # warm-up
        _block_time(step, 2)
    samples: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % 3:] + names[: r % 3]:  # rotate, so no path always runs first
            samples[name].append((_block_time(steps[name], n2) - _block_time(steps[name], n1)) / (n2 - n1))
    # The paths of one round share the machine's drift: the median of per-round ratios cancels most of it.
    ratios = {f"{a}/{b}": statistics.median(x / y for x, y in zip(samples[a], samples[b]))
              for a, b in (("cached", "uncached"), ("cached", "bare"))}
    return {"mode": mode, "sec_per_step": {k: statistics.median(v) for k, v in samples.items()},
            "ratios": ratios, "samples": samples, "device": str(trainer.device)}


def _tiny_setup(recipe: str, work: Path, pairs: int, resolution: int) -> list[str]:
    from diffalign.config import load_config
    from diffalign.testing import save_tiny_pipeline, write_pickapic_parquet

    cfg = load_config(recipe)
    if cfg.model.pretrained and cfg.data.dataset:
        return []
    kind = "sd15" if "sd15" in Path(recipe).name else "sdxl"
    model = save_tiny_pipeline(work / f"tiny-{kind}", kind)
    data = write_pickapic_parquet(work / "pairs.parquet", n=pairs, size=int(resolution * 1.5))
    return [f"model.pretrained={model}", f"data.dataset={data}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--pairs", type=int, default=64, help="pairs in the generated dataset (tiny recipes)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--n1", type=int, default=3)
    parser.add_argument("--n2", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=7, help="median over this many measurements")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.recipe, args.set, args.n1, args.n2, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        overrides = _tiny_setup(args.recipe, work, args.pairs, args.resolution) + [
            f"data.resolution={args.resolution}", f"train.batch_size={args.batch}", "train.grad_accum=1",
            f"cache.dir={work / 'cache'}", f"train.output_dir={work / 'out'}"] + args.set
        results = {}
        modes = ["prepare", "timing", "memory-cached", "memory-uncached", "memory-bare"]
        for mode in modes:  # "prepare" builds the cache the others reuse
            cmd = [sys.executable, __file__, args.recipe, "--worker", mode, "--n1", str(args.n1), "--n2", str(args.n2),
                   "--repeats", str(args.repeats)]
            cmd += [a for kv in overrides for a in ("--set", kv)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    sec = results["timing"]["sec_per_step"]
    mem = {k: results[f"memory-{k}"]["peak_mb"] for k in sec}
    print(f"\n{args.recipe}: {args.resolution} px, {args.batch} pairs/step, device {results['timing']['device']}; "
          f"s/step = median over {args.repeats} interleaved rounds of (T({args.n2}) - T({args.n1})) / {args.n2 - args.n1}\n")
    print("| path | s/step | peak memory (MB) |\n|---|---|---|")
    for name, key in (("(a) cached", "cached"), ("(b) uncached", "uncached"), ("(c) bare UNet", "bare")):
        print(f"| {name} | {sec[key]:.4f} | {mem[key]:.0f} |")
    ratios = results["timing"]["ratios"]
    print(f"\n(a)/(b) time = {ratios['cached/uncached']:.3f}   (target <= 0.85; median of per-round ratios)")
    print(f"(a)/(c) time = {ratios['cached/bare']:.3f}   (target <= 1.10; median of per-round ratios)")
    print(f"(a)/(b) peak memory = {mem['cached'] / mem['uncached']:.3f}   (target < 1)")
    print("raw samples (s/step):", json.dumps(results["timing"]["samples"]))

if __name__ == "__main__":
    main()
