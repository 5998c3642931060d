"""InPO (Lu et al., CVPR 2025, arXiv 2503.18454): Diffusion-DPO on DDIM-inverted latents.

Each latent z is inverted (DDIM, no CFG, conditional on c) exactly to the pair's level t, giving x̃_t and the
target ε̃ = (x̃_t - √ā_t z) / √(1-ā_t), different for winner and loser; the loss is Diffusion-DPO's with the errors
measured against ε̃ at (x̃_t, t). The trainer does the inversion (``noising = "ddim_inversion"``); the loss is
:func:`~diffalign.objectives.dpo.dpo_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, check_choice, check_positive, option
from .dpo import DPO, DPOOptions


@dataclass
class InversionOptions:
    """How InPO and SmPO invert a clean latent to its noise level t (the trainer's pairs feed does it)."""

    inversion_steps: int = option(10, "Inversion grid steps; the grid to t has spacing <= T/inversion_steps.")
    inversion_model: str = option("policy", "Invert with the policy (the official codes) or the reference (adapters "
                                            "off).")
    inversion_cache: bool = option(
        False, "Cache each latent's reference inversion at the shared grid levels once; every step then runs one "
               "live inversion step instead of ~t/100. Needs inversion_model=reference, data.caption_dropout=0 and "
               "cache.enabled.")

    def __post_init__(self) -> None:
        check_positive("objective", "inversion_steps", self.inversion_steps)
        check_choice("objective", "inversion_model", self.inversion_model, ("policy", "reference"))
        if self.inversion_cache and self.inversion_model != "reference":
            raise ConfigError(f"objective.inversion_cache=true needs objective.inversion_model='reference' (got "
                              f"{self.inversion_model!r})", ("objective.inversion_cache", "objective.inversion_model"))


@dataclass
class InPOOptions(InversionOptions, DPOOptions):
    def __post_init__(self) -> None:
        DPOOptions.__post_init__(self)
        InversionOptions.__post_init__(self)


class InPO(DPO):
    """Diffusion-DPO with DDIM inversion instead of forward noising (β 5000 for SDXL; the SD1.5 recipe uses 2000)."""

    Options = InPOOptions
    noising = "ddim_inversion"
