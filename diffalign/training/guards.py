"""What keeps a run alive or stops it cleanly: stop signals, non-finite steps, agreement across processes."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); a checkpoint was written first."""


class StopSignals:
    """While active, SIGINT and SIGTERM only set :attr:`requested`, so the loop can finish its step, write a
    checkpoint and exit cleanly. A second signal aborts at once: after the first, both go back to the operating
    system's default action, which ends the process even inside a long UNet call (a Python-level handler would only
    run once that call returns). Checkpoints are written to a temporary folder and renamed, so the last complete
    one stays valid. Handlers are restored on exit; outside the main thread (where Python forbids handlers) this
    does nothing."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)
        log.warning("%s received: finishing this step, then writing a checkpoint (send it again to abort at once; "
                    "the last checkpoint stays valid)", self.requested)

    def __enter__(self) -> StopSignals:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def grads_finite(params: Iterable[torch.Tensor]) -> bool:
    """True when every gradient is finite (missing gradients count as finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def any_process(accelerator, flag: bool) -> bool:
    """``flag`` OR-ed over all processes, so every rank takes the same branch (skip or update, stop or go)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def zero_loss(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """A loss of exactly 0 connected to every parameter: stands in for a non-finite loss so that backward (and
    the gradient all-reduce of the other processes) still happens, with zero gradients."""
    return sum((p * 0).sum() for p in params)
