"""The model card (README.md) written next to a trained adapter, in the Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import Config
from .lora import atomic_write_text


def write_model_card(out_dir: Path, cfg: Config, kind: str, steps: int, history: list[dict], beta: float) -> Path:
    """README.md with YAML metadata (base model, tags), how the adapter was trained and its last metrics."""
    meta = {"base_model": cfg.model.pretrained, "library_name": "diffusers", "license": "other",
            "tags": ["diffalign", "lora", "text-to-image", kind, f"diffalign-{cfg.objective.name}"]}
    last = history[-1] if history else {}
    metrics = "\n".join(f"| {k} | {v:.6g} |" for k, v in last.items()) or "| (no steps run) | |"
    o, lo, t = cfg.objective, cfg.lora, cfg.train
    text = f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {cfg.objective.name} LoRA for {cfg.model.pretrained}

Trained with [diffalign](https://github.com/) objective `{o.name}` (β = {beta:g}) on
`{cfg.data.dataset}` at {cfg.data.resolution or "default"} px for {steps} optimizer steps.

| setting | value |
|---|---|
| LoRA rank / alpha / targets | {lo.rank} / {lo.alpha if lo.alpha is not None else lo.rank} / {", ".join(lo.targets)} |
| optimizer, lr, warmup | {cfg.optim.name}, {cfg.optim.lr:g}, {cfg.optim.warmup_steps} |
| pairs per device × accumulation | {t.batch_size} × {t.grad_accum} |
| caption dropout | {cfg.data.caption_dropout} |
| mixed precision | {t.mixed_precision} |
| seed | {t.seed} |

## Use

```python
from diffalign.pipelines import load_aligned_pipeline
pipe = load_aligned_pipeline("{cfg.model.pretrained}", "{out_dir}")
# or, with diffusers alone: pipe.load_lora_weights("{out_dir}")
```

## Last training metrics

| metric | value |
|---|---|
{metrics}

The full configuration is in `config.yaml`; per-step metrics in `metrics.json`.
"""
    path = out_dir / "README.md"
    atomic_write_text(path, text)
    return path
