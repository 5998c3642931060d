"""UNet LoRA adapters: add them, switch them off for the reference model, save them in diffusers format."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import LoraConfig
from .files import default_mode

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet: torch.nn.Module, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA adapter to ``unet`` (via diffusers' ``add_adapter``) and return its parameters,
    made fp32 whatever the base weights' dtype, so mixed precision never unscales fp16 gradients."""
    from peft import LoraConfig as PeftLoraConfig

    config = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, lora_dropout=cfg.dropout,
        init_lora_weights="gaussian", target_modules=list(cfg.targets),
    )
    try:
        unet.add_adapter(config)
    except ValueError as e:
        raise ValueError(f"lora.targets={cfg.targets!r}: {e}") from None
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"lora.targets={cfg.targets!r} matched no UNet module")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    _warn_rank_above_width(unet, cfg.rank)
    return params


def _warn_rank_above_width(unet: torch.nn.Module, rank: int) -> None:
    """A rank above a layer's ``min(in, out)`` adds parameters but no capacity there: say so once, naming one."""
    narrow = [(name, min(m.in_features, m.out_features)) for name, m in unet.named_modules()
              if hasattr(m, "lora_A") and hasattr(m, "in_features") and rank > min(m.in_features, m.out_features)]
    if narrow:
        name, width = narrow[0]
        log.warning("lora.rank=%d is larger than the width of %d adapted layer(s), e.g. %s (min(in, out) = %d): the "
                    "extra rank adds parameters but no capacity there; a rank <= %d is as expressive", rank,
                    len(narrow), name, width, min(w for _, w in narrow))


@contextlib.contextmanager
def reference_mode(unet: torch.nn.Module) -> Iterator[None]:
    """The reference model: the same UNet with adapters disabled, under ``no_grad``. Adapters are switched
    back on even if the body raises."""
    unet.disable_adapters()
    try:
        with torch.no_grad():
            yield
    finally:
        unet.enable_adapters()


# peft's names -> diffusers' ``.lora.down/.lora.up`` naming, for every module alike. diffusers' own converter
# renames attention projections only, leaving e.g. a resnet conv as ``lora_A``; diffusers' loader then picks one
# naming from the first key and silently drops the modules written in the other (tests/test_lora_targets.py).
PEFT_TO_DIFFUSERS_SUFFIX = {".lora_A.weight": ".lora.down.weight", ".lora_B.weight": ".lora.up.weight"}


def diffusers_naming(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every peft ``.lora_A/.lora_B.weight`` key renamed ``.lora.down/.lora.up.weight``: one
    naming for every module, which diffusers' loader and the kohya export read in full. Other keys are kept."""
    out = {}
    for key, value in state_dict.items():
        suffix = next((s for s in PEFT_TO_DIFFUSERS_SUFFIX if key.endswith(s)), None)
        out[key if suffix is None else key[:-len(suffix)] + PEFT_TO_DIFFUSERS_SUFFIX[suffix]] = value
    return out


def peft_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter's weights with peft's key names (what checkpoints hold and
    ``set_peft_model_state_dict`` loads back); a copy even on a CPU, so later training does not change it."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (``<module>.lora.down.weight`` / ``.lora.up.weight``,
    without the ``unet.`` prefix), one naming for every adapted module."""
    from peft.utils import get_peft_model_state_dict

    sd = diffusers_naming(get_peft_model_state_dict(unet))
    odd = next((k for k in sd if not k.endswith(tuple(PEFT_TO_DIFFUSERS_SUFFIX.values()))), None)
    if odd is not None:
        raise ValueError(f"LoRA weight {odd!r}: expected a name ending in .lora_A.weight or .lora_B.weight")
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def save_lora(unet: torch.nn.Module, out_dir: str | Path, pipeline_cls) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (loadable by ``pipe.load_lora_weights(out_dir)``) into
    ``out_dir`` atomically: a reader never sees a half-written file. ``pipeline_cls`` is the base model's
    stock pipeline class (:attr:`Backbone.pipeline_class`), whose ``save_lora_weights`` writes the file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = unet.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-lora-") as tmp:
        pipeline_cls.save_lora_weights(tmp, unet_lora_layers=lora_state_dict(unet),
                                       unet_lora_adapter_metadata=metadata)
        # the file diffusers writes is private (0600) here; give it the umask's mode like every other output
        os.chmod(Path(tmp) / WEIGHT_NAME, default_mode())
        os.replace(Path(tmp) / WEIGHT_NAME, out_dir / WEIGHT_NAME)
    return out_dir / WEIGHT_NAME

