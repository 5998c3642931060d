"""Preference objectives, one module each; :func:`diffalign.registry.build_objective` picks one by name."""

from .base import Objective, PairErrors
from .dpo import DPO, dpo_loss

__all__ = ["DPO", "Objective", "PairErrors", "dpo_loss"]
