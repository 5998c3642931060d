"""Watching a run: held-out pair statistics during training, and warnings when a run looks degenerate.

What tells that alignment works (measured on the testbed benchmark, see the README's "Watching a run"): the
implicit accuracy on *held-out* pairs (``data.eval_pairs``), not on the training pairs, which any run drives to 1
by memorising them; the policy's drift from the reference says how far the adapter has moved.

Warnings, each logged once per run (and kept in ``TrainResult.warnings``):

- **overfitting**: the training pairs' implicit accuracy at ≥ 0.97 with the loss under a tenth of its start, while
  the held-out pairs' accuracy is below 0.6 (or, without held-out pairs, the collapse alone, with the advice to
  add some);
- **margin running away**: the objective's mean training margin past 10, where ``-logsigmoid`` is flat
  (< 5e-5), with the training loss collapsed as above (implicit accuracy ≥ 0.97, loss under a tenth of its start):
  the pairs no longer teach anything and the policy keeps moving. A mean margin past 10 alone is not enough: with
  ε errors and a large β (the shipped testbed DPO recipe) the margins spread wide, and a mean of 14-90 comes with
  pairs still on the wrong side and a loss far from flat;
- **held-out accuracy falling**: 0.15 or more below its best earlier measurement: the run is past its best step;
- **per-prompt statistics inactive** (DDPO): under half of the last 10 rounds' advantages were normalised by their
  own prompt's rewards; the rest were normalised over the whole round, where differences between prompts pass for
  differences between samples.
"""

from __future__ import annotations

import logging
import math
from collections import deque

from ..config import Config
from ..data.dataset import RawPairDataset
from ..data.readers import load_pairs
from ..evaluation.metrics import encode_pairs, pair_statistics

log = logging.getLogger(__name__)

WINDOW = 10  # training steps averaged before judging the training pairs (DDPO: rounds, for the per-prompt share)
COLLAPSED_ACC, COLLAPSED_LOSS, HELD_OUT_LOW = 0.97, 0.1, 0.6
RUNAWAY_MARGIN, HELD_OUT_FALL = 10.0, 0.15
PER_PROMPT_LOW = 0.5  # DDPO: the least share of advantages normalised per prompt before a warning


class HeldOutPairs:
    """``data.eval_pairs`` encoded once (while the encoders are loaded) and measured with the UNet alone."""

    def __init__(self, cfg: Config, backbone, resolution: int, device) -> None:
        source = load_pairs(type(cfg.data)(dataset=cfg.data.eval_pairs, split=cfg.data.split))
        raw = RawPairDataset(source, resolution, cfg.train.seed, random_flip=False, center_crop=True)
        raw.drop_bad_rows("skip")
        for enc in backbone.text_encoders:
            enc.to(device)
        backbone.vae.to(device)
        self.encoded = encode_pairs(backbone, raw)
        self.backbone, self.resolution, self.device = backbone, resolution, device
        self.space = cfg.train.error_space  # measured on the errors the run trains on
        log.info("held-out pairs: %d from %s, measured every train.heldout_every steps", len(raw), cfg.data.eval_pairs)

    def measure(self, unet) -> dict[str, float]:
        """``heldout_*`` metrics of the adapter now: implicit and ranking accuracy, margin, drift."""
        was_training = unet.training
        unet.eval()
        try:
            stats = pair_statistics(self.backbone, self.encoded, self.resolution, device=self.device, unet=unet,
                                    space=self.space)
        finally:
            unet.train(was_training)
        return {"heldout_implicit_acc": stats["implicit_accuracy"], "heldout_ranking_acc": stats["ranking_accuracy"],
                "heldout_margin": stats["margin"], "heldout_winner_gain": stats["winner_gain"],
                "heldout_drift": stats["drift"], "heldout_loss": stats["loss"]}


class RunWatcher:
    """Reads each step's logged metrics and returns the warnings (each kind once) a run has earned so far."""

    def __init__(self) -> None:
        self.recent: deque[dict] = deque(maxlen=WINDOW)
        self.first_loss: float | None = None
        self.best_held_out: tuple[float, int] | None = None
        self.last_held_out: float | None = None
        self.per_prompt_shares: deque[float] = deque(maxlen=WINDOW)  # one per round (DDPO)
        self.warned: set[str] = set()
        self.warnings: list[str] = []

    def update(self, logged: dict) -> list[str]:
        """Judge one optimizer step (``logged`` has ``step``, ``loss`` and whatever the objective logs); the new
        warnings, also logged."""
        new = []
        step = int(logged["step"])
        if self.first_loss is None and math.isfinite(logged["loss"]):
            self.first_loss = float(logged["loss"])
        self.recent.append(logged)
        if "heldout_implicit_acc" in logged:
            acc = float(logged["heldout_implicit_acc"])
            self.last_held_out = acc
            if self.best_held_out is None or acc > self.best_held_out[0]:
                self.best_held_out = (acc, step)
            elif self.best_held_out[0] - acc >= HELD_OUT_FALL:
                new += self.warn("falling", f"step {step}: held-out implicit accuracy fell from "
                                  f"{self.best_held_out[0]:.2f} (step {self.best_held_out[1]}) to {acc:.2f}; the run is "
                                  f"past its best: fewer steps (train.max_steps={self.best_held_out[1]}) or a lower "
                                  "optim.lr would do better")
        full = len(self.recent) == WINDOW
        collapsed = False
        if full and all("implicit_acc" in m for m in self.recent) and self.first_loss:
            acc = sum(m["implicit_acc"] for m in self.recent) / WINDOW
            loss = sum(m["loss"] for m in self.recent) / WINDOW
            collapsed = acc >= COLLAPSED_ACC and loss <= COLLAPSED_LOSS * abs(self.first_loss)
            if collapsed:
                where = (f"training pairs at implicit accuracy {acc:.2f} and loss {loss:.4f} (from {self.first_loss:.4f})")
                if self.last_held_out is None:
                    new += self.warn("collapsed", f"step {step}: {where}: the loss has collapsed; with no held-out "
                                      "pairs (data.eval_pairs) nothing tells memorising the training pairs from "
                                      "learning the preference")
                elif self.last_held_out < HELD_OUT_LOW:
                    new += self.warn("overfitting", f"step {step}: overfitting: {where}, but held-out pairs at "
                                      f"{self.last_held_out:.2f}; lower optim.lr or train.max_steps, or use more pairs")
        if collapsed and all("margin" in m for m in self.recent):
            margin = sum(m["margin"] for m in self.recent) / WINDOW
            if margin > RUNAWAY_MARGIN:
                new += self.warn("margin", f"step {step}: the training margin is running away ({margin:.1f} > "
                                  f"{RUNAWAY_MARGIN:.0f}, where the loss is flat): the policy keeps moving from the "
                                  "reference with nothing left to learn; lower optim.lr or objective.beta")
        if "per_prompt_share" in logged:
            self.per_prompt_shares.append(float(logged["per_prompt_share"]))
            full_rounds = len(self.per_prompt_shares) == WINDOW
            if full_rounds and (share := sum(self.per_prompt_shares) / WINDOW) < PER_PROMPT_LOW:
                new += self.warn("per_prompt", f"step {step}: only {share:.0%} of the last {WINDOW} rounds' "
                                  "advantages were normalised by their own prompt's rewards: each prompt is drawn too "
                                  "rarely to gather objective.stat_min_count of them, so the rest were normalised over "
                                  "the whole round, where differences between prompts pass for differences between "
                                  "samples; lower objective.stat_min_count (to objective.per_prompt: each prompt's own "
                                  "round) or train on fewer prompts")
        return new

    def warn(self, kind: str, message: str) -> list[str]:
        """Log ``message`` and keep it in :attr:`warnings`, once per ``kind``; the new warnings."""
        if kind in self.warned:
            return []
        self.warned.add(kind)
        self.warnings.append(message)
        log.warning("%s", message)
        return [message]
