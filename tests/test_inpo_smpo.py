"""InPO and SmPO: losses by hand, soft labels, and the trainer's inversion path."""

import math

import pytest
import torch

from diffalign.config import ObjectiveConfig
from diffalign.data.errors import DataError
from diffalign.objectives.base import PairErrors
from diffalign.objectives.dpo import dpo_loss
from diffalign.objectives.inpo import InPO
from diffalign.objectives.smpo import smpo_loss
from diffalign.registry import build_objective
from diffalign.training.trainer import Trainer


def test_smpo_loss_matches_hand_computation():
    e_w, e_l = torch.tensor([0.10, 0.20]), torch.tensor([0.12, 0.18])
    r = torch.tensor([0.11, 0.20])
    n_w, n_l = torch.tensor([0.9, 0.3]), torch.tensor([0.1, 0.5])  # pair 2: the reward prefers the "loser"
    loss, metrics = smpo_loss(e_w, e_l, r, r, n_w, n_l, beta=10.0, gamma=10.0)
    # pair 1: p = sigmoid(0.8); h = (0 - (-0.02)) = 0.02; inside = (b·g·(2p-1)/2)·h
    p1 = 1 / (1 + math.exp(-0.8))
    in1 = 0.5 * 100 * (2 * p1 - 1) * 0.02
    # pair 2 is swapped: winner errors 0.18 (policy) / 0.20 (ref), loser 0.20 / 0.20 -> h = 0 - (0.18 - 0.20) = 0.02
    p2 = 1 / (1 + math.exp(-0.2))
    in2 = 0.5 * 100 * (2 * p2 - 1) * 0.02
    expected = (math.log1p(math.exp(-in1)) + math.log1p(math.exp(-in2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["swapped"] == 0.5 and metrics["implicit_acc"] == 1.0
    assert metrics["soft_label"] == pytest.approx((p1 + p2) / 2, rel=1e-6)


def test_smpo_equal_scores_give_zero_gradient():
    w, l = torch.tensor([0.3, 0.1], requires_grad=True), torch.tensor([0.2, 0.4], requires_grad=True)
    s = torch.tensor([0.5, 0.7])
    loss, _ = smpo_loss(w, l, torch.tensor([0.25, 0.2]), torch.tensor([0.2, 0.3]), s, s)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.equal(w.grad, torch.zeros(2)) and torch.equal(l.grad, torch.zeros(2))


def test_inpo_is_dpo_on_inverted_errors():
    obj = build_objective(ObjectiveConfig(name="inpo", beta=2000.0))
    assert isinstance(obj, InPO) and obj.noising == "ddim_inversion" and obj.needs_reference
    e = [torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.1]), torch.tensor([0.15, 0.2]), torch.tensor([0.1, 0.2])]
    assert obj(PairErrors(*e))[0].item() == pytest.approx(dpo_loss(*e, beta=2000.0)[0].item())
    smpo = build_objective(ObjectiveConfig(name="smpo"))
    assert (smpo.noising, smpo.data, smpo.beta, smpo.gamma) == ("renoise", "soft_pairs", 5000.0, 10.0)


def test_smpo_without_scores_says_what_to_add(tiny_sd15, make_config):
    with pytest.raises(DataError, match=r"row \d+: no reward scores.*score_0/score_1.*chosen_score/rejected_score"):
        Trainer(make_config(tiny_sd15, "objective.name=smpo"))


def test_smpo_normalises_scores_on_the_training_set(tiny_sd15, make_config, scored_pickapic):
    trainer = Trainer(make_config(tiny_sd15, "objective.name=smpo", f"data.dataset={scored_pickapic}"))
    from diffalign.data.readers import load_pairs

    scores = torch.tensor(load_pairs(trainer.cfg.data).score_pairs())
    assert trainer.feed.score_range == pytest.approx((scores.min().item(), scores.max().item()))
    batch = next(iter(torch.utils.data.DataLoader(trainer.feed.dataset, batch_size=4)))
    assert "scores" in batch
    _, metrics = trainer.feed.loss(trainer.unet, batch, 0)
    assert 0.5 <= metrics["soft_label"] <= 1 / (1 + math.exp(-1))


@pytest.mark.parametrize("mode", ["reference", "policy"])
def test_inversion_uses_the_chosen_model(mode, tiny_sd15, make_config):
    trainer = Trainer(make_config(tiny_sd15, "objective.name=inpo", f"objective.inversion_model={mode}"))
    item = trainer.feed.dataset[0]
    z = torch.stack([item["latents_w"], item["latents_l"]])
    from diffalign.data.dataset import batch_conditioning

    batch = {k: v[None] for k, v in item.items()}
    cond = batch_conditioning(trainer.backbone, batch, 32).repeat(2)
    t = torch.tensor([420, 420])
    before = trainer.feed.invert(z, t, cond)
    with torch.no_grad():
        for p in trainer.lora_params:
            p.add_(0.05 * torch.randn_like(p))
    after = trainer.feed.invert(z, t, cond)
    assert before.shape == z.shape and torch.isfinite(before).all()
    assert torch.equal(before, after) == (mode == "reference")  # the reference does not depend on θ


@pytest.mark.parametrize("objective", ["inpo", "smpo"])
def test_cached_reference_inversion_gives_the_uncached_loss(objective, tiny_sdxl, make_config, scored_pickapic):
    common = [f"objective.name={objective}", f"data.dataset={scored_pickapic}", "objective.inversion_model=reference",
              "data.caption_dropout=0", "objective.inversion_steps=5"]
    live = Trainer(make_config(tiny_sdxl, *common, out="live"))
    cached = Trainer(make_config(tiny_sdxl, *common, "objective.inversion_cache=true", out="cached"))
    item = cached.feed.dataset[0]
    assert item["traj_w"].shape == (4, 4, 16, 16)  # the shared levels 200, 400, 600, 800
    for micro in range(3):  # different timesteps each time
        batch = next(iter(torch.utils.data.DataLoader(cached.feed.dataset, batch_size=4)))
        plain = {k: v for k, v in batch.items() if not k.startswith("traj")}
        a, ma = cached.feed.loss(cached.unet, batch, micro)
        b, mb = live.feed.loss(live.unet, plain, micro)
        assert a.item() == pytest.approx(b.item(), rel=1e-4)
        assert ma["err_policy_w"] == pytest.approx(mb["err_policy_w"], rel=1e-5)
    again = Trainer(make_config(tiny_sdxl, *common, "objective.inversion_cache=true", out="again"))
    assert again.feed.dataset.trajectories.folder == cached.feed.dataset.trajectories.folder


@pytest.mark.parametrize("override, key", [
    ("objective.inversion_model=policy", "objective.inversion_model"),
    ("data.caption_dropout=0.2", "data.caption_dropout"),
    ("cache.enabled=false", "cache.enabled"),
])
def test_inversion_cache_refuses_settings_that_would_make_it_wrong(override, key):
    from diffalign.config import ConfigError, load_config

    base = ["objective.name=inpo", "objective.inversion_cache=true", "objective.inversion_model=reference",
            "data.caption_dropout=0"]
    load_config(None, base)
    with pytest.raises(ConfigError, match=f"inversion_cache=true needs {key}"):
        load_config(None, base + [override])


@pytest.mark.parametrize("objective", ["inpo", "smpo"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_trainer_inverts_v_prediction_models_from_their_noise(objective, kind, request, make_config, scored_pickapic):
    """The trainer's inversion (live and cached) converts a v-prediction UNet's output to ε before stepping."""
    from diffalign.data.dataset import batch_conditioning
    from diffalign.lora import reference_mode
    from diffalign.training.noising import ddim_invert

    common = [f"objective.name={objective}", f"data.dataset={scored_pickapic}", "model.prediction_type=v_prediction",
              "objective.inversion_model=reference", "data.caption_dropout=0", "objective.inversion_steps=5"]
    trainer = Trainer(make_config(request.getfixturevalue(f"tiny_{kind}"), *common, "objective.inversion_cache=true"))
    b = trainer.backbone
    item = trainer.feed.dataset[0]
    batch = {k: v[None] for k, v in item.items()}
    z = torch.cat([batch["latents_w"], batch["latents_l"]])
    cond = batch_conditioning(b, batch, 32).repeat(2)
    t = torch.tensor([700, 700])
    renoise = trainer.cfg.objective.renoise_iters if objective == "smpo" else 0
    with reference_mode(b.unet):
        expected = ddim_invert(lambda x, s: b.predict_noise(x, s, cond), z, t, b.scheduler.alphas_cumprod, 5, renoise)
        raw = ddim_invert(lambda x, s: b.predict(x, s, cond), z, t, b.scheduler.alphas_cumprod, 5, renoise)
    live = trainer.feed.invert(z, t, cond)
    cached = trainer.feed.invert(z, t, cond, torch.cat([batch["traj_w"], batch["traj_l"]]))
    assert torch.allclose(live, expected, atol=1e-5) and torch.allclose(cached, expected, atol=1e-4)
    assert not torch.allclose(raw, expected, atol=1e-3)  # v taken for ε would be caught
    assert "v_prediction" in trainer.feed.dataset.trajectories.folder.name
