"""Preference objectives, one module each; :func:`diffalign.registry.build_objective` picks one by name."""

from .base import Objective, PairErrors
from .dpo import DPO, dpo_loss
from .inpo import InPO
from .mapo import MaPO, mapo_loss
from .smpo import SmPO, smpo_loss

__all__ = ["DPO", "InPO", "MaPO", "Objective", "PairErrors", "SmPO", "dpo_loss", "mapo_loss", "smpo_loss"]
