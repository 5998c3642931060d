"""Preference objectives, one module each; :func:`diffalign.registry.build_objective` picks one by name."""

from .base import Objective, PairErrors, StepLogProbs
from .dpo import DPO, dpo_loss
from .inpo import InPO
from .mapo import MaPO, mapo_loss
from .smpo import SmPO, smpo_loss

__all__ = ["DPO", "InPO", "MaPO", "Objective", "PairErrors", "SmPO", "StepLogProbs", "dpo_loss", "mapo_loss", "smpo_loss"]
