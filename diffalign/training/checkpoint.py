"""Resumable checkpoints written as safetensors + JSON (no pickle), into a temporary folder renamed into place.

A checkpoint holds the LoRA weights, the optimizer state (tensors in safetensors, structure in JSON), the LR
schedule, the gradient scaler, the torch RNG states, the trainer's position (step, epoch, batch), the LoRA's
shape (rank, alpha, targets), the metrics of every step so far (``history.json``) and the versions of the software
that wrote it (so that a resume on another install can say so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import ConfigError
from ..environment import package_versions
from ..files import atomic_save_safetensors, atomic_write_text

PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.json"


class OutputDirError(OSError):
    """``train.output_dir`` cannot be written (permissions, disk full)."""


def check_writable(path: Path) -> None:
    """Fail early, without creating anything, when ``path`` cannot be created or written."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"train.output_dir={str(path)!r} is not writable ({probe} is not a writable folder)")


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, structure = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        structure["state"][str(idx)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
                structure["state"][str(idx)][name] = "tensor"
            else:
                structure["state"][str(idx)][name] = value
    return tensors, structure


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state = {}
    for idx, entry in structure["state"].items():
        state[int(idx)] = {name: tensors[f"{idx}.{name}"] if value == "tensor" else value
                           for name, value in entry.items()}
    return {"state": state, "param_groups": structure["param_groups"]}


def save_checkpoint(folder: Path, lora: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
                    position: dict, extra=None) -> Path:
    """Write ``folder`` atomically: everything goes to ``.folder.tmp`` first, then one rename. ``extra(tmp)``
    may write more files (D3PO: the current round's rollouts)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, lora, optimizer, lr_scheduler, scaler, position, extra)
    except OSError as e:  # disk full, permissions: the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputDirError(f"cannot write checkpoint {folder}: {e.strerror or e}; earlier checkpoints are "
                             "intact") from None
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _write_checkpoint(tmp: Path, lora, optimizer, lr_scheduler, scaler, position: dict, extra) -> None:
    tmp.mkdir(parents=True)
    atomic_save_safetensors(tmp / "lora.safetensors", lora)
    opt_tensors, opt_structure = _flatten_optimizer(optimizer.state_dict())
    atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    atomic_save_safetensors(tmp / "rng.safetensors", rng)
    state = {"position": position, "optimizer": opt_structure, "lr_scheduler": lr_scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "environment": package_versions()}
    if extra is not None:
        extra(tmp)
    atomic_write_text(tmp / STATE, json.dumps(state, indent=1, default=_jsonable))  # last: marks the folder complete


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def load_checkpoint(folder: Path, optimizer, lr_scheduler, scaler) -> tuple[dict[str, torch.Tensor], dict,
                                                                          dict[str, str] | None]:
    """Restore optimizer, schedule, scaler and RNG from ``folder``; return ``(lora weights, position, environment)``,
    the environment being the versions that wrote it (None for a checkpoint older than that record)."""
    state = json.loads((folder / STATE).read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")),
                                                   state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return load_file(str(folder / "lora.safetensors")), state["position"], state.get("environment")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (half-written ``.tmp`` folders are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := PATTERN.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def find_resume(output_dir: Path, resume: str) -> Path:
    """The folder ``train.resume`` names: ``latest`` or an explicit checkpoint path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"train.resume=latest: no checkpoint in {output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE).is_file():
        raise ConfigError(f"train.resume={resume!r}: not a checkpoint folder (no {STATE})")
    return path


def rotate(output_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep``; the newest is never deleted."""
    for old in list_checkpoints(output_dir)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


class OutputLock:
    """An exclusive lock on ``train.output_dir`` while a run writes there, so two runs into one folder cannot both
    write (``flock`` on ``.diffalign.lock``; released when the run ends or its process dies)."""

    NAME = ".diffalign.lock"

    def __init__(self, folder: Path):
        self.path, self._file = Path(folder) / self.NAME, None

    def __enter__(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # not on this platform: no lock
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise OutputDirError(f"train.output_dir={str(self.path.parent)!r}: another run (pid {holder}) is writing "
                                 "there; wait for it to finish or choose another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def previous_run(output_dir: Path) -> list[Path]:
    """What an earlier run left in ``output_dir``: its adapter and checkpoints (complete or half-written)."""
    from ..lora import WEIGHT_NAME

    if not output_dir.is_dir():
        return []
    found = [output_dir / WEIGHT_NAME] if (output_dir / WEIGHT_NAME).is_file() else []
    return found + sorted(p for p in output_dir.iterdir() if p.is_dir() and PATTERN.match(p.name.strip(".").removesuffix(".tmp")))


def clear_previous_run(output_dir: Path) -> None:
    """Delete an earlier run's adapter and checkpoints (``train.overwrite=true``)."""
    for path in previous_run(output_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


HISTORY = "history.json"


def load_history(folder: Path, step: int) -> list[dict]:
    """The metrics of steps 1..``step`` stored in a checkpoint (empty for checkpoints written before they were)."""
    path = folder / HISTORY
    if not path.is_file():
        return []
    return [h for h in json.loads(path.read_text()) if h.get("step", 0) <= step]


def check_lora_shape(folder: Path, position: dict, weights: dict[str, torch.Tensor], lora) -> None:
    """One clear line, instead of a page of size mismatches, when the config's LoRA is not the checkpoint's."""
    saved = position.get("lora") or {}
    ranks = {w.shape[0] for k, w in weights.items() if "lora_A" in k}
    rank = saved.get("rank", next(iter(ranks)) if len(ranks) == 1 else None)
    alpha = saved.get("alpha", lora.alpha)
    targets = saved.get("targets", list(lora.targets))
    if rank != lora.rank or alpha != lora.alpha or sorted(targets) != sorted(lora.targets):
        raise ConfigError(f"train.resume: {folder} holds a LoRA of rank {rank}, alpha {alpha}, targets {targets}, "
                          f"but the config asks for lora.rank={lora.rank}, lora.alpha={lora.alpha}, "
                          f"lora.targets={list(lora.targets)}; resume with the checkpoint's lora settings")


def install_changes(then: dict[str, str] | None) -> str | None:
    """What differs between the install that wrote a checkpoint (``then``, its recorded versions) and this one
    (``"torch 2.13.0 -> 2.14.1"``), or None when nothing does or the checkpoint is older than the record."""
    if not then:
        return None
    now = package_versions()
    changed = [f"{name} {then.get(name, 'not recorded')} -> {now.get(name, 'not installed')}"
               for name in sorted(set(then) | set(now)) if then.get(name) != now.get(name)]
    return ", ".join(changed) or None
