"""Sharing an adapter: a kohya-format file for A1111 / ComfyUI, or a full pipeline with the adapter fused in.

Our adapters are diffusers-format files (``unet.<module>.lora.{down,up}.weight``, LoRA alpha in the metadata).
The kohya format names a module ``lora_unet_<module with dots as underscores>`` with ``.lora_down.weight``,
``.lora_up.weight`` and a scalar ``.alpha`` (scale = alpha / rank, so alpha ≠ rank survives the trip).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from ..files import atomic_folder, atomic_save_safetensors
from ..lora import WEIGHT_NAME, diffusers_naming
from ..models import KOHYA_BASE_VERSION, kind_of_unet_lora

SUFFIXES = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight"}


class ExportError(ValueError):
    """An adapter folder or file that cannot be exported; the message names it."""


def read_adapter(adapter: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The diffusers-format LoRA tensors of an adapter folder (or file) and its peft config from the metadata."""
    path = Path(adapter)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise ExportError(f"adapter {str(adapter)!r}: no {WEIGHT_NAME} there (expected a diffalign output folder)")
    with safe_open(str(file), "pt") as f:
        tensors = diffusers_naming({k: f.get_tensor(k) for k in f.keys()})  # older files mix two namings
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw is None:
        raise ExportError(f"{file}: no lora_adapter_metadata (LoRA alpha unknown); was it written by diffalign?")
    config = {k.removeprefix("unet."): v for k, v in json.loads(raw).items()}
    return tensors, config


def _alpha(module: str, config: dict) -> float:
    """peft's alpha for ``module`` (its ``alpha_pattern`` overrides the global ``lora_alpha``)."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module.endswith(pattern):
            return float(value)
    return float(config["lora_alpha"])


def to_kohya(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers-format UNet LoRA tensors -> kohya keys (``lora_unet_*`` with ``.alpha``)."""
    out = {}
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if not key.startswith("unet.") or suffix is None:
            raise ExportError(f"cannot export key {key!r}: only UNet LoRA down/up weights are supported")
        module = key[len("unet."):-len(suffix)]
        name = "lora_unet_" + module.replace(".", "_")
        out[name + SUFFIXES[suffix]] = value.contiguous()
        out[name + ".alpha"] = torch.tensor(_alpha(module, config))
    return out


def export_kohya(adapter: str | Path, out: str | Path) -> Path:
    """Write the adapter as one kohya-format ``.safetensors`` file (written to a temporary name, then renamed)."""
    tensors, config = read_adapter(adapter)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {str(out)!r}: a kohya LoRA is a .safetensors file")
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = kind_of_unet_lora(tensors) or _base_kind(adapter) or "sd15"
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.get("r")),
            "ss_network_alpha": str(config.get("lora_alpha")),
            "ss_base_model_version": KOHYA_BASE_VERSION[kind], "exported_by": "diffalign"}
    return atomic_save_safetensors(out, to_kohya(tensors, config), metadata=meta)


def _base_of(adapter: str | Path) -> str | None:
    cfg = Path(adapter) / "config.yaml"
    if not cfg.is_file():
        return None
    return (yaml.safe_load(cfg.read_text()) or {}).get("model", {}).get("pretrained") or None


def _base_kind(adapter: str | Path) -> str | None:
    from ..models import model_kind

    base = _base_of(adapter)
    try:
        return model_kind(base) if base else None
    except Exception:  # the base is not reachable here: the key names decide
        return None


def export_fused(adapter: str | Path, out: str | Path, base: str | None = None, scale: float = 1.0) -> Path:
    """A full diffusers pipeline folder with the adapter fused into the UNet at ``scale`` (loadable by
    ``DiffusionPipeline.from_pretrained``, no LoRA needed). ``base`` defaults to the one in the adapter's
    ``config.yaml``."""
    from . import load_aligned_pipeline

    base = base or _base_of(adapter)
    if not base:
        raise ExportError(f"adapter {str(adapter)!r} has no config.yaml naming its base model; pass --base")
    read_adapter(adapter)  # a clear error before loading the base
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {str(out)!r} exists and is not empty")
    pipe = load_aligned_pipeline(base, [adapter], [1.0])
    pipe.fuse_lora(components=["unet"], lora_scale=scale)
    pipe.unload_lora_weights()
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out
