"""diffalign: align text-to-image diffusion models with human preferences as LoRA adapters."""

__version__ = "0.1.0"
