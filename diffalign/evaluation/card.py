"""The model card (README.md) written next to a trained adapter, in the Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import Config
from ..files import atomic_copy, atomic_write_text
from .report import prompt_bounds

EVAL_START, EVAL_END = "<!-- diffalign-eval -->", "<!-- /diffalign-eval -->"


def _data(cfg: Config) -> str:
    d, o, s = cfg.data, cfg.objective, cfg.sampling
    if d.labels:
        return f"human labels `{d.labels}` of stored rollouts (D3PO)"
    if d.prompts and not hasattr(o.options, "per_prompt"):  # reward backprop: nothing stored, gradients through
        return (f"samples of the prompts in `{d.prompts}` ({s.steps} DDIM steps, CFG {s.guidance}, gradients through "
                f"the last {o.backprop_steps} step(s)) scored by `{', '.join(o.reward)}`")
    if d.prompts:
        return (f"online rollouts of the prompts in `{d.prompts}` ({o.per_prompt} per prompt, {s.steps} DDIM "
                f"steps, CFG {s.guidance}) labelled by `{', '.join(o.reward)}`")
    return f"`{d.dataset}`"


def _samples(out_dir: Path) -> str:
    grids = sorted((out_dir / "validation").glob("step-*.png"))
    if not grids:
        return ""
    rel = grids[-1].relative_to(out_dir).as_posix()
    return f"\n## Samples\n\nValidation prompts at the last step (fixed seeds):\n\n![samples]({rel})\n"


def update_card_with_eval(adapter_dir: Path, name: str, report: dict, grid: Path | None = None) -> Path | None:
    """Replace the Evaluation section of ``adapter_dir/README.md`` with this adapter's numbers from a
    ``diffalign eval`` report (and a sample grid copied beside the card). No card: nothing to do."""
    card = adapter_dir / "README.md"
    if not card.is_file() or EVAL_START not in (text := card.read_text()):
        return None
    rows = [f"| {h} | {report['mean_scores']['base'][h]:.4g} | {report['mean_scores'][name][h]:.4g} | "
            "{:.3f} [{:.3f}, {:.3f}] |".format(w["rate"], *prompt_bounds(w))
            for h, w in report["win_rates"][name].items()]
    acc = report["pair_accuracy"].get(name)
    extra = (f"\nHeld-out pairs ({acc['pairs']:.0f}): implicit accuracy {acc['implicit_accuracy']:.3f}, ranking "
             f"accuracy {acc['ranking_accuracy']:.3f}.\n") if acc else ""
    picture = ""
    if grid is not None:
        atomic_copy(grid, adapter_dir / "eval_samples.png")
        picture = "\n![base (top) vs aligned (bottom), same seeds](eval_samples.png)\n"
    section = (f"{EVAL_START}\n## Evaluation\n\n{len(report['prompts'])} prompts × {report['seeds']} seeds, "
               f"{report['steps']} steps, CFG {report['guidance']}; win rate vs the base model with a 95% interval "
               f"over prompts.\n\n| head | base mean | aligned mean | win rate |\n|---|---|---|---|\n" + "\n".join(rows)
               + f"\n{extra}{picture}{EVAL_END}")
    before, rest = text.split(EVAL_START, 1)
    after = rest.split(EVAL_END, 1)[1] if EVAL_END in rest else ""
    atomic_write_text(card, before + section + after)
    return card


def _stopped(stopped: str | None) -> str:
    if stopped is None:
        return ""
    # The metrics table shows the last step run, which trained past the adapter handed back: say so beside it.
    return (f"\n**Stopped early.** {stopped}. The training metrics below are those of the last step run, after that "
            "adapter; `metrics.json` has every step, with the guard's readings (`eval_guard_*`).\n")


def write_model_card(out_dir: Path, cfg: Config, kind: str, steps: int, history: list[dict],
                     beta: float | None, stopped: str | None = None) -> Path:
    """README.md with YAML metadata (base model, tags), how the adapter was trained and its last metrics;
    ``stopped``: why the adapter is an earlier step's than the last one run (a reward-hacking guard fell)."""
    meta = {"base_model": cfg.model.pretrained, "library_name": "diffusers", "license": "other",
            "tags": ["diffalign", "lora", "text-to-image", kind, f"diffalign-{cfg.objective.name}"]}
    last = history[-1] if history else {}
    metrics = "\n".join(f"| {k} | {v:.6g} |" for k, v in last.items()) or "| (no steps run) | |"
    o, lo, t = cfg.objective, cfg.lora, cfg.train
    text = f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {cfg.objective.name} LoRA for {cfg.model.pretrained}

Trained with [diffalign](https://github.com/) objective `{o.name}`{f" (β = {beta:g})" if beta is not None else ""} on
{_data(cfg)} at {cfg.data.resolution or "default"} px for {steps} optimizer steps.
{_stopped(stopped)}
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

The full configuration is in `config.yaml`; per-step metrics in `metrics.json`; the package versions it was
trained with in `environment.json`.
{_samples(out_dir)}{EVAL_START}
## Evaluation

Not evaluated yet: `diffalign eval --base {cfg.model.pretrained} --adapter {out_dir} --prompts PROMPTS --reward HEADS
--out EVAL_DIR` fills this section in.
{EVAL_END}
"""
    path = out_dir / "README.md"
    atomic_write_text(path, text)
    return path
