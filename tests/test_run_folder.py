"""What a run leaves in its folder and how it treats one: readable files, no silent overwrite, one writer at a
time, a history that survives resumes, clear refusals."""

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import diffalign.training.checkpoint as ckpt
from diffalign.config import ConfigError
from diffalign.sampling.settings import Sampling
from diffalign.training.checkpoint import OutputDirError
from diffalign.training.trainer import Trainer, train


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_honour_the_umask(tiny_sd15, make_config, tmp_path):
    from diffalign.evaluation.evaluate import evaluate
    from diffalign.rewards import load_reward

    old = os.umask(0o022)
    try:
        result = train(make_config(tiny_sd15, "train.max_steps=2", "train.checkpoint_every=1"))
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red square\n")
        evaluate(str(tiny_sd15), [result.output_dir], prompts, {"brightness": load_reward("brightness")},
                 tmp_path / "eval", seeds=1, sampling=Sampling(steps=2, height=32, width=32, seed_policy="shared"))
    finally:
        os.umask(old)
    out = result.output_dir
    written = [out / "pytorch_lora_weights.safetensors", out / "config.yaml", out / "README.md", out / "metrics.json",
               out / "environment.json",
               out / "checkpoint-2" / "lora.safetensors", tmp_path / "eval" / "report.json",
               tmp_path / "eval" / "report.html"]
    for path in written:
        assert _mode(path) == 0o644, (path, oct(_mode(path)))
    assert _mode(out / "checkpoint-2") == 0o755


def test_the_run_names_the_software_it_was_made_with(tiny_sd15, make_config):
    import diffusers
    import peft
    import torch

    out = train(make_config(tiny_sd15, "train.max_steps=1")).output_dir
    versions = json.loads((out / "environment.json").read_text())
    assert torch.__version__.split("+")[0] == versions["torch"].split("+")[0]  # the wheel may carry +cu130 or not
    assert (versions["diffusers"], versions["peft"]) == (diffusers.__version__, peft.__version__)
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "not installed" not in (versions["diffalign"], versions["pillow"], versions["transformers"])


def test_a_finished_run_is_not_overwritten_silently(tiny_sd15, make_config):
    first = train(make_config(tiny_sd15, "train.max_steps=1"))
    with pytest.raises(OutputDirError, match="already holds a run .*train.resume=latest.*train.overwrite=true"):
        Trainer(make_config(tiny_sd15, "train.max_steps=1"))
    (first.output_dir / "checkpoint-7").mkdir()  # a stale checkpoint of the old run
    again = train(make_config(tiny_sd15, "train.max_steps=1", "train.overwrite=true"))
    assert again.adapter.is_file() and not (first.output_dir / "checkpoint-7").exists()


def test_two_runs_cannot_write_into_one_folder_at_once(tiny_sd15, make_config, tmp_path):
    with ckpt.OutputLock(tmp_path / "run"):  # as if another process were training there
        with pytest.raises(OutputDirError, match=rf"another run \(pid {os.getpid()}\) is writing there"):
            train(make_config(tiny_sd15, "train.max_steps=1"))
    assert train(make_config(tiny_sd15, "train.max_steps=1")).steps == 1  # released


def test_history_continues_across_a_resume(tiny_sd15, make_config, tmp_path, caplog):
    opts = ["train.max_steps=4", "train.checkpoint_every=2"]
    full = train(make_config(tiny_sd15, *opts, out="full"))
    stopped = train(make_config(tiny_sd15, "train.max_steps=2", "train.checkpoint_every=2", out="resumed"))
    assert stopped.steps == 2
    (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").unlink()  # as if interrupted after the checkpoint
    with caplog.at_level(logging.INFO, logger="diffalign.training.trainer"):
        resumed = train(make_config(tiny_sd15, *opts, "train.resume=latest", out="resumed"))
    assert "trained 2 step(s) (3 to 4)" in caplog.text
    assert [h["step"] for h in resumed.history] == [3, 4]
    saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [h["step"] for h in saved] == [1, 2, 3, 4]
    assert [h["loss"] for h in saved] == [h["loss"] for h in full.history]


def test_a_resume_on_another_install_says_what_changed(tiny_sd15, make_config, monkeypatch):
    train(make_config(tiny_sd15, "train.max_steps=1", "train.checkpoint_every=1"))
    same = train(make_config(tiny_sd15, "train.max_steps=2", "train.checkpoint_every=1", "train.resume=latest"))
    assert not [w for w in same.warnings if "another install" in w]
    real = ckpt.package_versions()
    monkeypatch.setattr(ckpt, "package_versions", lambda: {**real, "torch": "9.9.9", "numpy": "0.1"})
    moved = train(make_config(tiny_sd15, "train.max_steps=3", "train.resume=latest"))
    assert moved.steps == 3  # it warns, and trains on
    [warning] = [w for w in moved.warnings if "another install" in w]
    assert "checkpoint-2 was written by another install" in warning and "\n" not in warning
    assert f"numpy {real['numpy']} -> 0.1, torch {real['torch']} -> 9.9.9);" in warning


def test_resume_with_another_lora_shape_is_one_line(tiny_sd15, make_config):
    train(make_config(tiny_sd15, "train.max_steps=1", "train.checkpoint_every=1"))
    with pytest.raises(ConfigError, match=r"holds a LoRA of rank 4, alpha None.*asks for lora.rank=8") as info:
        train(make_config(tiny_sd15, "train.max_steps=2", "lora.rank=8", "train.resume=latest"))
    assert "\n" not in str(info.value)


def test_a_rank_wider_than_a_layer_is_warned_about(tiny_sd15, make_config, caplog):
    with caplog.at_level(logging.WARNING, logger="diffalign.lora"):
        Trainer(make_config(tiny_sd15, "lora.rank=48"))  # the tiny UNet's attention layers are 32 and 64 wide
    assert "lora.rank=48 is larger than the width of" in caplog.text and "min(in, out) = 32" in caplog.text


SLOW_STEP = """
import os, signal, sys, time
from diffalign.config import load_config
from diffalign.training.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1]))
real = trainer.training_step
def step(batch, micro_step):
    if micro_step == 1:
        os.kill(os.getpid(), signal.SIGINT)  # the first stop request
        print("requested", flush=True)
        time.sleep(120)  # a very long step: the second signal must not wait for it
    return real(batch, micro_step)
trainer.training_step = step
trainer.train()
"""


def test_a_second_signal_aborts_at_once_and_the_last_checkpoint_stays(tiny_sd15, make_config, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(make_config(tiny_sd15, "train.max_steps=3", "train.checkpoint_every=1").to_yaml())
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEP, str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert proc.stdout.readline().strip() == "requested"
        start = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT and time.time() - start < 10, proc.stderr.read()[-2000:]
    assert ckpt.find_resume(tmp_path / "run", "latest") == tmp_path / "run" / "checkpoint-1"
