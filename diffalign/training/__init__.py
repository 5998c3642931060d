"""Training: the one loop (:mod:`.trainer`), the feeds it holds (:mod:`.feeds`: :mod:`.pairs`, :mod:`.rollouts`),
the noising and log-probability arithmetic the objectives need (:mod:`.noising`, :mod:`.logprob`), checkpoints,
guards and optimizers. ``from diffalign.training import train`` runs a config."""

from __future__ import annotations


def __getattr__(name: str):
    # lazy, so that importing the arithmetic modules does not import the trainer (and accelerate) as well
    if name in ("train", "Trainer", "TrainResult"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainResult", "Trainer", "train"]
