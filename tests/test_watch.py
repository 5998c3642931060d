"""Watching a run: held-out pair statistics logged during training, and the degenerate-run warnings (unit
sequences, and a real run built to overfit)."""

import json

import pytest
import torch

from diffalign.testing import write_pairs_jsonl
from diffalign.training.trainer import Trainer, train
from diffalign.training.watch import WINDOW, RunWatcher


def _steps(n, start=1, **values):
    return [{"step": start + i, **values} for i in range(n)]


def test_overfitting_needs_the_held_out_pairs_to_disagree():
    watcher = RunWatcher()
    watcher.update({"step": 1, "loss": 0.69, "implicit_acc": 0.5, "margin": 0.0, "heldout_implicit_acc": 0.5})
    for m in _steps(WINDOW, 2, loss=0.001, implicit_acc=1.0, margin=3.0):
        watcher.update(m)
    assert len(watcher.warnings) == 1 and "overfitting" in watcher.warnings[0] and "held-out pairs at 0.50" in watcher.warnings[0]
    for m in _steps(WINDOW, 20, loss=0.001, implicit_acc=1.0, margin=3.0):
        watcher.update(m)
    assert len(watcher.warnings) == 1  # once per run

    generalising = RunWatcher()
    generalising.update({"step": 1, "loss": 0.69, "implicit_acc": 0.5, "margin": 0.0, "heldout_implicit_acc": 0.8})
    for m in _steps(WINDOW, 2, loss=0.001, implicit_acc=1.0, margin=3.0):
        generalising.update(m)
    assert generalising.warnings == []  # the training loss collapsed but held-out pairs agree: not a warning


def test_collapse_without_held_out_pairs_and_a_runaway_margin():
    watcher = RunWatcher()
    for m in [{"step": 1, "loss": 0.69, "implicit_acc": 0.5, "margin": 0.0}] + _steps(WINDOW, 2, loss=0.0, implicit_acc=1.0, margin=25.0):
        watcher.update(m)
    kinds = " | ".join(watcher.warnings)
    assert "the loss has collapsed; with no held-out pairs (data.eval_pairs)" in kinds
    assert "the training margin is running away (25.0 > 10" in kinds  # the first window of saturated steps
    quiet = RunWatcher()  # a healthy run: loss falling, accuracy below the collapse, margin moderate
    for i, m in enumerate(_steps(30, loss=0.69, implicit_acc=0.7, margin=1.0)):
        quiet.update({**m, "loss": 0.69 - 0.005 * i})
    assert quiet.warnings == []


def test_a_large_mean_margin_over_pairs_still_being_learnt_is_not_a_runaway():
    """The shipped testbed DPO recipe (ε errors, β 80000) logs mean margins of 14-90 over its last 50 steps while
    8-31% of its training pairs are still on the wrong side and the loss is 2.8-5.8 (report rewards), and on the
    demo's reward a window at margin 62.9 with 97% of the pairs right but a loss of ~0.34: margins spread wide, not
    flat. Neither may warn; a saturated run must."""
    start = [{"step": 1, "loss": 0.69, "implicit_acc": 0.5, "margin": 0.0}]
    for window in (dict(loss=5.2, implicit_acc=0.76, margin=22.6), dict(loss=0.34, implicit_acc=0.97, margin=62.9)):
        spread = RunWatcher()
        for m in start + _steps(30, 2, **window):
            spread.update(m)
        assert spread.warnings == [], window
    saturated = RunWatcher()
    for m in start + _steps(WINDOW, 2, loss=1e-5, implicit_acc=0.99, margin=12.0):
        saturated.update(m)
    assert any("the training margin is running away (12.0 > 10" in w for w in saturated.warnings)


def test_a_falling_held_out_accuracy_names_the_best_step():
    watcher = RunWatcher()
    for step, acc in ((50, 0.6), (100, 0.81), (150, 0.7), (200, 0.62)):
        watcher.update({"step": step, "loss": 0.5, "heldout_implicit_acc": acc})
    assert watcher.warnings == ["step 200: held-out implicit accuracy fell from 0.81 (step 100) to 0.62; the run is "
                                "past its best: fewer steps (train.max_steps=100) or a lower optim.lr would do better"]


def test_ddpo_advantages_mostly_normalised_over_the_round_are_warned_about():
    watcher = RunWatcher()
    for step in range(1, WINDOW + 1):  # rounds whose prompts have too few rewards of their own
        watcher.update({"step": step, "loss": 0.0, "per_prompt_share": 0.25})
    assert len(watcher.warnings) == 1
    assert watcher.warnings[0].startswith(f"step {WINDOW}: only 25% of the last {WINDOW} rounds' advantages")
    assert "lower objective.stat_min_count (to objective.per_prompt" in watcher.warnings[0]
    quiet = RunWatcher()  # a prompt's own statistics take over after a few rounds: half or more of the window
    for step in range(1, 3 * WINDOW):
        quiet.update({"step": step, "loss": 0.0, **({"per_prompt_share": float(step > WINDOW // 2)} if step % 2 else {})})
    assert quiet.warnings == []


@pytest.fixture
def flipped(tmp_path):
    """4 training pairs and the same pairs with winner and loser swapped, as held-out pairs that disagree."""
    path = write_pairs_jsonl(tmp_path / "pairs", n=4, size=32, seed=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    other = path.with_name("flipped.jsonl")
    other.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    return path, other


def test_held_out_statistics_are_logged_and_start_neutral(tiny_sd15, make_config, flipped):
    train_pairs, held = flipped
    trainer = Trainer(make_config(tiny_sd15, f"data.dataset={train_pairs}", f"data.eval_pairs={train_pairs}",
                                  "train.max_steps=3", "train.heldout_every=2"))
    start = trainer.heldout.measure(trainer.backbone.unet)  # LoRA starts as the identity: policy == reference
    assert start == {"heldout_implicit_acc": 0.5, "heldout_ranking_acc": pytest.approx(start["heldout_ranking_acc"]),
                     "heldout_margin": 0.0, "heldout_winner_gain": 0.0, "heldout_drift": 0.0,
                     "heldout_loss": pytest.approx(0.693147, abs=1e-6)}
    result = trainer.train()
    saved = json.loads((result.output_dir / "metrics.json").read_text())
    measured = [m["step"] for m in saved if "heldout_implicit_acc" in m]
    assert measured == [2, 3] and saved[-1]["heldout_drift"] > 0  # every 2 steps, and the last


def test_a_run_built_to_overfit_is_warned_about(tiny_sd15, make_config, flipped, caplog, monkeypatch):
    # Built to overfit: every step sees the same timesteps and noise (the feed's generator pinned), so the policy
    # memorises that one draw. The held-out measurement of the same pairs, at its own timesteps and noise, shows
    # what was learned about the preference itself: nothing (0.25), while the training pairs read 1.00.
    from diffalign.training.pairs import PairFeed

    monkeypatch.setattr(PairFeed, "_generator", lambda self, micro_step: torch.Generator().manual_seed(0))
    train_pairs, _ = flipped
    result = train(make_config(tiny_sd15, f"data.dataset={train_pairs}", f"data.eval_pairs={train_pairs}",
                               "optim.lr=3e-3", "train.batch_size=4", "train.max_steps=40", "train.heldout_every=10",
                               "data.caption_dropout=0", "optim.warmup_steps=0"))
    last = result.history[-1]
    assert last["implicit_acc"] == 1.0 and last["heldout_implicit_acc"] < 0.6, last
    assert any("overfitting: training pairs at implicit accuracy 1.00" in w for w in result.warnings), result.warnings
    assert "overfitting" in caplog.text


class _StubUNet:
    """Adapters on or off, as :func:`diffalign.lora.reference_mode` switches them."""

    adapters = True

    def disable_adapters(self):
        self.adapters = False

    def enable_adapters(self):
        self.adapters = True


class _StubBackbone:
    """Predicts the training target plus a fixed offset per image (winners first, then losers; policy or
    reference by the adapters' state), so every squared error is known exactly: offset²."""

    def __init__(self, policy, reference):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.offsets = {True: torch.tensor(policy), False: torch.tensor(reference)}
        self.unet = _StubUNet()

    def time_ids(self, geometry, resolution):
        return None

    def target(self, z, noise, t):
        self.last_target = noise
        return noise

    def predict(self, x_t, t, cond, unet):
        return self.last_target + self.offsets[unet.adapters][:, None, None, None]

    def error_weight(self, t, space="prediction"):  # a v-prediction model's ā_t, 0.5 at every t here
        return torch.full(t.shape, 0.5 if space == "epsilon" else 1.0)


def test_held_out_statistics_match_a_hand_computation():
    from diffalign.evaluation.metrics import HELD_OUT_BETA, pair_statistics

    # two pairs; squared errors (policy | reference): winners 0.01, 0.04 | 0.04, 0.04; losers 0.09, 0.01 | 0.04, 0.04
    backbone = _StubBackbone(policy=[0.1, 0.2, 0.3, 0.1], reference=[0.2, 0.2, 0.2, 0.2])
    encoded = [{"latents_w": torch.zeros(2, 4, 4, 4), "latents_l": torch.ones(2, 4, 4, 4),
                "prompt_embeds": torch.zeros(2, 3, 8), "geometry": None}]
    stats = pair_statistics(backbone, encoded, 32)
    inside = [(0.04 - 0.04) - (0.01 - 0.09), (0.04 - 0.04) - (0.04 - 0.01)]  # +0.08 (right way), -0.03 (wrong)
    assert stats["implicit_accuracy"] == 0.5 and stats["ranking_accuracy"] == 0.5  # pair 0 only
    assert stats["margin"] == pytest.approx(1000 * sum(inside) / 2)  # +25
    assert stats["winner_gain"] == pytest.approx(1000 * ((0.04 - 0.01) + (0.04 - 0.04)) / 2)  # +15
    assert stats["drift"] == pytest.approx(1000 * (0.1 ** 2 + 0 + 0.1 ** 2 + 0.1 ** 2) / 4)  # mean (pred_θ - pred_ref)²
    softplus = torch.nn.functional.softplus
    assert stats["loss"] == pytest.approx(sum(softplus(torch.tensor(-0.5 * HELD_OUT_BETA * h)).item() for h in inside) / 2)
    # measured in the run's error space (train.error_space=epsilon): every error and the drift weighted by ā_t
    weighted = pair_statistics(backbone, encoded, 32, space="epsilon")
    for key in ("margin", "winner_gain", "drift"):
        assert weighted[key] == pytest.approx(0.5 * stats[key]), key
    assert weighted["implicit_accuracy"] == stats["implicit_accuracy"]
    assert weighted["loss"] == pytest.approx(
        sum(softplus(torch.tensor(-0.25 * HELD_OUT_BETA * h)).item() for h in inside) / 2)
