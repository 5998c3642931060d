"""Train the testbed model from scratch on CPU: a tiny SD1.5-architecture text-to-image model of flat scenes.

    python scripts/make_testbed.py --out diffalign/resources/testbed          # ~30 min on 2 CPU cores

Three stages, all seeded: (1) render a dataset of scenes for the training prompts (``diffalign.testbed``);
(2) train the VAE (32 px -> 4x16x16) on reconstruction; (3) train the CLIP text encoder and the UNet together
on v prediction (DDPM's linear noise schedule, 10% empty captions for classifier-free guidance), keeping an
EMA of both. The result is a stock ``StableDiffusionPipeline`` folder (safetensors) with a card that reports
the checker's prompt-following accuracy on held-out and training prompts.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign import testbed as tb  # noqa: E402
from diffalign.testing import write_clip_tokenizer  # noqa: E402

MAX_TOKENS = 16  # the longest testbed prompt is 9 tokens with BOS/EOS
# DDPM's linear schedule, not SD1.5's scaled_linear: SD1.5's keeps 6.8% of the signal at t = 999, so a sample's
# mean colour (here: the background) followed the initial noise instead of the prompt (30% background accuracy in
# a first run). This one keeps 0.6%; at so little signal epsilon prediction's x0 = (x - sqrt(1-a) eps) / sqrt(a)
# blows up in 20-step DDIM (0% colour accuracy in a second run), so the model predicts v, as SD2 does.
SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                prediction_type="v_prediction")


def build_models(tokenizer_dir: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_config = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps({**cfg, "model_max_length": MAX_TOKENS}))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=64, hidden_act="quick_gelu"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        mid_block_add_attention=False, sample_size=tb.RESOLUTION)
    # Cross-attention at 8x8 and in the middle block; plain ResNet blocks at 16x16 keep a step at ~0.4 s.
    unet = UNet2DConditionModel(
        sample_size=tb.RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=8)
    return tokenizer, text_encoder, vae, unet


def render_dataset(prompts: list[str], n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``n`` scenes for ``prompts`` (uniform over prompts) as a uint8 tensor [n, 3, H, W] and prompt indices."""
    rng = random.Random(seed)
    which = [rng.randrange(len(prompts)) for _ in range(n)]
    images = np.stack([np.asarray(tb.render(tb.random_scene(prompts[i], rng))) for i in which])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), which


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


def lr_at(step: int, steps: int, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, gen: torch.Generator) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps))
    t0 = time.time()
    for step in range(steps):
        x = to_unit(images[torch.randint(len(images), (batch,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            print(f"  vae {step:5d}/{steps}  mse {loss.item():.5f}  {time.time() - t0:6.0f}s", flush=True)
    return loss.item()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(to_unit(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)])


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train_denoiser(unet, text_encoder, latents, ids, empty_ids, steps, batch, gen, check=None):
    """v prediction on ``latents`` (already scaled), text encoder and UNet together; returns the EMA copies."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    t0, running = time.time(), None
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        z0, tokens = latents[idx], ids[idx].clone()
        tokens[torch.rand(batch, generator=gen) < 0.1] = empty_ids  # caption dropout for CFG
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=gen)
        pred = unet(noise_schedule.add_noise(z0, noise, t), t, text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred, noise_schedule.get_velocity(z0, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay), ema_update(ema_text, text_encoder, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            extra = check(ema_unet, ema_text) if check and step and step % 1000 == 0 else ""
            print(f"  denoiser {step:5d}/{steps}  loss {running:.4f}  {time.time() - t0:6.0f}s {extra}", flush=True)
    return ema_unet, ema_text


def make_pipeline(tokenizer, text_encoder, vae, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def measure(pipe, prompts: list[str], seeds: int) -> dict[str, float]:
    """Prompt following of ``pipe`` on ``prompts`` x ``seeds`` with the documented sampling settings."""
    pipe.set_progress_bar_config(disable=True)
    images, used = [], []
    for seed in range(seeds):
        out = pipe(prompts, generator=torch.Generator().manual_seed(seed), output_type="pt", **tb.SAMPLING.pipeline_kwargs())
        images.append(out.images), used.extend(prompts)
    return tb.prompt_following(torch.cat(images), used)


def write_card(out: Path, info: dict) -> None:
    held, train = info["held_out"], info["training"]
    rows = "\n".join(f"| {name} | {held[k]:.3f} | {train[k]:.3f} |" for name, k in [
        ("shape colour", "shape_colour"), ("background colour", "background"), ("both colours", "colour"),
        ("shape class", "shape"), ("all three", "all")])
    (out / "README.md").write_text(f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [diffalign, testbed, stable-diffusion]
---
# diffalign testbed model

A tiny text-to-image model of the Stable Diffusion 1.5 architecture (CLIP text encoder with the real
49,408-token tokenizer, VAE, UNet with cross-attention), trained **from scratch on CPU** by
`scripts/make_testbed.py` on synthetic scenes: one flat shape on a flat background, 32 x 32 px, described as
"a COLOUR SHAPE on a COLOUR background" ({len(tb.SHAPES)} shapes, {len(tb.SHAPE_COLOURS)} shape colours,
{len(tb.BACKGROUND_COLOURS)} background colours). Size, position and saturation of the shape are random and
not in the prompt, which leaves room for the programmatic rewards `shape_size` and `vividness`.
It exists so that alignment can be *shown* on a CPU; it is not a general-purpose model.

## How it was made
`python scripts/make_testbed.py --seed {info['seed']}` ({info['threads']} threads, {info['minutes']:.1f} minutes in all):
- data: {info['images']:,} rendered scenes of the {info['train_prompts']} training prompts; the other
  {info['held_out_prompts']} prompts (combinations never seen in training) are held out;
- VAE (16/32 channels, 4x16x16 latents): {info['vae_steps']} steps of batch {info['vae_batch']}, reconstruction MSE
  {info['vae_mse']:.5f} (images in [-1, 1]); latent scaling factor {info['scaling_factor']:.4f};
- text encoder (2 layers, width 64) and UNet (32/64 channels, {info['unet_params'] / 1e6:.2f} M parameters) trained
  together for {info['steps']} steps of batch {info['batch']} on v prediction (DDPM's linear noise schedule,
  10% empty captions); the weights are the EMA (decay 0.999).

## Prompt following
Measured with `diffalign.testbed.prompt_following` (the checker reads shape colour by hue, background colour
by the border's median, shape class by fill ratio and asymmetry) on {info['seeds']} seeds per prompt, DDIM
{tb.SAMPLING.steps} steps, guidance {tb.SAMPLING.guidance}:

| accuracy | held-out prompts | training prompts |
| --- | --- | --- |
{rows}

The checker itself is exact on rendered scenes (tests/test_testbed.py).

## Use
```python
import diffalign.testbed
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(str(diffalign.testbed.testbed_path()))
image = pipe("a red circle on a gray background", num_inference_steps=20, guidance_scale=5.0).images[0]
```
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="diffalign/resources/testbed", help="pipeline folder to write (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training")
    parser.add_argument("--images", type=int, default=40000, help="rendered training scenes")
    parser.add_argument("--vae-steps", type=int, default=1500, help="VAE training steps")
    parser.add_argument("--vae-batch", type=int, default=32, help="VAE batch size")
    parser.add_argument("--steps", type=int, default=3500, help="text encoder + UNet training steps")
    parser.add_argument("--batch", type=int, default=64, help="text encoder + UNet batch size")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt for the final accuracy")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()

    train_prompts, held_out = tb.split_prompts()
    print(f"rendering {args.images:,} scenes of {len(train_prompts)} prompts", flush=True)
    images, which = render_dataset(train_prompts, args.images, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, text_encoder, vae, unet = build_models(write_clip_tokenizer(Path(tmp) / "tokenizer"))
    print(f"training the VAE ({args.vae_steps} steps)", flush=True)
    vae_mse = train_vae(vae, images, args.vae_steps, args.vae_batch, gen)
    vae.eval().requires_grad_(False)
    latents = encode_all(vae, images)
    scaling = 1 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids

    ids = tokens(train_prompts)[torch.tensor(which)]

    def check(ema_unet, ema_text) -> str:
        acc = measure(make_pipeline(tokenizer, ema_text, vae, ema_unet), held_out, seeds=2)
        return f" held-out: colours {acc['colour']:.2f} shape {acc['shape']:.2f}"

    print(f"training the text encoder and UNet ({args.steps} steps)", flush=True)
    ema_unet, ema_text = train_denoiser(unet, text_encoder, latents * scaling, ids, tokens([""])[0], args.steps,
                                        args.batch, gen, check)
    pipe = make_pipeline(tokenizer, ema_text.eval(), vae, ema_unet.eval())
    out = Path(args.out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    held, trained = measure(pipe, held_out, args.seeds), measure(pipe, train_prompts[::4], args.seeds)
    info = dict(seed=args.seed, threads=args.threads, images=args.images, train_prompts=len(train_prompts),
                held_out_prompts=len(held_out), vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_mse=vae_mse,
                scaling_factor=scaling, steps=args.steps, batch=args.batch, seeds=args.seeds,
                unet_params=sum(p.numel() for p in unet.parameters()), held_out=held, training=trained,
                minutes=(time.time() - start) / 60)
    (staging / "testbed.json").write_text(json.dumps(info, indent=2) + "\n")
    write_card(staging, info)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
