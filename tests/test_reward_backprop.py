"""Reward backprop (DRaFT-K / AlignProp): the loss by hand, non-differentiable heads refused by name, gradients
through the last K steps and the VAE only, every LoRA tensor moving, resume, and the testbed rewards'
straight-through gradients."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import ConfigError
from diffalign.objectives.reward_backprop import reward_backprop_loss
from diffalign.training.trainer import Trainer, train


def test_loss_by_hand():
    rewards = torch.tensor([[0.5, 2.0], [1.5, -1.0]])
    loss, m = reward_backprop_loss(rewards, [1.0, 0.5])
    assert loss.item() == pytest.approx(-((0.5 + 1.0) + (1.5 - 0.5)) / 2) and m["reward"] == pytest.approx(1.25)


@pytest.fixture
def rb_config(online_config):
    def make(model, *overrides, out="run"):
        return online_config(model, "reward_backprop", "train.batch_size=2", "train.max_steps=3", "optim.lr=3e-3",
                             *overrides, out=out)

    return make


def _lora(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def test_a_head_without_gradients_is_refused_by_name(tiny_sd15, rb_config):
    with pytest.raises(ConfigError, match=r"objective.reward: head 'jpeg_compressibility' is not differentiable"):
        Trainer(rb_config(tiny_sd15, "objective.reward=[brightness, jpeg_compressibility]"))


@pytest.mark.parametrize("k", [1, 2])
def test_only_the_last_k_steps_and_the_decode_carry_gradients(k, tiny_sd15, rb_config, monkeypatch):
    trainer = Trainer(rb_config(tiny_sd15, f"objective.backprop_steps={k}", "objective.eval_every=0"))
    feed, calls = trainer.feed, []
    real = feed.backbone.predict

    def counting(*a, **kw):
        calls.append(torch.is_grad_enabled())
        return real(*a, **kw)

    monkeypatch.setattr(feed.backbone, "predict", counting)
    batch = feed.batches(0)[0]
    loss, metrics = feed.loss(trainer.unet, batch, 0)
    assert calls == [False] * (3 - k) + [True] * k and metrics["backprop_steps"] == k  # one CFG call per step
    loss.backward()
    grads = [p.grad for n, p in trainer.accelerator.unwrap_model(trainer.unet).named_parameters() if "lora_B" in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_alignprop_draws_k_per_micro_batch(tiny_sd15, rb_config):
    trainer = Trainer(rb_config(tiny_sd15, "objective.backprop_steps=1", "objective.backprop_steps_max=3"))
    ks = {trainer.feed.objective.steps_with_gradient(torch.Generator().manual_seed(s)) for s in range(40)}
    assert ks == {1, 2, 3}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_short_run_moves_every_lora_tensor(kind, request, rb_config):
    trainer = Trainer(rb_config(request.getfixturevalue(f"tiny_{kind}")))
    before = _lora(trainer)
    result = trainer.train()
    after = _lora(trainer)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{len(unchanged)} LoRA tensors did not move, e.g. {unchanged[:3]}"
    assert {"reward_brightness", "eval_reward_brightness", "backprop_steps"} <= result.history[0].keys()
    assert result.adapter.is_file()


def test_resume_reproduces_the_run(tiny_sd15, rb_config, tmp_path):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.grad_accum=2"]
    full = train(rb_config(tiny_sd15, *common, out="full"))
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train(rb_config(tiny_sd15, *common, "train.resume=latest", out="resumed"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_testbed_rewards_keep_their_values_and_gain_a_gradient():
    from diffalign import testbed as tb
    from diffalign.evaluation.scoring import to_tensor
    from diffalign.testbed import Scene, render

    images = to_tensor([render(Scene("circle", "red", "gray", half_size=h)) for h in (6.0, 10.0)])
    for head, hard in ((tb.ShapeSize(), lambda x: tb.shape_masks(x)[1].float().mean(dim=(1, 2))), (tb.Vividness(), None)):
        x = images.clone().requires_grad_(True)
        value = head(x, ["a red circle on a gray background"] * 2)
        if hard is not None:
            assert torch.equal(value, hard(images))
        value.sum().backward()
        assert head.differentiable and x.grad.abs().sum() > 0
