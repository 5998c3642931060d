import math

import pytest
import torch

import diffalign.data.cache as cache_mod
from diffalign.data.cache import CachedPairDataset
from diffalign.trainer import Trainer, train


def _lora(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_steps_move_every_lora_parameter_and_lower_the_loss(kind, request, make_config):
    model = request.getfixturevalue(f"tiny_{kind}")
    trainer = Trainer(make_config(model, "optim.lr=2e-3", "data.caption_dropout=0"))
    before = _lora(trainer)
    batch = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=2)))
    losses = []
    for _ in range(8):  # the same batch, timesteps and noise every step
        loss, metrics = trainer.compute_loss(batch, micro_step=0)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the identity: policy == reference
    assert losses[-1] < losses[0] - 0.05, losses
    after = _lora(trainer)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{len(unchanged)} LoRA tensors did not move, e.g. {unchanged[:3]}"
    assert len(before) > 10


def test_cached_and_raw_training_give_the_same_losses(tiny_sdxl, make_config):
    common = ["train.max_steps=3", "data.caption_dropout=0.5"]
    cached = train(make_config(tiny_sdxl, *common, "cache.enabled=true", out="cached"))
    raw = train(make_config(tiny_sdxl, *common, "cache.enabled=false", out="raw"))
    # Same pairs, timesteps, noise and caption dropout: the reference errors depend on nothing else, so they
    # agree at every step up to the encoders' rounding (8 images per VAE call when caching, 2 when not).
    # The policy moves after step 1, and Adam turns ~1e-7 gradient noise on near-zero components into
    # full-size updates, so later policy errors are compared loosely.
    assert len(cached.history) == len(raw.history) == 3
    for a, b in zip(cached.history, raw.history):
        assert a["err_ref_w"] == pytest.approx(b["err_ref_w"], rel=1e-5)
        assert a["err_ref_l"] == pytest.approx(b["err_ref_l"], rel=1e-5)
        assert a["err_policy_w"] == pytest.approx(b["err_policy_w"], rel=1e-3)
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-2)
    first_c, first_r = cached.history[0], raw.history[0]
    assert first_c["loss"] == pytest.approx(first_r["loss"], rel=1e-6)
    assert first_c["err_policy_w"] == pytest.approx(first_r["err_policy_w"], rel=1e-5)

def test_cached_items_equal_freshly_encoded_ones(tiny_sdxl, make_config):
    from diffalign.data.dataset import RawPairDataset, encode_batch
    from diffalign.data.readers import load_pairs

    trainer = Trainer(make_config(tiny_sdxl, "cache.enabled=false", out="fresh"))
    cached = Trainer(make_config(tiny_sdxl, out="cached")).dataset
    raw = RawPairDataset(load_pairs(trainer.cfg.data), 32, trainer.cfg.train.seed)
    fresh = encode_batch(trainer.backbone, torch.utils.data.default_collate([raw[3]]), 32)
    for key, value in cached[3].items():
        assert torch.allclose(value, fresh[key][0].to(value.dtype), atol=1e-5), key


def test_second_run_reuses_the_cache_and_drops_encoders(tiny_sd15, make_config, monkeypatch):
    Trainer(make_config(tiny_sd15))

    def fail(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(cache_mod, "encode_batch", fail)
    trainer = Trainer(make_config(tiny_sd15, out="again"))
    assert isinstance(trainer.dataset, CachedPairDataset) and len(trainer.dataset) == 10
    assert trainer.backbone.text_encoders == []  # training needs no text encoder
    item = trainer.dataset[0]
    assert set(item) >= {"latents_w", "latents_l", "prompt_embeds", "geometry", "row"}
    assert item["latents_w"].shape == (4, 16, 16)
    # a different resolution is a different cache
    monkeypatch.undo()
    other = Trainer(make_config(tiny_sd15, "data.resolution=24", out="third"))
    assert other.dataset.folder != trainer.dataset.folder


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
