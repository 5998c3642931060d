"""Training that survives: bit-identical resume, stop signals, non-finite steps, half-written checkpoints, a full
disk."""

import errno
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import diffalign.training.checkpoint as ckpt
from diffalign.cli import main
from diffalign.training.checkpoint import OutputDirError
from diffalign.training.guards import TrainingStopped
from diffalign.training.trainer import Trainer, train


def _weights(result):
    return load_file(result.adapter) if result.adapter else None


def _lora(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def test_resume_is_bit_identical(tiny_sd15, make_config, tmp_path):
    opts = ["train.max_steps=5", "train.checkpoint_every=2", "train.grad_accum=2", "data.caption_dropout=0.3",
            "optim.warmup_steps=3"]
    full = train(make_config(tiny_sd15, *opts, out="full"))
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train(make_config(tiny_sd15, *opts, "train.resume=latest", out="resumed"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history[2:]]
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_finishes_the_step_checkpoints_and_resumes(tiny_sd15, make_config, tmp_path, monkeypatch):
    full = train(make_config(tiny_sd15, "train.max_steps=4", out="full"))
    trainer = Trainer(make_config(tiny_sd15, "train.max_steps=4", out="stopped"))
    real = trainer.training_step

    def step(batch, micro_step):
        if micro_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step still completes
        return real(batch, micro_step)

    monkeypatch.setattr(trainer, "training_step", step)
    stopped = trainer.train()
    assert stopped.interrupted and stopped.steps == 2 and stopped.adapter is None
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "stopped")] == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    resumed = train(make_config(tiny_sd15, "train.max_steps=4", "train.resume=latest", out="stopped"))
    assert [h["loss"] for h in stopped.history + resumed.history] == [h["loss"] for h in full.history]
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reports_how_to_resume_after_a_signal(tiny_sd15, tmp_path, pickapic, capsys, monkeypatch):
    import diffalign.training.trainer as trainer_mod

    real = trainer_mod.Trainer.training_step

    def step(self, batch, micro_step):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, micro_step)

    monkeypatch.setattr(trainer_mod.Trainer, "training_step", step)
    code = main(["train", "--set", f"model.pretrained={tiny_sd15}", "--set", f"data.dataset={pickapic}",
                 "--set", "data.resolution=32", "--set", "train.max_steps=3", "--set", "log.to=none",
                 "--set", f"train.output_dir={tmp_path / 'run'}", "--set", f"cache.dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert code == 0 and "interrupted at step 1" in out and "--set train.resume=latest" in out
    assert (tmp_path / "run" / "checkpoint-1").is_dir() and not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def _poison(trainer, monkeypatch, bad_micro_steps):
    real = trainer.feed.loss

    def compute(unet, batch, micro_step):
        loss, metrics = real(unet, batch, micro_step)
        return (loss * float("nan") if micro_step in bad_micro_steps else loss), metrics

    monkeypatch.setattr(trainer.feed, "loss", compute)


def test_a_non_finite_step_is_skipped(tiny_sd15, make_config, monkeypatch):
    trainer = Trainer(make_config(tiny_sd15, "train.max_steps=3"))
    before = _lora(trainer)
    _poison(trainer, monkeypatch, {0})
    steps = []
    real_step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    result = trainer.train()
    assert [h["skipped"] for h in result.history] == [1.0, 0.0, 0.0]
    assert result.steps == 3 and result.adapter.is_file()
    assert len(steps) == 2  # the first update was skipped
    assert any(not torch.equal(before[n], v) for n, v in _lora(trainer).items())


def test_a_nan_gradient_in_the_window_skips_the_whole_update(tiny_sd15, make_config, monkeypatch):
    trainer = Trainer(make_config(tiny_sd15, "train.max_steps=1", "train.grad_accum=2"))
    before = _lora(trainer)
    _poison(trainer, monkeypatch, {1})  # the second micro-step of the only window
    result = trainer.train()
    assert result.history[0]["skipped"] == 1.0
    assert all(torch.equal(before[n], v) for n, v in _lora(trainer).items())


def test_too_many_bad_steps_stop_with_a_checkpoint(tiny_sd15, make_config, tmp_path, monkeypatch):
    trainer = Trainer(make_config(tiny_sd15, "train.max_steps=10", "train.max_bad_steps=3"))
    _poison(trainer, monkeypatch, set(range(100)))
    with pytest.raises(TrainingStopped, match=r"stopped at step 3 after 3 consecutive non-finite steps.*checkpoint-3"):
        trainer.train()
    assert (tmp_path / "run" / "checkpoint-3" / ckpt.STATE).is_file()


def test_half_written_checkpoints_are_ignored_and_rotation_keeps_the_newest_valid(tiny_sd15, make_config, tmp_path):
    train(make_config(tiny_sd15, "train.max_steps=2", "train.checkpoint_every=1"))
    run = tmp_path / "run"
    # a process killed while writing checkpoint 3 (temporary folder) or while renaming checkpoint 4 (no state file)
    shutil.copytree(run / "checkpoint-2", run / ".checkpoint-3.tmp")
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-4")
    (run / "checkpoint-4" / ckpt.STATE).unlink()
    assert ckpt.find_resume(run, "latest") == run / "checkpoint-2"
    ckpt.rotate(run, keep=1)
    assert (run / "checkpoint-2").is_dir() and not (run / "checkpoint-1").exists()
    resumed = train(make_config(tiny_sd15, "train.max_steps=3", "train.resume=latest"))
    assert resumed.steps == 3 and len(resumed.history) == 1


def test_a_full_disk_while_checkpointing_leaves_nothing_half_written(tiny_sd15, make_config, tmp_path, monkeypatch):
    calls = []

    def full_disk(path, tensors, *a, **k):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = Trainer(make_config(tiny_sd15, "train.max_steps=2", "train.checkpoint_every=1"))
    monkeypatch.setattr(ckpt, "atomic_save_safetensors", full_disk)
    with pytest.raises(OutputDirError, match="cannot write checkpoint .*checkpoint-1: No space left on device"):
        trainer.train()
    assert calls and not [p for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name]


KILLED_MID_WRITE = """
import os, signal, sys
import diffalign.training.checkpoint as ckpt
from diffalign.config import load_config
from diffalign.training.trainer import train

real = ckpt._write_checkpoint
def write(tmp, *args):
    if tmp.name == ".checkpoint-2.tmp":
        (tmp).mkdir(parents=True)
        (tmp / "lora.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)  # the real thing: no handler, no cleanup
    return real(tmp, *args)
ckpt._write_checkpoint = write
train(load_config(sys.argv[1]))
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_sd15, make_config, tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(make_config(tiny_sd15, "train.max_steps=3", "train.checkpoint_every=1").to_yaml())
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(recipe)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / ".checkpoint-2.tmp").is_dir() and ckpt.find_resume(run, "latest") == run / "checkpoint-1"
    resumed = train(make_config(tiny_sd15, "train.max_steps=3", "train.checkpoint_every=1", "train.resume=latest"))
    assert resumed.steps == 3 and len(resumed.history) == 2
    assert not (run / ".checkpoint-2.tmp").exists()  # cleared by the next write of checkpoint 2
