import math

import pytest
import torch

import diffalign.data.cache as cache_mod
from diffalign.data.cache import CachedPairDataset
from diffalign.training.trainer import Trainer, train


def _lora(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


OBJECTIVES = ["dpo", "mapo", "inpo", "smpo"]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_steps_move_every_lora_parameter_and_lower_the_loss(kind, objective, request, make_config, scored_pickapic):
    model = request.getfixturevalue(f"tiny_{kind}")
    # SmPO's effective beta is beta·γ·(2p-1), up to ~4.6x beta here: 500 puts it near DPO's 5000 at this lr.
    beta = ["objective.beta=500"] if objective == "smpo" else []
    inversion = ["objective.inversion_steps=4"] if objective in ("inpo", "smpo") else []  # their own option
    trainer = Trainer(make_config(model, "optim.lr=2e-3", "data.caption_dropout=0", f"objective.name={objective}",
                                  f"data.dataset={scored_pickapic}", *inversion, *beta))
    before = _lora(trainer)
    batch = next(iter(torch.utils.data.DataLoader(trainer.feed.dataset, batch_size=2)))
    losses = []
    for _ in range(8):  # the same batch, timesteps and noise every step
        loss, metrics = trainer.feed.loss(trainer.unet, batch, micro_step=0)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(loss.item())
    if trainer.objective.needs_reference:
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the identity: policy == reference
    assert losses[-1] < losses[0] - 0.01 * abs(losses[0]), losses
    after = _lora(trainer)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{len(unchanged)} LoRA tensors did not move, e.g. {unchanged[:3]}"
    assert len(before) > 10


def test_error_space_epsilon_reaches_the_loss_on_a_v_prediction_model(tiny_sd15, make_config):
    """The same batch, timesteps and noise: with train.error_space=epsilon each pair's policy and reference errors
    in the loss are ā_t times the v-prediction errors of the same forward pass, and training on them still moves
    every LoRA parameter and lowers the loss."""
    common = ["model.prediction_type=v_prediction", "optim.lr=2e-3", "data.caption_dropout=0"]
    native, in_eps = (Trainer(make_config(tiny_sd15, *common, f"train.error_space={space}", out=space))
                      for space in ("prediction", "epsilon"))
    feed = native.feed
    batch = feed.encoded(next(iter(torch.utils.data.DataLoader(feed.dataset, batch_size=2))))
    z = torch.cat([batch["latents_w"], batch["latents_l"]]).float()
    t, noise, cond = feed.draw(batch, batch["latents_w"].shape, 0)  # what loss() draws at micro-step 0
    t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
    b = feed.backbone
    v_err, v_ref = feed.errors(native.unet, b.scheduler.add_noise(z, noise2, t2), t2, cond.repeat(2),
                               b.target(z, noise2, t2).float())
    abar = b.scheduler.alphas_cumprod[t2.cpu()]
    before = _lora(in_eps)
    losses = []
    for _ in range(8):
        loss, m = in_eps.feed.loss(in_eps.unet, batch, micro_step=0)
        if not losses:  # LoRA starts as the identity, so both trainers' UNets are the base model here
            for key, err in (("err_policy_w", v_err[:2]), ("err_policy_l", v_err[2:]),
                             ("err_ref_w", v_ref[:2]), ("err_ref_l", v_ref[2:])):
                scale = abar[:2] if key.endswith("w") else abar[2:]
                assert m[key] == pytest.approx((scale * err).mean().item(), rel=1e-4), key
                assert m[key] < 0.9 * err.mean().item(), key
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        in_eps.accelerator.backward(loss)
        in_eps.optimizer.step()
        in_eps.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01 * losses[0], losses
    assert all(not torch.equal(before[n], after) for n, after in _lora(in_eps).items())


def test_cached_and_raw_training_give_the_same_losses(tiny_sdxl, make_config):
    # Adam turns ~1e-7 encoder rounding differences (8 images per VAE call when caching, 2 when not) into
    # updates of size lr in noise-chosen directions, and the loss multiplies error differences by beta/2. At the
    # recipes' lr 1e-5 the errors agree to ~1e-5; beta 500 keeps the loss within ~1e-4 (at 5000 it sat at 1e-3).
    common = ["train.max_steps=4", "data.caption_dropout=0.5", "optim.lr=1e-5", "objective.beta=500"]
    cached = train(make_config(tiny_sdxl, *common, "cache.enabled=true", out="cached"))
    raw = train(make_config(tiny_sdxl, *common, "cache.enabled=false", out="raw"))
    assert len(cached.history) == len(raw.history) == 4
    for a, b in zip(cached.history, raw.history):
        for key in ("err_ref_w", "err_ref_l"):  # depend on the inputs alone
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        for key in ("err_policy_w", "err_policy_l"):  # also on weights that moved by ~lr in noisy directions
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    first_c, first_r = cached.history[0], raw.history[0]  # before any update: identical up to rounding
    for key in first_c:
        assert first_c[key] == pytest.approx(first_r[key], rel=1e-5, abs=1e-7), key

def test_cached_items_equal_freshly_encoded_ones(tiny_sdxl, make_config):
    from diffalign.data.dataset import RawPairDataset, encode_batch
    from diffalign.data.readers import load_pairs

    trainer = Trainer(make_config(tiny_sdxl, "cache.enabled=false", out="fresh"))
    cached = Trainer(make_config(tiny_sdxl, out="cached")).feed.dataset
    raw = RawPairDataset(load_pairs(trainer.cfg.data), 32, trainer.cfg.train.seed)
    fresh = encode_batch(trainer.backbone, torch.utils.data.default_collate([raw[3]]))
    for key, value in cached[3].items():
        assert torch.allclose(value, fresh[key][0].to(value.dtype), atol=1e-5), key


def test_second_run_reuses_the_cache_and_drops_encoders(tiny_sd15, make_config, monkeypatch):
    Trainer(make_config(tiny_sd15))

    def fail(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(cache_mod, "encode_batch", fail)
    trainer = Trainer(make_config(tiny_sd15, out="again"))
    assert isinstance(trainer.feed.dataset, CachedPairDataset) and len(trainer.feed.dataset) == 10
    assert trainer.backbone.text_encoders == []  # a complete cache: the text encoders are never loaded
    item = trainer.feed.dataset[0]
    assert set(item) >= {"latents_w", "latents_l", "prompt_embeds", "geometry", "row"}
    assert item["latents_w"].shape == (4, 16, 16)
    # a different resolution is a different cache
    monkeypatch.undo()
    other = Trainer(make_config(tiny_sd15, "data.resolution=24", out="third"))
    assert other.feed.dataset.folder != trainer.feed.dataset.folder


def test_resume_reproduces_the_uninterrupted_run(tiny_sd15, make_config, tmp_path):
    full = train(make_config(tiny_sd15, "train.max_steps=6", "train.checkpoint_every=4", "data.caption_dropout=0.3",
                             out="full"))
    assert (tmp_path / "full" / "checkpoint-4").is_dir()
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    trainer = Trainer(make_config(tiny_sd15, "train.max_steps=6", "train.checkpoint_every=4",
                                  "data.caption_dropout=0.3", "train.resume=latest", out="resumed"))
    resumed = trainer.train()
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history[4:]], rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(full.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_checkpoint_rotation_keeps_the_newest(tiny_sd15, make_config, tmp_path):
    train(make_config(tiny_sd15, "train.max_steps=4", "train.checkpoint_every=1", "train.checkpoints_keep=2"))
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-3", "checkpoint-4"]


def test_interrupted_cache_build_resumes_from_written_shards(tiny_sd15, make_config, monkeypatch):
    import json

    trainer = Trainer(make_config(tiny_sd15, out="first"))
    folder = trainer.feed.dataset.folder
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").unlink()  # as if the build died after writing its shards
    monkeypatch.setattr(cache_mod, "encode_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-encoded")))
    again = Trainer(make_config(tiny_sd15, out="second"))
    assert again.feed.dataset.folder == folder and json.loads((folder / "meta.json").read_text()) == meta


def test_bf16_keeps_lora_fp32_and_options_run(tiny_sdxl, make_config):
    trainer = Trainer(make_config(tiny_sdxl, "train.mixed_precision=bf16", "train.gradient_checkpointing=true",
                                  "optim.name=adafactor", "train.max_steps=2"))
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert unet.conv_in.weight.dtype == torch.bfloat16  # frozen base weights follow mixed precision
    assert all(p.dtype == torch.float32 for p in trainer.lora_params)  # trained weights never do
    before = _lora(trainer)
    result = trainer.train()
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert any(not torch.equal(before[n], p) for n, p in _lora(trainer).items())


def test_adamw8bit_without_bitsandbytes_says_how_to_install(tiny_sd15, make_config, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'diffalign\[bnb\]'"):
        Trainer(make_config(tiny_sd15, "optim.name=adamw8bit"))
