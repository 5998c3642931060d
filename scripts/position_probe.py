"""How much absolute position the frozen testbed UNet's features carry where the default LoRA acts: a ridge probe
from each token's feature vector, at the input of every attention block, to the token's (row, col) and its distance
from the centre (city-block, in tokens: ``|row - c| + |col - c|``), fitted on half of the images and scored (R², 1 =
fully linear in the features) on the other half.

Why: ``centredness`` asks each shape to move towards the centre, a direction that depends on where the shape is, and
every objective (reward backprop with the reward's own gradient too) stays near chance on it. The attention layers
have no positional encoding, so one explanation would be that the features the adapters read do not say where a
token is. This reads whether they do. Scenes are drawn from the training prompts, encoded by the VAE and noised to
each timestep; a column of random features shows the probe's floor.

    python scripts/position_probe.py [--images 256] [--timesteps 100,500,900,999] [--testbed sd15]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ridge_r2(features, targets, n_fit: int, alpha: float = 1.0):
    """R² per target column of a ridge regression fitted on the first ``n_fit`` rows, scored on the rest."""
    import numpy as np

    fit, test = features[:n_fit], features[n_fit:]
    mean, std = fit.mean(0), fit.std(0) + 1e-6
    design = np.c_[(fit - mean) / std, np.ones(len(fit))]
    weights = np.linalg.solve(design.T @ design + alpha * np.eye(design.shape[1]), design.T @ targets[:n_fit])
    predicted = np.c_[(test - mean) / std, np.ones(len(test))] @ weights
    truth = targets[n_fit:]
    return 1 - ((predicted - truth) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="scenes drawn from the training prompts")
    parser.add_argument("--timesteps", default="100,500,900,999", help="comma-separated noise levels")
    parser.add_argument("--testbed", choices=("sd15", "sdxl"), default="sd15")
    args = parser.parse_args()

    import numpy as np
    import torch

    from diffalign.models import Backbone
    from diffalign.testbed import random_scene, render, split_prompts, testbed_path

    torch.manual_seed(0)
    backbone = Backbone.load(str(testbed_path(args.testbed)))
    backbone.unet.eval()
    rng = random.Random(0)
    prompts = [rng.choice(split_prompts()[0]) for _ in range(args.images)]
    pixels = torch.stack([torch.from_numpy(np.asarray(render(random_scene(p, rng)), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for p in prompts])
    features: dict[str, torch.Tensor] = {}
    blocks = [(name, module) for name, module in backbone.unet.named_modules() if name.endswith("attentions.0")]
    for name, module in blocks:
        module.register_forward_pre_hook(lambda m, a, n=name: features.__setitem__(n, a[0].detach()))
    latents = backbone.encode_images(pixels)
    with torch.no_grad():
        conditioning = backbone.at_resolution(backbone.encode_prompt(prompts), pixels.shape[-1])
    floor = np.random.default_rng(0)
    print("| t | block | size | R² row | R² col | R² distance from centre | R² random features |")
    print("|---|---|---|---|---|---|---|")
    for t in (int(v) for v in args.timesteps.split(",")):
        noisy = backbone.scheduler.add_noise(latents, torch.randn_like(latents), torch.tensor([t]))
        with torch.no_grad():
            backbone.predict(noisy, torch.full((len(prompts),), t), conditioning)
        for name, _ in blocks:
            b, c, h, w = features[name].shape
            x = features[name].permute(0, 2, 3, 1).reshape(b * h * w, c).double().numpy()
            rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            position = np.tile(np.stack([rows, cols], -1).reshape(h * w, 2), (b, 1)).astype(float)
            distance = np.abs(position - (h - 1) / 2).sum(1, keepdims=True)
            n_fit = (b // 2) * h * w  # whole images on each side: no image is in both halves
            row, col, centre = ridge_r2(x, np.c_[position, distance], n_fit)  # ridge fits each column on its own
            random_r2 = ridge_r2(floor.standard_normal(x.shape), position, n_fit).mean()
            print(f"| {t} | {name} | {h}×{w}×{c} | {row:.3f} | {col:.3f} | {centre:.3f} | {random_r2:.3f} |")


if __name__ == "__main__":
    main()
