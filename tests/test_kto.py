"""Diffusion-KTO: the loss by hand and against the official formula, the detached reference point (also reduced
across 2 processes), unpaired data in every form with its bad inputs, class-balanced sampling, and short runs on
tiny SD1.5 and SDXL that move every LoRA tensor and lower the loss."""

import json
import logging
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from diffalign.config import ConfigError, DataConfig, load_config
from diffalign.data.errors import DataError
from diffalign.data.unpaired import load_unpaired
from diffalign.objectives.kto import kto_loss, reference_point
from diffalign.testing import write_unpaired_jsonl
from diffalign.training.trainer import Trainer, train


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_loss_by_hand():
    # g = ref - model = [0.02, -0.02, 0.0]; mean 0 -> kl 0; β/2 = 500: z = [+10, +10 (undesirable, g < 0), 0]
    model, ref = torch.tensor([0.10, 0.20, 0.30]), torch.tensor([0.12, 0.18, 0.30])
    desirable = torch.tensor([True, False, True])
    loss, m = kto_loss(model, ref, desirable, beta=1000.0)
    assert loss.item() == pytest.approx((2 * (1 - sigmoid(10)) + 0.5) / 3, rel=1e-5)
    assert m["kl"] == 0 and m["implicit_acc"] == pytest.approx(2 / 3)
    assert m["g_desirable"] == pytest.approx(0.01) and m["g_undesirable"] == pytest.approx(-0.02)
    # λ_U = 2 doubles the undesirable image's term only
    loss2, _ = kto_loss(model, ref, desirable, beta=1000.0, lambda_undesirable=2.0)
    assert loss2.item() == pytest.approx((3 * (1 - sigmoid(10)) + 0.5) / 3, rel=1e-5)


def test_reference_point_is_the_clamped_batch_mean():
    # g = [0.03, 0.01] -> kl = 0.02; z = 500·(0.01) = 5 for the desirable, -500·(-0.01) = 5 for the undesirable
    loss, m = kto_loss(torch.tensor([0.0, 0.0]), torch.tensor([0.03, 0.01]), torch.tensor([True, False]), beta=1000.0)
    assert m["kl"] == pytest.approx(0.02) and loss.item() == pytest.approx(1 - sigmoid(5), rel=1e-4)
    # a negative mean improvement is clamped to 0: the reference point never rewards getting worse
    assert reference_point(torch.tensor([-0.03, 0.01])).item() == 0


def official_kto(model_losses, ref_loss, labels, beta_dpo, lambda_d=1.0, lambda_u=1.0):
    """The official train_kto_sd_v1.5.py loss (loss=kto, halo=sigmoid, bce_offset=none), one process."""
    g_term = -model_losses - (-ref_loss)
    label_sgn = 2 * labels - 1
    labels_binary = labels == 1
    kl = g_term.mean().detach().clamp(min=0)
    h = torch.sigmoid(label_sgn * beta_dpo * (g_term - kl))
    w_y = lambda_d * labels_binary + lambda_u * ~labels_binary
    return (w_y * (1 - h)).mean()


def test_parity_with_the_official_formula_at_half_beta():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        model = torch.rand(16, generator=g) * 0.1
        ref = model + torch.randn(16, generator=g) * 1e-3
        labels = torch.randint(0, 2, (16,), generator=g)
        ours, _ = kto_loss(model, ref, labels.bool(), beta=2000.0, lambda_desirable=1.5, lambda_undesirable=0.7)
        theirs = official_kto(model, ref, labels, 1000, 1.5, 0.7)  # their --beta_dpo 1000 has no 1/2
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_gradient_flows_through_g_not_the_reference_point():
    # dL/de_θ,i = w_i · σ'(z_i) · sgn_i · (β/2) / N with kl held constant; at g = kl it is the largest (σ'(0) = 1/4)
    model = torch.tensor([0.10, 0.20, 0.30], requires_grad=True)
    ref = torch.tensor([0.12, 0.18, 0.29])
    desirable = torch.tensor([True, False, True])
    beta = 100.0
    loss, m = kto_loss(model, ref, desirable, beta=beta)
    loss.backward()
    g = (ref - model).detach()
    kl = max(0.0, g.mean().item())
    sgn = desirable.float() * 2 - 1
    z = sgn * beta / 2 * (g - kl)
    s = torch.sigmoid(z)
    expected = s * (1 - s) * sgn * beta / 2 / 3
    assert torch.allclose(model.grad, expected, rtol=1e-5)
    one = torch.tensor([0.2], requires_grad=True)  # one image: g = kl, z = 0, yet the gradient is not zero
    kto_loss(one, torch.tensor([0.25]), torch.tensor([True]), beta=beta)[0].backward()
    assert one.grad.item() == pytest.approx(0.25 * beta / 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    g = torch.tensor([[0.05, 0.03], [-0.01, 0.01]][rank])  # local means 0.04 and 0.0; global 0.02
    model, ref = torch.zeros(2), g.clone()
    _, m = kto_loss(model, ref, torch.tensor([True, False]), beta=1000.0)
    out[rank] = (reference_point(g).item(), m["kl"])
    dist.destroy_process_group()


def test_the_reference_point_is_reduced_across_processes():
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(0.02) and out[rank][1] == pytest.approx(0.02)


# ----- data -----
@pytest.fixture(scope="module")
def unpaired(tmp_path_factory):
    return write_unpaired_jsonl(tmp_path_factory.mktemp("unpaired"), n=6, size=40, seed=4)  # seed 4: no repeats


def test_unpaired_jsonl_csv_and_folder_read_alike(unpaired, tmp_path):
    src = load_unpaired(DataConfig(dataset=str(unpaired)))
    assert len(src) == 12 and src.unit == "images"
    assert [src.desirable(r) for r in src.rows] == [True, False] * 6
    assert src[0].loser is None and src[0].label == 1 and src[1].label == 0
    assert "12 images kept (6 desirable, 6 undesirable" in src.summary()
    assert len(load_unpaired(DataConfig(dataset=str(unpaired.parent)))) == 12  # the folder holding unpaired.jsonl
    rows = [json.loads(line) for line in unpaired.read_text().splitlines()]
    csv = unpaired.parent / "copy.csv"
    csv.write_text("prompt,image,label\n" + "".join(f"{r['prompt']},{r['image']},{'true' if r['label'] else 'false'}\n"
                                                     for r in rows))
    from_csv = load_unpaired(DataConfig(dataset=str(csv)))
    assert [from_csv[i].label for i in range(12)] == [1, 0] * 6
    held = tmp_path / "held.txt"  # data.exclude_prompts leaves out both images of the first prompt
    held.write_text(rows[0]["prompt"] + "\n")
    kept = load_unpaired(DataConfig(dataset=str(unpaired), exclude_prompts=str(held)))
    assert len(kept) == 12 - sum(r["prompt"] == rows[0]["prompt"] for r in rows) == 10
    assert rows[0]["prompt"] not in {kept.caption_of(r) for r in kept.rows}


def test_an_hf_dataset_with_a_label_column(tmp_path, unpaired):
    import datasets

    rows = [json.loads(line) for line in unpaired.read_text().splitlines()]
    ds = datasets.Dataset.from_dict({"caption": [r["prompt"] for r in rows],
                                     "image": [(unpaired.parent / r["image"]).read_bytes() for r in rows],
                                     "label": [bool(r["label"]) for r in rows]})
    ds.to_parquet(str(tmp_path / "kto.parquet"))
    src = load_unpaired(DataConfig(dataset=str(tmp_path / "kto.parquet")))
    assert len(src) == 12 and [src[i].label for i in range(4)] == [1, 0, 1, 0]


def _write(folder, lines):
    (folder / "bad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(folder / "bad.jsonl")


def test_bad_unpaired_data_is_one_line(unpaired):
    folder = unpaired.parent
    good = {"prompt": "p", "image": "imgs/0_w.png", "label": 1}
    cases = [
        ([good, {**good, "label": 2}], r"bad.jsonl, line 2: label=2; expected 1 \(desirable\) or 0"),
        ([good, {**good, "label": "maybe"}], r"line 2: label='maybe'"),
        ([good, {"prompt": "p", "image": "imgs/0_w.png"}], r"line 2: missing key\(s\) label"),
        ([good, {**good, "image": "../x.png", "label": 0}], r"line 2: image path '../x.png' leaves the dataset folder"),
        ([good, {**good, "image": "imgs/none.png", "label": 0}], r"line 2: image image 'imgs/none.png' does not exist"),
        ([good, {**good, "image": "imgs/1_w.png"}], r"every image is desirable \(label 1\) \(2 of 2\); KTO needs both"),
    ]
    for lines, message in cases:
        with pytest.raises(DataError, match=message) as info:
            load_unpaired(DataConfig(dataset=_write(folder, lines)))
        assert "\n" not in str(info.value)


def test_repeats_are_dropped_and_a_rare_class_is_warned(unpaired, caplog):
    folder = unpaired.parent
    lines = [{"prompt": "p", "image": f"imgs/{i}_w.png", "label": 1} for i in range(6)]
    lines += [{"prompt": "p", "image": "imgs/0_l.png", "label": 0}, {"prompt": "p", "image": "imgs/0_w.png", "label": 1}]
    with caplog.at_level(logging.WARNING):
        src = load_unpaired(DataConfig(dataset=_write(folder, lines)))
    assert len(src) == 7 and src.duplicates_dropped == 1
    assert "only 14% of the images are undesirable; consider objective.desirable_share=0.5" in caplog.text


def test_a_pairs_folder_is_not_unpaired_data(tmp_path):
    from diffalign.testing import write_pairs_jsonl

    write_pairs_jsonl(tmp_path, n=2, size=32)
    with pytest.raises(DataError, match=r"holds pairs.jsonl \(preference pairs\) but no unpaired.jsonl"):
        load_unpaired(DataConfig(dataset=str(tmp_path)))


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"objective.desirable_share=1.5 must be in \(0, 1\)"):
        load_config(None, ["objective.name=kto", "objective.desirable_share=1.5"])
    cfg = load_config(None, ["objective.name=kto"])
    assert cfg.objective.beta == 2000.0 and cfg.objective.desirable_share is None


# ----- training -----
@pytest.fixture
def kto_config(make_config, unpaired):
    def make(model, *overrides, out="run"):
        return make_config(model, "objective.name=kto", f"data.dataset={unpaired}", "data.caption_dropout=0",
                           *overrides, out=out)

    return make


def _lora(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_fixed_batch_moves_every_lora_tensor_and_lowers_the_loss(kind, request, kto_config):
    trainer = Trainer(kto_config(request.getfixturevalue(f"tiny_{kind}"), "optim.lr=2e-3", "objective.beta=500"))
    before = _lora(trainer)
    batch = next(iter(torch.utils.data.DataLoader(trainer.feed.dataset, batch_size=4)))
    assert batch["label"].tolist() == [1, 0, 1, 0] and "latents_l" not in batch
    losses = []
    for _ in range(8):  # the same batch, timesteps and noise every step
        loss, metrics = trainer.feed.loss(trainer.unet, batch, micro_step=0)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(0.5, abs=1e-6)  # LoRA starts as the identity: g = 0, h = 1/2
    assert losses[-1] < losses[0] - 0.01, losses
    assert metrics["g_desirable"] > metrics["g_undesirable"]  # desirable images improved relative to undesirable
    after = _lora(trainer)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged and len(before) > 10, unchanged[:3]


def test_each_image_gets_its_own_timestep_and_noise(tiny_sd15, kto_config, monkeypatch):
    trainer = Trainer(kto_config(tiny_sd15))
    seen = {}
    add_noise = trainer.backbone.scheduler.add_noise

    def spy(z, noise, t):
        seen.update(noise=noise, t=t)
        return add_noise(z, noise, t)

    monkeypatch.setattr(trainer.backbone.scheduler, "add_noise", spy)
    batch = next(iter(torch.utils.data.DataLoader(trainer.feed.dataset, batch_size=4)))
    trainer.feed.loss(trainer.unet, batch, micro_step=0)
    assert len(set(seen["t"].tolist())) == 4 and not torch.equal(seen["noise"][0], seen["noise"][1])


def test_balanced_sampling_draws_the_share(tiny_sd15, kto_config, tmp_path):
    folder = tmp_path / "skewed"
    path = write_unpaired_jsonl(folder, n=8, size=32)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keep = [r for r in rows if r["label"] == 1] + [r for r in rows if r["label"] == 0][:2]  # 8 desirable, 2 not
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    trainer = Trainer(kto_config(tiny_sd15, f"data.dataset={path}", "objective.desirable_share=0.5"))
    labels = trainer.feed.labels()
    assert labels.float().mean().item() >= 0.7 and not labels.all()  # repeats in the scenes may drop a few
    drawn = torch.cat([torch.tensor([int(labels[i]) for i in trainer.feed.epoch_loader(e).dataset.indices])
                       for e in range(40)])
    assert drawn.float().mean().item() == pytest.approx(0.5, abs=0.06)  # plain order would give 0.8
    plain = Trainer(kto_config(tiny_sd15, f"data.dataset={path}", out="plain")).feed.epoch_loader(0).dataset.indices
    assert sorted(plain) == list(range(len(labels)))


def test_a_short_run_logs_kto_metrics_and_writes_the_adapter(tiny_sdxl, kto_config):
    result = train(kto_config(tiny_sdxl, "train.max_steps=3", "train.batch_size=4"))
    saved = json.loads((result.output_dir / "metrics.json").read_text())
    assert len(saved) == 3 and {"kl", "g_desirable", "g_undesirable", "implicit_acc", "desirable_share"} <= set(saved[0])
    assert result.adapter.is_file()
