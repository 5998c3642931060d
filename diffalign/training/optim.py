"""Optimizers for the LoRA parameters: AdamW, 8-bit AdamW (bitsandbytes) or Adafactor."""

from __future__ import annotations

import torch

from ..config import ConfigError, OptimConfig


class MissingDependencyError(ConfigError, ImportError):
    """A config value needs an optional package that is not installed: a one-line error saying what to install
    (also an ``ImportError``, which is what it is)."""


def check_available(o: OptimConfig) -> None:
    """Fail before any model loads when the optimizer needs a package that is not installed."""
    import importlib.util

    if o.name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError("optim.name=adamw8bit needs bitsandbytes: pip install 'diffalign[bnb]'",
                                     ("optim.name",))


def build_optimizer(params: list[torch.nn.Parameter], o: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names, over the LoRA parameters."""
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    check_available(o)
    if o.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=o.lr, weight_decay=o.weight_decay, scale_parameter=False, relative_step=False,
                     warmup_init=False)
