"""InPO (Lu et al., CVPR 2025, arXiv 2503.18454): Diffusion-DPO on DDIM-inverted latents.

Each latent z is inverted (DDIM, no CFG, conditional on c) exactly to the pair's level t, giving x̃_t and the
target ε̃ = (x̃_t - √ā_t z) / √(1-ā_t), different for winner and loser; the loss is Diffusion-DPO's with the errors
measured against ε̃ at (x̃_t, t). The trainer does the inversion (``noising = "ddim_inversion"``); the loss is
:func:`~diffalign.objectives.dpo.dpo_loss`.
"""

from __future__ import annotations

from .dpo import DPO


class InPO(DPO):
    """Diffusion-DPO with DDIM inversion instead of forward noising (β 5000 for SDXL; the SD1.5 recipe uses 2000)."""

    noising = "ddim_inversion"
