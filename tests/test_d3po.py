"""D3PO: the per-step loss by hand, the clamp, pairing, online rounds and the human-feedback path end to end."""

import json
import math

import pytest
import torch

from diffalign.cli import main
from diffalign.objectives.d3po import d3po_step_loss, rollout_pairs
from diffalign.sampling.trajectories import guided_prediction
from diffalign.training.logprob import ddim_step_log_prob
from diffalign.training.trainer import Trainer, train


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_step_loss_by_hand():
    logp_w, ref_w = torch.tensor([-1.00, -2.0]), torch.tensor([-1.05, -2.0])
    logp_l, ref_l = torch.tensor([-0.97, -3.0]), torch.tensor([-1.00, -2.5])
    loss, metrics = d3po_step_loss(logp_w, ref_w, logp_l, ref_l, beta=0.1, clip=0.1)
    # pair 0: r_w = e^0.05 (inside the band), r_l = e^0.03; pair 1: r_w = 1, r_l = e^-0.5 -> clamped to 0.9
    expected = [-_logsig(0.1 * (0.05 - 0.03)), -_logsig(0.1 * (0.0 - math.log(0.9)))]
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-7)
    assert metrics["clip_frac"] == pytest.approx(0.25)
    assert metrics["implicit_acc"] == 1.0


def test_clamp_zeroes_the_gradient_outside_the_band():
    logp_w = torch.tensor([0.0, 0.5, -0.5], requires_grad=True)  # ratios 1, e^0.5 (> 1.1), e^-0.5 (< 0.9)
    logp_l = torch.zeros(3, requires_grad=True)
    loss, _ = d3po_step_loss(logp_w, torch.zeros(3), logp_l, torch.zeros(3))
    loss.backward()
    assert logp_w.grad[0] < 0 and logp_w.grad[1] == 0 and logp_w.grad[2] == 0
    assert (logp_l.grad > 0).all()  # the losers' ratios are 1, inside the band


def test_pairing_single_and_several_rewards_ties_give_nothing():
    one = torch.tensor([[[0.2], [0.9]], [[0.5], [0.5]]])  # prompt 1 ties
    assert rollout_pairs(one) == [(0, 1, 0)]
    two = torch.tensor([[[1.0, 1.0], [0.0, 2.0]], [[1.0, 2.0], [1.0, 1.0]]])  # a trade-off; a dominance
    assert rollout_pairs(two) == [(1, 0, 1)]
    assert rollout_pairs(two, [True, False]) == [(0, 0, 1), (1, 1, 0)]  # lower is better on head 2
    seven = torch.tensor([[0, 1, 0, 0, 1, 1, 0]], dtype=torch.float32).unsqueeze(-1)
    assert len(rollout_pairs(seven)) == 3 * 4  # every (liked, disliked) pair, once


@pytest.fixture
def d3po_config(online_config):
    def make(model, *overrides, out="run"):
        return online_config(model, "d3po", "objective.prompts_per_round=2", "train.batch_size=1",
                             "train.max_steps=4", "optim.lr=1e-3", *overrides, out=out)

    return make


def _lora(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_online_rounds_move_every_lora_parameter(kind, request, d3po_config):
    trainer = Trainer(d3po_config(request.getfixturevalue(f"tiny_{kind}")))
    before = _lora(trainer)
    result = trainer.train()
    after = _lora(trainer)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{len(unchanged)} LoRA tensors did not move, e.g. {unchanged[:3]}"
    rounds = [h["round"] for h in result.history if "round" in h]
    assert len(rounds) >= 2 and rounds == sorted(rounds)  # two rounds at least, in order
    first = next(h for h in result.history if "round" in h)
    assert {"reward_brightness", "eval_reward_brightness", "pairs", "time_sampling"} <= first.keys()
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference on the first step
    assert result.adapter.is_file()


def test_a_fixed_batch_lowers_the_loss(tiny_sd15, d3po_config):
    trainer = Trainer(d3po_config(tiny_sd15, "optim.lr=3e-3"))
    rnd = trainer.feed.source.new_round(0, trainer.accelerator.unwrap_model(trainer.unet))
    batch = trainer.feed.source.batches(rnd, 2)[0]
    losses = []
    for _ in range(6):
        loss, _ = trainer.feed.loss(trainer.unet, batch, 0)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < losses[0] - 1e-4, losses  # the clamp bounds it below by -logsigmoid(0.1·log(1.1/0.9))


def test_stored_log_prob_equals_the_recomputed_one(tiny_sd15, d3po_config):
    trainer = Trainer(d3po_config(tiny_sd15))
    rnd = trainer.feed.source.new_round(0, trainer.accelerator.unwrap_model(trainer.unet))
    r, s, b = rnd.rollouts, trainer.feed.source, trainer.backbone
    for j in range(len(r.timesteps)):
        x_t = r.latents[:, :, j].flatten(0, 1)
        cond = r.cond.select(torch.arange(len(r.prompts)).repeat_interleave(r.per_prompt))
        t = r.timesteps[j].expand(len(x_t))
        with torch.no_grad():
            eps = guided_prediction(b, trainer.unet, x_t, t, cond, s.negative, s.guidance)
            _, logp = ddim_step_log_prob(s.scheduler, eps, t, x_t, eta=s.eta,
                                         prev_sample=r.latents[:, :, j + 1].flatten(0, 1))
        assert torch.allclose(logp, r.log_probs[:, :, j].flatten(), atol=1e-4)
    # the K samples of a prompt share x_T and then diverge
    assert torch.equal(r.latents[:, 0, 0], r.latents[:, 1, 0]) and not torch.equal(r.latents[:, 0, 1], r.latents[:, 1, 1])


def test_resume_mid_round_reproduces_the_run(tiny_sd15, d3po_config, tmp_path):
    import shutil

    full = train(d3po_config(tiny_sd15, "train.max_steps=5", "train.checkpoint_every=3", out="full"))
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train(d3po_config(tiny_sd15, "train.max_steps=5", "train.checkpoint_every=3", "train.resume=latest",
                                out="resumed"))
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history[3:]], rel=1e-5)


def test_human_feedback_round_trip(tiny_sdxl, d3po_config, tmp_path, capsys):
    prompts = tmp_path / "human.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "samples"
    assert main(["sample", "--base", str(tiny_sdxl), "--prompts", str(prompts), "--per-prompt", "3", "--steps", "3",
                 "--resolution", "32", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [len(e["images"]) for e in manifest["prompts"]] == [3, 3]
    assert all((out / e["trajectory"]).is_file() for e in manifest["prompts"])
    labels = out / "labels.jsonl"
    labels.write_text('{"prompt_id": 0, "scores": [1, 0, 0], "annotator": "a"}\n'
                      '{"prompt_id": 0, "scores": [1, 1, 0], "annotator": "b"}\n'
                      '{"prompt_id": 1, "scores": [1, 1, 1], "annotator": "a"}\n')  # prompt 1 ties: no pairs
    trainer = Trainer(d3po_config(tiny_sdxl, "data.prompts=", f"data.labels={labels}", "objective.reward=[]",
                                  "train.max_steps=2"))
    assert trainer.feed.source.steps == 3 and trainer.backbone.text_encoders == []
    assert trainer.feed.source.stored_pairs == [(0, 0, 1), (0, 0, 2), (0, 1, 2)]  # means 1, 0.5, 0
    before = _lora(trainer)
    assert trainer.train().steps == 2
    assert any(not torch.equal(before[n], v) for n, v in _lora(trainer).items())


@pytest.mark.parametrize("line, message", [
    ('{"prompt_id": 7, "scores": [1, 0, 0]}', "prompt_id 7 is not in the manifest"),
    ('{"prompt_id": 0, "scores": [1, 0]}', "scores must be a list of 3 numbers"),
    ('{"prompt_id": 0, "scores": [1, 0, 0]', "not valid JSON"),
    ('{"prompt_id": 0, "scores": [1, NaN, 0]}', "score 2 is not a finite number (nan)"),
    ('{"prompt_id": 0, "scores": [1, 0, Infinity]}', "score 3 is not a finite number (inf)"),
])
def test_label_mismatches_are_named(tiny_sd15, d3po_config, tmp_path, capsys, line, message):
    prompts = tmp_path / "human.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "samples"
    assert main(["sample", "--base", str(tiny_sd15), "--prompts", str(prompts), "--per-prompt", "3", "--steps", "2",
                 "--resolution", "32", "--out", str(out)]) == 0
    (out / "labels.jsonl").write_text(line + "\n")
    capsys.readouterr()
    assert main(["train", "--set", f"model.pretrained={tiny_sd15}", "--set", "objective.name=d3po", "--set",
                 f"data.labels={out / 'labels.jsonl'}", "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'labels.jsonl'}, line 1: " in err and message in err
    assert not (tmp_path / "run").exists()


def test_clip_frac_counts_exactly_the_ratios_outside_the_band():
    # ratios 0.905 and 1.095 lie inside [0.9, 1.1] (|log 0.905| > log 1.1 once counted it); 0.89 and 1.11 do not
    ratios = torch.tensor([0.905, 0.89, 1.095, 1.11])
    logp_w, logp_l = ratios[:2].log(), ratios[2:].log()
    _, metrics = d3po_step_loss(logp_w, torch.zeros(2), logp_l, torch.zeros(2), beta=0.1, clip=0.1)
    assert metrics["clip_frac"] == 0.5


def test_an_update_window_spans_every_trained_step_of_its_pairs(tiny_sd15, d3po_config):
    """As in the official code: the grad_accum x trained_steps micro-batches of one optimizer update hold all
    trained steps of the same batch_size x grad_accum pairs, and no other pair."""
    trainer = Trainer(d3po_config(tiny_sd15, "objective.per_prompt=3", "train.batch_size=2", "train.grad_accum=2",
                                  "sampling.steps=4", "objective.timestep_fraction=0.5"))
    src = trainer.feed.source
    rnd = src.new_round(0, trainer.accelerator.unwrap_model(trainer.unet))
    assert len(rnd.pairs) >= 4
    window = trainer.accelerator.gradient_accumulation_steps
    assert window == 2 * src.trained_steps == 4
    batches = src.batches(rnd, 2)
    assert sum(len(b["items"]) for b in batches) == len(rnd.pairs) * src.trained_steps  # every pair, every step
    for start in range(0, len(batches) - window + 1, window):
        items = [item for b in batches[start:start + window] for item in b["items"]]
        pairs = {i for i, _ in items}
        assert len(pairs) == 4 and all(sum(1 for i, _ in items if i == p) == src.trained_steps for p in pairs)


def test_sample_draws_at_the_models_own_size(tiny_sd15, tmp_path):
    from PIL import Image

    from diffalign.models import Backbone

    backbone = Backbone.load(str(tiny_sd15))
    size = backbone.unet.config.sample_size * backbone.vae_scale_factor  # what `generate` draws: 64 px here
    assert size != 512
    prompts = tmp_path / "human.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "samples"
    assert main(["sample", "--base", str(tiny_sd15), "--prompts", str(prompts), "--per-prompt", "2", "--steps", "1",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolution"] == size
    assert Image.open(out / manifest["prompts"][0]["images"][0]).size == (size, size)
