"""Steady-state cost of a Diffusion-DPO step, measured in one run, three ways:

  (a) cached   - the trainer's real step, training from the latent + text-embedding cache
  (b) uncached - the same step, decoding images and running the VAE and text encoders every step
  (c) bare     - only the UNet work of a DPO step: policy forward + backward on 2B latents, reference forward

Seconds per step = (time of N2 steps - time of N1 steps) / (N2 - N1), so start-up does not count. Each mode
runs in its own subprocess so its peak memory (GPU: max allocated; CPU: peak RSS) is its own.

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


def _timed(step, n1: int, n2: int) -> float:
    """Steady-state seconds per call of ``step``."""
    import torch

    def run(n: int) -> float:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return time.perf_counter() - start

    run(2)  # warm-up
    _reset_peak_memory()
    t1, t2 = run(n1), run(n2)
    return (t2 - t1) / (n2 - n1)


def worker(mode: str, recipe: str, overrides: list[str], n1: int, n2: int) -> dict:
    import torch

    from diffalign.config import load_config
    from diffalign.trainer import Trainer

    cached = mode != "uncached"
    cfg = load_config(recipe, overrides + [f"cache.enabled={str(cached).lower()}", "log.to=none",
                                           "train.validation_prompts=[]", "train.checkpoint_every=0"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - t0
    if mode == "prepare":
        return {"mode": mode, "setup_s": setup}

    if mode in ("cached", "uncached"):
        state = {"it": iter(()), "micro": 0, "epoch": 0}

        def step():
            batch = next(state["it"], None)
            if batch is None:
                state["epoch"] += 1
                state["it"] = iter(trainer._epoch_loader(state["epoch"]))
                batch = next(state["it"])
            trainer.training_step(batch, state["micro"])
            state["micro"] += 1
    else:
        item = trainer.dataset[0]
        n = cfg.train.batch_size
        unet, backbone = trainer.unet, trainer.backbone
        from diffalign.lora import reference_mode
        from diffalign.models import Conditioning

        dev = trainer.device
        x = torch.randn(2 * n, *item["latents_w"].shape, device=dev)
        t = torch.randint(0, 1000, (2 * n,), device=dev)
        cond = Conditioning(item["prompt_embeds"][None], item["pooled"][None] if "pooled" in item else None,
                            backbone.time_ids(item["geometry"][None], trainer.resolution)).repeat(2 * n).to(dev)

        def step():
            with trainer.accelerator.autocast():
                pred = backbone.predict(x, t, cond, unet=unet)
            trainer.accelerator.backward(pred.float().pow(2).mean())
            with reference_mode(trainer.accelerator.unwrap_model(unet)), trainer.accelerator.autocast():
                backbone.predict(x, t, cond, unet=unet)
            for p in trainer.lora_params:
                p.grad = None

    sec = _timed(step, n1, n2)
    return {"mode": mode, "sec_per_step": sec, "peak_mb": _peak_memory_mb(), "setup_s": setup,
            "device": str(trainer.device), "pairs_per_step": cfg.train.batch_size}


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
    parser.add_argument("--n2", type=int, default=23)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.recipe, args.set, args.n1, args.n2)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        overrides = _tiny_setup(args.recipe, work, args.pairs, args.resolution) + [
            f"data.resolution={args.resolution}", f"train.batch_size={args.batch}", "train.grad_accum=1",
            f"cache.dir={work / 'cache'}", f"train.output_dir={work / 'out'}"] + args.set
        results = {}
        for mode in ("prepare", "cached", "uncached", "bare"):  # "prepare" builds the cache the others reuse
            cmd = [sys.executable, __file__, args.recipe, "--worker", mode, "--n1", str(args.n1), "--n2", str(args.n2)]
            cmd += [a for kv in overrides for a in ("--set", kv)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    a, b, c = results["cached"], results["uncached"], results["bare"]
    print(f"\n{args.recipe}: {args.resolution} px, {args.batch} pairs/step, steps {args.n1}->{args.n2}, "
          f"device {a['device']}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print("| path | s/step | peak memory (MB) |\n|---|---|---|")
    for name, r in (("(a) cached", a), ("(b) uncached", b), ("(c) bare UNet", c)):
        print(f"| {name} | {r['sec_per_step']:.4f} | {r['peak_mb']:.0f} |")
    print(f"\n(a)/(b) time = {a['sec_per_step'] / b['sec_per_step']:.3f}   (target <= 0.85)")
    print(f"(a)/(c) time = {a['sec_per_step'] / c['sec_per_step']:.3f}   (target <= 1.10)")
    print(f"(a)/(b) peak memory = {a['peak_mb'] / b['peak_mb']:.3f}   (target < 1)")


if __name__ == "__main__":
    main()
