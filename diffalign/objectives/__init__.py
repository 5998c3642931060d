"""Preference objectives, one module each; :func:`diffalign.registry.build_objective` picks one by name."""

from .base import Objective, PairErrors
from .dpo import DPO, dpo_loss
from .mapo import MaPO, mapo_loss

__all__ = ["DPO", "MaPO", "Objective", "PairErrors", "dpo_loss", "mapo_loss"]
