"""Inference with aligned adapters: stock diffusers pipelines with our LoRA loaded."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from ..lora import PEFT_TO_DIFFUSERS_SUFFIX, WEIGHT_NAME, diffusers_naming
from ..models import ModelLoadError, model_kind, pipeline_class, pipeline_defaults


class AdapterError(ModelLoadError):
    """An adapter file that cannot be read or loaded; the message names the file."""


def stock_pipeline(base: str, revision: str | None = None, with_text_encoders: bool = True,
                   torch_dtype: torch.dtype | None = None, **components):
    """The base model's own stock diffusers pipeline class (:func:`~diffalign.models.pipeline_class`), with
    ``components`` substituted and, if asked, no text encoders."""
    kind = model_kind(base, revision)
    cls = pipeline_class(kind)
    components = {**pipeline_defaults(kind, with_text_encoders), **components}
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return cls.from_pretrained(base, revision=revision, **components, **kwargs)


def adapter_file(adapter: str | Path) -> Path:
    path = Path(adapter)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"adapter {str(adapter)!r}: no {WEIGHT_NAME} there (expected a diffalign output folder)")
    return file


def check_adapter_file(file: Path) -> None:
    """Refuse a file that is not a whole safetensors file (garbage, truncated) with an :class:`AdapterError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"adapter {str(file)!r} is not a readable safetensors file ({e}); it may be truncated or "
                           "damaged: train again or copy it again") from None
    if not keys:
        raise AdapterError(f"adapter {str(file)!r} holds no tensors")


def load_adapter(pipe, file: Path, name: str) -> None:
    """Load one diffalign adapter into ``pipe``'s UNet only (what ``pipe.load_lora_weights`` does, without
    asking the text encoders, which diffalign never trains), honouring the LoRA alpha in its metadata. The caller
    has checked the file (:func:`check_adapter_file`)."""
    try:
        state_dict, network_alphas, metadata = pipe.lora_state_dict(str(file.parent), weight_name=file.name,
                                                                    return_lora_metadata=True)
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError("not a LoRA state dict (every key must contain 'lora')")
        if not any(key.startswith("unet.") for key in state_dict):
            raise ValueError("no UNet LoRA weights in it")
        # files written before every module was named alike mix the namings: read all of them
        state_dict = diffusers_naming(state_dict)
        pipe.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=pipe.unet, adapter_name=name,
                                 metadata=metadata, _pipeline=pipe)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise AdapterError(f"adapter {str(file)!r} cannot be loaded into {type(pipe).__name__}: "
                           f"{type(e).__name__}: {e}") from None
    loaded = {module for module, layer in pipe.unet.named_modules()
              if name in (getattr(layer, "lora_A", None) or {})}
    missing = sorted(adapted_modules(state_dict) - loaded)
    if missing:  # diffusers only warns when a module of the file is not adapted
        raise AdapterError(f"adapter {str(file)!r}: {len(missing)} of its modules did not load into "
                           f"{type(pipe).__name__}'s UNet, e.g. {missing[0]!r}; is it for another base model?")


def adapted_modules(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """The UNet modules a (diffusers-named) adapter state dict adapts, by their names in the UNet."""
    suffix = PEFT_TO_DIFFUSERS_SUFFIX[".lora_A.weight"]
    return {key.removeprefix("unet.").removesuffix(suffix) for key in state_dict if key.endswith(suffix)}


def load_aligned_pipeline(base: str, adapters: str | Path | list[str | Path] = (), scales: float | list[float] = 1.0,
                          device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                          revision: str | None = None):
    """A stock diffusers pipeline (SD1.5 or SDXL) for ``base`` with each adapter loaded
    into its UNet (the same weights ``pipe.load_lora_weights`` loads) and activated at its scale (scale 0
    reproduces the base). A file that cannot be read or loaded raises :class:`AdapterError` naming it."""
    adapters = [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    scales = [scales] * len(adapters) if isinstance(scales, (int, float)) else list(scales)
    if len(scales) != len(adapters):
        raise ValueError(f"{len(adapters)} adapter(s) but {len(scales)} scale(s)")
    files = [adapter_file(adapter) for adapter in adapters]
    for file in files:  # before the base model loads: a bad file fails fast
        check_adapter_file(file)
    pipe = stock_pipeline(base, revision=revision, torch_dtype=torch_dtype)
    names = []
    for i, file in enumerate(files):
        name = f"aligned_{i}"
        load_adapter(pipe, file, name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(s) for s in scales])
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(leave=False)
    return pipe


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images pasted row by row into one picture."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
