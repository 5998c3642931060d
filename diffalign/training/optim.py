"""Optimizers for the LoRA parameters: AdamW, 8-bit AdamW (bitsandbytes) or Adafactor."""

from __future__ import annotations

import torch

from ..config import OptimConfig


def build_optimizer(params: list[torch.nn.Parameter], o: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names, over the LoRA parameters."""
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optim.name=adamw8bit needs bitsandbytes: pip install 'diffalign[bnb]'") from None
        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=o.lr, weight_decay=o.weight_decay, scale_parameter=False, relative_step=False,
                     warmup_init=False)
