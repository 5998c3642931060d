"""The reward-hacking guard of every online objective: a falling guard ends the run with the adapter of its last
evaluation that held (bit-identical to a run stopped there), the CLI says so with exit status 1, its state survives
a checkpoint, and a guard without evaluation images is refused by name."""

import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config import ConfigError
from diffalign.training.guards import TrainingStopped
from diffalign.training.reward_guard import RewardGuard
from diffalign.training.trainer import Trainer, train

# reward backprop's epoch is one update; the rollout objectives' rounds make several (4 samples or 2 pairs, 3 steps
# each, 1-2 items a micro-batch)
SIZES = {"reward_backprop": ["train.batch_size=2"],
         "d3po": ["objective.per_prompt=2", "objective.prompts_per_round=2", "train.batch_size=1",
                  "objective.timestep_fraction=1.0"],
         "ddpo": ["objective.per_prompt=2", "objective.prompts_per_round=2", "train.batch_size=2",
                  "objective.stat_min_count=2", "objective.timestep_fraction=1.0"],
         "grpo": ["objective.group_size=2", "objective.prompts_per_round=2", "train.batch_size=2",
                  "objective.timestep_fraction=1.0"]}


def falling_guard(tmp_path, monkeypatch, module: str) -> str:
    """A guard head that holds at 1.0 for two evaluations, then falls to 0.5."""
    (tmp_path / f"{module}.py").write_text(
        "import torch\ncalls = [0]\n"
        "def head(images, prompts):\n    calls[0] += 1\n"
        "    return torch.full((len(images),), 1.0 if calls[0] <= 2 else 0.5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{module}:head"


@pytest.mark.parametrize("name", ["reward_backprop", "d3po", "ddpo", "grpo"])
def test_a_falling_guard_hands_back_the_adapter_of_its_last_held_evaluation(name, tiny_sd15, online_config,
                                                                            tmp_path, monkeypatch):
    common = [*SIZES[name], "optim.lr=3e-3"]
    guard = falling_guard(tmp_path, monkeypatch, f"falling_{name}")
    guarded = train(online_config(tiny_sd15, name, *common, "train.max_steps=12", f"objective.guard=[{guard}]",
                                  "objective.guard_margin=0.1", out="guarded"))
    # evaluations before rounds (updates) 0, 1 (the last that held) and 2 (fell): the run stops before round 2
    rounds = [h["round"] for h in guarded.history if "round" in h]
    held = 1 if name == "reward_backprop" else next(i for i, h in enumerate(guarded.history) if h.get("round") == 1.0)
    assert rounds == ([] if name == "reward_backprop" else [0.0, 1.0]) and len(guarded.history) < 12
    assert [h[f"eval_guard_{guard}"] for h in guarded.history if f"eval_guard_{guard}" in h] == [1.0, 1.0]
    assert guarded.stopped and "fell from 1 to 0.5" in guarded.stopped and f"at step {held}" in guarded.stopped
    assert guarded.warnings[-1] == guarded.stopped
    card = (guarded.output_dir / "README.md").read_text()  # the card says which adapter it describes, and why
    assert f"for {held} optimizer steps" in card and f"**Stopped early.** {guarded.stopped}." in card
    stopped_there = train(online_config(tiny_sd15, name, *common, f"train.max_steps={held}", out="stopped"))
    assert stopped_there.stopped is None and "Stopped early" not in (stopped_there.output_dir / "README.md").read_text()
    a, b = (load_file(r.adapter) for r in (guarded, stopped_there))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the held adapter, bit for bit


@pytest.mark.parametrize("name", ["reward_backprop", "grpo"])
def test_the_final_adapter_meets_the_guard_too(name, tiny_sd15, online_config, tmp_path, monkeypatch):
    # two rounds (updates): evaluations before each hold, the one after the last step falls
    steps = 2 if name == "reward_backprop" else 4
    common = [*SIZES[name], "optim.lr=3e-3"]
    guard = falling_guard(tmp_path, monkeypatch, f"falling_final_{name}")
    guarded = train(online_config(tiny_sd15, name, *common, f"train.max_steps={steps}", f"objective.guard=[{guard}]",
                                  "objective.guard_margin=0.1", out="guarded"))
    held = steps // 2
    assert guarded.stopped and f"at step {held}" in guarded.stopped and len(guarded.history) == steps
    unguarded = train(online_config(tiny_sd15, name, *common, f"train.max_steps={held}", out="unguarded"))
    assert "eval_reward_brightness" in unguarded.history[-1]  # the final adapter's evaluation, logged with its step
    a, b = (load_file(r.adapter) for r in (guarded, unguarded))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_exits_1_after_a_guard_stop_and_names_the_adapter(tiny_sd15, online_config, tmp_path, monkeypatch,
                                                                    capsys):
    guard = falling_guard(tmp_path, monkeypatch, "falling_cli")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    sets = [f"model.pretrained={tiny_sd15}", "objective.name=reward_backprop", f"data.prompts={prompts}",
            f"data.eval_prompts={prompts}", "objective.reward=[brightness]", "sampling.steps=3", "data.resolution=32",
            f"train.output_dir={tmp_path / 'cli'}", "log.to=none", "lora.rank=4", "train.batch_size=2",
            "train.max_steps=6", "objective.eval_every=1", f"objective.guard=[{guard}]", "objective.guard_margin=0.1"]
    assert main(["train", *[a for s in sets for a in ("--set", s)]]) == 1
    out, err = capsys.readouterr()
    assert "adapter: " in out and "stopped early: reward-hacking guard" in err and "at step 1" in err


def test_the_guard_state_survives_a_checkpoint(tiny_sd15, online_config, tmp_path):
    cfg = online_config(tiny_sd15, "grpo", "objective.guard=[brightness]", "objective.guard_margin=0.1")
    trainer = Trainer(cfg)
    guard, unet = trainer.feed.source.guard, trainer.feed.backbone.unet
    guard.check(torch.rand(3, 3, 32, 32), ["a", "b", "c"], unet, 4)
    guard.save(tmp_path)
    again = RewardGuard(cfg)
    again.restore(tmp_path)
    assert again.baseline == guard.baseline and again.held[0] == 4
    assert again.held[1].keys() == guard.held[1].keys()
    assert all(torch.equal(again.held[1][k], guard.held[1][k]) for k in guard.held[1])


@pytest.mark.parametrize("override", ["objective.eval_every=0", "data.eval_prompts="])
def test_a_guard_without_evaluation_images_is_refused_by_name(override, tiny_sd15, online_config):
    with pytest.raises(ConfigError, match=r"objective.guard=\['clip'\]: a guard is scored on the evaluation images"):
        Trainer(online_config(tiny_sd15, "ddpo", "objective.guard=[clip]", override))


def test_a_guard_on_human_labelled_rollouts_is_refused(tiny_sd15, online_config, tmp_path):
    with pytest.raises(ConfigError, match=r"objective.guard=\['brightness'\]: .* with data.labels"):
        Trainer(online_config(tiny_sd15, "d3po", f"data.labels={tmp_path / 'labels.jsonl'}", "data.prompts=",
                              "objective.guard=[brightness]"))


def test_a_fall_after_resuming_a_baseline_only_checkpoint_writes_no_adapter(tiny_sd15, online_config, tmp_path):
    cfg = online_config(tiny_sd15, "grpo", "objective.guard=[brightness]", "objective.guard_margin=0.1")
    (tmp_path / "guard.json").write_text('{"brightness": 0.9}')  # what reward backprop's checkpoints held before
    guard = RewardGuard(cfg)
    guard.restore(tmp_path)
    with pytest.raises(TrainingStopped, match=r"fell from 0.9 to 0 .* no adapter is written"):
        guard.check(torch.zeros(2, 3, 32, 32), ["a", "b"], None, 3)
