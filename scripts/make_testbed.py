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


def _text_encoder(with_projection: bool, layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=64, hidden_act="quick_gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tokenizer(folder: Path, pad_token: str):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder, pad_token=pad_token)
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": MAX_TOKENS}))
    return CLIPTokenizer.from_pretrained(str(folder))


class TextSide:
    """The tokenizer(s) and text encoder(s) of one architecture, and how its stock pipeline turns a prompt into
    the UNet's conditioning, so that training conditions the UNet exactly as sampling will.

    SD1.5: the encoder's last hidden state; the empty prompt is the unconditional branch. SDXL: both encoders'
    penultimate hidden states concatenated, encoder 2's pooled projection and the six time ids; the unconditional
    branch is all zeros (the pipeline's ``force_zeros_for_empty_prompt``), so dropped captions are zeros here."""

    def __init__(self, arch: str, tokenizers: list, encoders: list):
        self.arch, self.tokenizers, self.encoders = arch, tokenizers, encoders

    def tokens(self, texts: list[str]) -> torch.Tensor:
        """Token ids [N, encoders, MAX_TOKENS]."""
        return torch.stack([tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                return_tensors="pt").input_ids for tok in self.tokenizers], dim=1)

    def condition(self, tokens: torch.Tensor, dropped: torch.Tensor, encoders: list | None = None) -> dict:
        """UNet keyword arguments for ``tokens``; rows where ``dropped`` is true get the unconditional branch."""
        encoders = encoders or self.encoders
        if self.arch == "sd15":
            tokens = tokens[:, 0].clone()
            tokens[dropped] = self.tokens([""])[0, 0]
            return {"encoder_hidden_states": encoders[0](tokens)[0]}
        first = encoders[0](tokens[:, 0], output_hidden_states=True)
        second = encoders[1](tokens[:, 1], output_hidden_states=True)
        keep = (~dropped).float()
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1) * keep[:, None, None]
        time_ids = torch.tensor([tb.RESOLUTION, tb.RESOLUTION, 0, 0, tb.RESOLUTION, tb.RESOLUTION]).float()
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {
            "text_embeds": second.text_embeds * keep[:, None], "time_ids": time_ids.expand(len(tokens), 6)}}


def build_models(tokenizer_dir: Path, arch: str = "sd15"):
    """(TextSide, VAE, UNet) of the testbed in ``arch``: the same VAE and UNet widths for both; SDXL adds a second
    text encoder with a projection (pooled embedding) and the UNet's text-time embedding."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    # Cross-attention at 8x8 and in the middle block; plain ResNet blocks at 16x16 keep a step at ~0.4 s.
    blocks = dict(sample_size=tb.RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    # Built in this order (text, VAE, UNet) so that a seed reproduces the committed model. SDXL reads the
    # penultimate layer of both encoders, so each has three (encoder 1's last one goes unused, as in SDXL);
    # tokenizer 2 pads with "!" as SDXL's does.
    if arch == "sd15":
        text = TextSide(arch, [_tokenizer(tokenizer_dir / "tokenizer", "<|endoftext|>")], [_text_encoder(False, 2)])
    else:
        text = TextSide(arch, [_tokenizer(tokenizer_dir / "tokenizer", "<|endoftext|>"),
                               _tokenizer(tokenizer_dir / "tokenizer_2", "!")], [_text_encoder(False, 3), _text_encoder(True, 3)])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        mid_block_add_attention=False, sample_size=tb.RESOLUTION)
    if arch == "sd15":
        return text, vae, UNet2DConditionModel(cross_attention_dim=64, **blocks)
    unet = UNet2DConditionModel(cross_attention_dim=128, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 64, use_linear_projection=True, **blocks)
    return text, vae, unet


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


def train_denoiser(unet, text: TextSide, latents, ids, steps, batch, gen, check=None):
    """v prediction on ``latents`` (already scaled), text encoder(s) and UNet together; returns the EMA copies."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + [p for enc in text.encoders for p in enc.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps))
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = [copy.deepcopy(enc).requires_grad_(False) for enc in text.encoders]
    t0, running = time.time(), None
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        z0, dropped = latents[idx], torch.rand(batch, generator=gen) < 0.1  # caption dropout for CFG
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=gen)
        pred = unet(noise_schedule.add_noise(z0, noise, t), t, **text.condition(ids[idx], dropped)).sample
        loss = F.mse_loss(pred, noise_schedule.get_velocity(z0, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        for ema, enc in zip(ema_text, text.encoders):
            ema_update(ema, enc, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            extra = check(ema_unet, ema_text) if check and step and step % 1000 == 0 else ""
            print(f"  denoiser {step:5d}/{steps}  loss {running:.4f}  {time.time() - t0:6.0f}s {extra}", flush=True)
    return ema_unet, ema_text


def make_pipeline(text: TextSide, encoders: list, vae, unet):
    """The stock pipeline of ``text.arch`` around ``encoders`` (e.g. the EMA copies), with DDIM on the schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if text.arch == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=text.tokenizers[0],
            tokenizer_2=text.tokenizers[1], unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=text.tokenizers[0], unet=unet,
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
    xl = info.get("arch") == "sdxl"
    architecture = ("Stable Diffusion XL architecture (two CLIP text encoders with the real 49,408-token tokenizer, "
                    "the second one's pooled projection and the six time ids feeding the UNet's text-time embedding, VAE, "
                    "UNet with cross-attention)") if xl else (
                    "Stable Diffusion 1.5 architecture (CLIP text encoder with the real 49,408-token tokenizer, VAE, UNet "
                    "with cross-attention)")
    command = f"python scripts/make_testbed.py --seed {info['seed']}" + (
        f" --arch sdxl --vae {info['vae_from']}" if xl else "")
    vae_line = (f"VAE: the SD1.5 testbed's (the same AutoencoderKL in both architectures, reused so both testbeds "
                f"share one latent space), reconstruction MSE {info['vae_mse']:.5f} on 256 training scenes"
                if info.get("vae_from") else
                f"VAE (16/32 channels, 4x16x16 latents): {info['vae_steps']} steps of batch {info['vae_batch']}, "
                f"reconstruction MSE {info['vae_mse']:.5f}") + f" (images in [-1, 1]); latent scaling factor {info['scaling_factor']:.4f}"
    text_line = ("two text encoders (3 layers, width 64; the UNet reads both penultimate layers, 128 wide, as SDXL "
                 "does, and encoder 2's 64-wide pooled projection)" if xl else "text encoder (2 layers, width 64)")
    dropout = "10% of captions dropped to zeros, SDXL's unconditional branch" if xl else "10% empty captions"
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    path_call = 'testbed_path("sdxl")' if xl else "testbed_path()"
    (out / "README.md").write_text(f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [diffalign, testbed, {"stable-diffusion-xl" if xl else "stable-diffusion"}]
---
# diffalign testbed model{" (SDXL architecture)" if xl else ""}

A tiny text-to-image model of the {architecture}, trained **from scratch on CPU** by
`scripts/make_testbed.py` on synthetic scenes: one flat shape on a flat background, 32 x 32 px, described as
"a COLOUR SHAPE on a COLOUR background" ({len(tb.SHAPES)} shapes, {len(tb.SHAPE_COLOURS)} shape colours,
{len(tb.BACKGROUND_COLOURS)} background colours). Size, position and saturation of the shape are random and
not in the prompt, which leaves room for the programmatic rewards (`shape_size`, `vividness`, `left_position`,
`centredness`, `edge_sharpness`).
It exists so that alignment can be *shown* on a CPU; it is not a general-purpose model.

## How it was made
`{command}` ({info['threads']} threads, {info['minutes']:.1f} minutes in all):
- data: {info['images']:,} rendered scenes of the {info['train_prompts']} training prompts; the other
  {info['held_out_prompts']} prompts (combinations never seen in training) are held out;
- {vae_line};
- {text_line} and UNet (32/64 channels, {info['unet_params'] / 1e6:.2f} M parameters) trained
  together for {info['steps']} steps of batch {info['batch']} on v prediction (DDPM's linear noise schedule,
  {dropout}); the weights are the EMA (decay 0.999).

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
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained(str(diffalign.testbed.{path_call}))
image = pipe("a red circle on a gray background", num_inference_steps=20, guidance_scale=5.0).images[0]
```
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15", help="model architecture")
    parser.add_argument("--out", default=None,
                        help="pipeline folder to write (replaced); default diffalign/resources/testbed[_sdxl]")
    parser.add_argument("--vae", default=None, help="reuse the VAE of this testbed folder instead of training one")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training")
    parser.add_argument("--images", type=int, default=40000, help="rendered training scenes")
    parser.add_argument("--vae-steps", type=int, default=1500, help="VAE training steps")
    parser.add_argument("--vae-batch", type=int, default=32, help="VAE batch size")
    parser.add_argument("--steps", type=int, default=3500, help="text encoder + UNet training steps")
    parser.add_argument("--batch", type=int, default=64, help="text encoder + UNet batch size")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt for the final accuracy")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    args.out = args.out or ("diffalign/resources/testbed" + ("_sdxl" if args.arch == "sdxl" else ""))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()

    train_prompts, held_out = tb.split_prompts()
    print(f"rendering {args.images:,} scenes of {len(train_prompts)} prompts", flush=True)
    images, which = render_dataset(train_prompts, args.images, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        text, vae, unet = build_models(Path(tmp), args.arch)
    if args.vae:  # the same AutoencoderKL in both architectures: reuse a testbed's, scaling factor included
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae")
        with torch.no_grad():
            x = to_unit(images[:256])
            vae_mse = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()
        print(f"reusing the VAE of {args.vae} (reconstruction MSE {vae_mse:.5f})", flush=True)
    else:
        print(f"training the VAE ({args.vae_steps} steps)", flush=True)
        vae_mse = train_vae(vae, images, args.vae_steps, args.vae_batch, gen)
    vae.eval().requires_grad_(False)
    latents = encode_all(vae, images)
    scaling = vae.config.scaling_factor if args.vae else 1 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    ids = text.tokens(train_prompts)[torch.tensor(which)]

    def check(ema_unet, ema_text) -> str:
        acc = measure(make_pipeline(text, ema_text, vae, ema_unet), held_out, seeds=2)
        return f" held-out: colours {acc['colour']:.2f} shape {acc['shape']:.2f}"

    print(f"training the text encoder(s) and UNet ({args.steps} steps)", flush=True)
    ema_unet, ema_text = train_denoiser(unet, text, latents * scaling, ids, args.steps, args.batch, gen, check)
    pipe = make_pipeline(text, [e.eval() for e in ema_text], vae, ema_unet.eval())
    out = Path(args.out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    held, trained = measure(pipe, held_out, args.seeds), measure(pipe, train_prompts[::4], args.seeds)
    info = dict(arch=args.arch, vae_from=args.vae, seed=args.seed, threads=args.threads, images=args.images, train_prompts=len(train_prompts),
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
