"""DDPO and GRPO: losses against hand-computed values, the stat tracker and group advantages against hand-worked
sequences, and end-to-end rounds on the tiny models (every LoRA tensor moves, stored log-probabilities equal the
recomputed ones, resume mid-round equals the uninterrupted run)."""

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffalign.config import ConfigError, load_config
from diffalign.data.errors import DataError
from diffalign.objectives.ddpo import PerPromptStatTracker, ddpo_loss
from diffalign.objectives.grpo import group_advantages, grpo_loss
from diffalign.training.logprob import step_kl, step_stds
from diffalign.training.trainer import Trainer, train

# --- the losses ---------------------------------------------------------------------------------------------------

def test_ddpo_loss_by_hand():
    log_prob = torch.tensor([0.0, 0.1, -0.1, 0.0])
    old = torch.tensor([0.0, 0.0, 0.0, 5e-5])
    adv = torch.tensor([1.0, 2.0, -1.0, 10.0])  # the last is clamped to 5
    loss, m = ddpo_loss(log_prob, old, adv, clip_range=0.05, adv_clip_max=5.0)
    # per sample max(-A r, -A clamp(r)): -1; max(-2·e^0.1, -2·1.05) = -2.1; max(e^-0.1, 0.95) = 0.95; -5·e^-5e-5
    want = (-1.0 - 2.1 + 0.95 - 5 * math.exp(-5e-5)) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["approx_kl"] == pytest.approx(0.5 * (0.01 + 0.01 + 2.5e-9) / 4, rel=1e-5)
    assert m["clip_frac"] == 0.5  # e^±0.1 are outside [0.95, 1.05]


def test_the_clip_zeroes_gradients_outside_the_band():
    log_prob = torch.tensor([0.1, -0.1, 0.01, -0.01], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 2.0, -1.0])  # rows 0, 1 pushed past the band in their advantage's direction
    loss, _ = ddpo_loss(log_prob, torch.zeros(4), adv, clip_range=0.05)
    loss.backward()
    g = log_prob.grad
    assert g[0] == 0 and g[1] == 0
    assert g[2].item() == pytest.approx(-2.0 * math.exp(0.01) / 4) and g[3].item() == pytest.approx(math.exp(-0.01) / 4)


def test_the_stat_tracker_by_hand():
    t = PerPromptStatTracker(buffer_size=4, min_count=3)
    # round 1: a has 2 rewards, b has 1 (< 3): both use the batch's statistics
    batch = np.array([1.0, 2.0, 3.0])
    a1 = t.update(["a", "a", "b"], torch.tensor(batch))
    np.testing.assert_allclose(a1, (batch - 2.0) / (np.std(batch) + 1e-6))
    assert t.own_share == 0.0
    # round 2: a's buffer [1, 2, 4] reaches 3 (its own statistics); b's [3, 5] does not (the batch's)
    a2 = t.update(["a", "b"], [4.0, 5.0])
    np.testing.assert_allclose(a2, [(4 - 7 / 3) / (np.std([1, 2, 4]) + 1e-6), (5 - 4.5) / (0.5 + 1e-6)])
    assert t.own_share == 0.5
    # round 3: a's buffer keeps its last 4: [2, 4, 0, 10], mean 4, std sqrt(14)
    a3 = t.update(["a", "a"], [0.0, 10.0])
    np.testing.assert_allclose(a3, [(0 - 4) / (math.sqrt(14) + 1e-6), (10 - 4) / (math.sqrt(14) + 1e-6)])
    assert t.own_share == 1.0
    state = t.state_dict()
    again = PerPromptStatTracker(4, 3)
    again.load_state_dict(state)
    assert list(again.stats["a"]) == [2.0, 4.0, 0.0, 10.0] and again.stats["a"].maxlen == 4


def test_group_advantages_and_an_equal_group_gives_no_gradient():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups)
    s = math.sqrt(2 / 3) + 1e-4  # population std of 1, 2, 3
    assert torch.allclose(adv, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0]), atol=1e-6)
    log_prob = torch.zeros(6, requires_grad=True)
    loss, _ = grpo_loss(log_prob, torch.zeros(6), adv, clip_range=0.1)
    loss.backward()
    assert torch.equal(log_prob.grad[3:], torch.zeros(3)) and (log_prob.grad[[0, 2]] != 0).all()


def test_grpo_kl_term_by_hand():
    mean, ref = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    std = torch.tensor([[2.0]])
    kl = step_kl(mean, ref, std)
    assert kl.item() == pytest.approx((1 / 8 + 4 / 8) / 2)
    loss, m = grpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), kl=kl, kl_beta=0.5)
    assert loss.item() == pytest.approx(0.5 * kl.item()) and m["kl"] == pytest.approx(kl.item())


@pytest.mark.parametrize("override, message", [
    ("objective.group_size=1", r"objective.group_size=1 must be >= 2"),
    ("objective.clip_range=0", r"objective.clip_range=0.0 must be in \(0, 1\)"),
    ("objective.reward_weights=[1, 2]", r"objective.reward_weights has 2 number\(s\) for 1 head\(s\)"),
    ("objective.beta=0.1", r"objective.beta: not an option of objective 'grpo'"),
])
def test_grpo_options_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["objective.name=grpo", "objective.reward=[brightness]", override])


# --- end to end on the tiny models ---------------------------------------------------------------------------------

@pytest.fixture
def pg_config(online_config):
    def make(model, name, *overrides, out="run"):
        size = "objective.group_size=2" if name == "grpo" else "objective.per_prompt=2"
        return online_config(model, name, size, "objective.prompts_per_round=2", "train.batch_size=2",
                             "train.max_steps=4", "optim.lr=3e-3", "objective.timestep_fraction=1.0", *overrides,
                             out=out)

    return make


def _lora(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("name", ["ddpo", "grpo"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_two_rounds_move_every_lora_parameter(kind, name, request, pg_config):
    extra = ["objective.kl_beta=0.1"] if name == "grpo" else ["objective.stat_min_count=2"]
    trainer = Trainer(pg_config(request.getfixturevalue(f"tiny_{kind}"), name, *extra))
    before = _lora(trainer)
    result = trainer.train()
    after = _lora(trainer)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{len(unchanged)} LoRA tensors did not move, e.g. {unchanged[:3]}"
    rounds = [h["round"] for h in result.history if "round" in h]
    assert rounds == [0.0, 1.0]  # 4 samples x 3 steps / 2 per micro-batch = 6 micro-batches = 2 updates a round
    first = result.history[0]
    assert {"reward_brightness", "reward_brightness_std", "eval_reward_brightness", "samples", "approx_kl",
            "clip_frac", "advantage", "time_sampling", "zero_spread_groups"} <= first.keys()
    assert first["samples"] == 4 and first["approx_kl"] < 1e-8  # the first update's ratios are 1
    if name == "grpo":
        assert first["kl"] < 1e-10  # the policy starts as the reference (LoRA B = 0)
    else:  # 2 rewards per prompt from the first round on, stat_min_count 2: every advantage is per prompt
        assert first["per_prompt_share"] == 1.0
    assert result.adapter.is_file() and "objective `" + name + "`" in (result.output_dir / "README.md").read_text()


@pytest.mark.parametrize("kind, prediction", [("sd15", "epsilon"), ("sdxl", "v_prediction")])
def test_recomputed_log_probs_equal_the_stored_ones(kind, prediction, request, pg_config):
    """With the sampling weights, every micro-batch's policy log-probability is the one stored at sampling
    (CFG, the DDIM step and the batch layout match), so every first-update ratio is 1."""
    cfg = pg_config(request.getfixturevalue(f"tiny_{kind}"), "grpo", f"model.prediction_type={prediction}",
                    "objective.shared_noise=true")
    trainer = Trainer(cfg)
    batches = trainer.feed.batches(0)
    assert len(batches) == 2 * 3  # 4 samples in batches of 2, 3 steps each
    rnd = trainer.feed.round
    assert torch.equal(rnd.rollouts.latents[:, 0, 0], rnd.rollouts.latents[:, 1, 0])  # the group shares x_T
    for batch in batches:
        with torch.no_grad():
            _, m = trainer.feed.loss(trainer.unet, batch, 0)
        assert m["approx_kl"] < 1e-9 and m["clip_frac"] == 0.0, m
    # GRPO: the two samples of a group train the same steps, in one plan per group
    plan = {}
    for batch in batches:
        for i, j in batch["items"]:
            plan.setdefault(i // 2, set()).add(j)
    assert all(steps == {0, 1, 2} for steps in plan.values())


def test_ddpo_samples_start_from_their_own_noise_and_train_their_own_steps(tiny_sd15, pg_config):
    trainer = Trainer(pg_config(tiny_sd15, "ddpo", "objective.timestep_fraction=0.67", "train.batch_size=1"))
    batches = trainer.feed.batches(0)
    r = trainer.feed.round.rollouts
    assert not torch.equal(r.latents[:, 0, 0], r.latents[:, 1, 0])
    assert trainer.feed.window == 2 and len(batches) == 4 * 2
    items = [i for b in batches for i in b["items"]]
    assert sorted(i for i, _ in items) == [0, 0, 1, 1, 2, 2, 3, 3]  # every sample, 2 of its 3 steps
    window = [i for b in batches[:2] for i, _ in b["items"]]
    assert window[0] == window[1]  # an update window holds the trained steps of one sample (batch_size 1)


@pytest.mark.parametrize("name", ["ddpo", "grpo"])
def test_resume_mid_round_reproduces_the_run(name, tiny_sd15, pg_config, tmp_path):
    extra = ["objective.stat_min_count=2", "objective.num_inner_epochs=2"] if name == "ddpo" else []
    common = [*extra, "train.max_steps=6", "train.checkpoint_every=3", "objective.eval_every=0"]
    full = train(pg_config(tiny_sd15, name, *common, out="full"))
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train(pg_config(tiny_sd15, name, *common, "train.resume=latest", out="resumed"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[3:]]
    a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights


def test_policy_gradient_objectives_refuse_human_labels_and_need_a_reward(tiny_sd15, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("")
    with pytest.raises(DataError, match=r"data.labels: objective 'ddpo' trains on online rollouts"):
        Trainer(load_config(None, [f"model.pretrained={tiny_sd15}", "objective.name=ddpo", f"data.labels={labels}",
                                   f"train.output_dir={tmp_path / 'a'}", "log.to=none"]))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(DataError, match=r"objective.reward is empty; online grpo needs a reward head"):
        Trainer(load_config(None, [f"model.pretrained={tiny_sd15}", "objective.name=grpo", f"data.prompts={prompts}",
                                   f"train.output_dir={tmp_path / 'b'}", "log.to=none"]))


@pytest.mark.parametrize("name", ["ddpo", "grpo"])
def test_a_fixed_batch_lowers_the_loss_toward_the_advantages(name, tiny_sd15, pg_config):
    """A few updates on one micro-batch raise the log-probability of positive-advantage steps against the
    negative ones (a wide clip so the surrogate can move): the loss falls."""
    trainer = Trainer(pg_config(tiny_sd15, name, "objective.clip_range=0.5", "optim.lr=1e-2",
                                "objective.eval_every=0"))
    batch = trainer.feed.batches(0)[0]
    adv = batch["advantages"]
    assert (adv > 0).any() and (adv < 0).any()
    losses = []
    for _ in range(5):
        loss, _ = trainer.feed.loss(trainer.unet, batch, 0)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        from diffalign.training.rollouts import guided_log_prob

        log_prob = guided_log_prob(trainer.feed.source, trainer.unet, batch, trainer.device,
                                   trainer.accelerator.autocast)[0]
    shift = log_prob - batch["old_log_prob"]
    assert losses[-1] < losses[0], losses
    assert shift[adv > 0].mean() > shift[adv < 0].mean(), (shift, adv)


# --- steps too deterministic to train (objective.min_step_std) -----------------------------------------------------

@pytest.mark.parametrize("betas", [{"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
                                   {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}])
def test_step_stds_are_the_schedulers_own_ddim_variance(betas):
    """The testbed's schedule and SD's: η σ_t of every step equals diffusers' ``DDIMScheduler._get_variance``, and
    the step into t = 1 is the near-deterministic one that ``min_step_std`` is for."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**betas, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(20)
    stds = step_stds(scheduler, eta=0.7)
    gap = scheduler.config.num_train_timesteps // 20
    expected = torch.stack([0.7 * scheduler._get_variance(t, t - gap).sqrt() for t in scheduler.timesteps])
    torch.testing.assert_close(stds, expected.float(), rtol=1e-5, atol=1e-7)
    assert stds[-2] < 0.05 <= stds[:-2].min()  # t = 51 -> 1; at η = 1 std 0.015 (testbed) / 0.041 (SD)


@pytest.mark.parametrize("name", ["ddpo", "grpo", "d3po"])
def test_min_step_std_leaves_the_near_deterministic_step_untrained(name, tiny_sd15, pg_config, online_config):
    def make(*overrides):
        if name == "d3po":
            return Trainer(online_config(tiny_sd15, "d3po", "objective.prompts_per_round=2", "train.batch_size=1",
                                         "train.max_steps=2", "objective.eval_every=0", *overrides))
        return Trainer(pg_config(tiny_sd15, name, "objective.eval_every=0", *overrides))

    def trained(trainer):
        return {j for b in trainer.feed.batches(0) for _, j in b["items"]}

    every = make()
    assert trained(every) == {0, 1, 2} and every.feed.window == 3  # the default trains every step, as the papers
    stds = step_stds(every.feed.source.scheduler, every.feed.source.eta)
    smallest = int(stds.argmin())
    floor = float(stds.sort().values[:2].mean())  # between the smallest std and the next
    some = make(f"objective.min_step_std={floor}")
    assert trained(some) == {0, 1, 2} - {smallest} and some.feed.window == 2
    with pytest.raises(ConfigError, match=r"objective.min_step_std=10.0 leaves no step to train: the 3 steps' noise"):
        make("objective.min_step_std=10")
    with pytest.raises(ConfigError, match=r"objective.min_step_std"):
        make("objective.min_step_std=-1")


# --- each step's loss weighted as on an ε-prediction model (objective.step_weighting) -------------------------------

def _diffusers_gain(scheduler, t, eta):
    """|∂μ/∂(output)| of one step from diffusers' own ``DDIMScheduler.step`` (no noise added: the mean)."""
    zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    def mean(out):
        return scheduler.step(out, t, zero, eta=eta, variance_noise=zero).prev_sample
    return (mean(one) - mean(zero)).abs().item()


@pytest.mark.parametrize("betas", [{"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
                                   {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_epsilon_step_weights_are_the_ratio_of_diffusers_step_gains(betas, prediction):
    """The weight of a step is |∂μ/∂ε| / |∂μ/∂(output)| of diffusers' own DDIM step, scaled to mean 1 over the
    trained steps: exactly 1 on ε-prediction, and on v-prediction the first step weighs ~100x the last trained."""
    from diffusers import DDIMScheduler

    from diffalign.training.logprob import step_weights

    common = dict(**betas, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    own = DDIMScheduler(**common, prediction_type=prediction)
    eps = DDIMScheduler(**common, prediction_type="epsilon")
    for s in (own, eps):
        s.set_timesteps(20)
    trained = list(range(18))  # min_step_std 0.05 leaves out the last two
    weights = step_weights(own, 0.8, "epsilon", trained)
    ratio = torch.tensor([_diffusers_gain(eps, t, 0.8) / _diffusers_gain(own, t, 0.8) for t in own.timesteps])
    torch.testing.assert_close(weights, ratio / ratio[trained].mean(), rtol=1e-4, atol=1e-6)
    assert weights[trained].mean().item() == pytest.approx(1.0)
    if prediction == "epsilon":
        assert torch.equal(weights, torch.ones(20))
    if prediction == "v_prediction":
        assert weights[0] / weights[17] > 5  # the early, layout-setting steps are the ones lifted
    assert torch.equal(step_weights(own, 0.8, "none", trained), torch.ones(20))


def test_step_weights_scale_each_samples_loss_by_hand():
    from diffalign.objectives.d3po import d3po_step_loss

    log_prob, old = torch.tensor([0.0, 0.1]), torch.zeros(2)
    adv, w = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    want = (3.0 * -1.0 + 0.5 * 2.0 * math.exp(0.1)) / 2  # the second: max(2·e^0.1, 2·1.05)
    assert ddpo_loss(log_prob, old, adv, clip_range=0.05, weight=w)[0].item() == pytest.approx(want, rel=1e-6)
    assert grpo_loss(log_prob, old, adv, clip_range=0.05, weight=w)[0].item() == pytest.approx(want, rel=1e-6)
    lw, lr = torch.tensor([0.05, 0.0]), torch.tensor([0.0, 0.02])
    loss, _ = d3po_step_loss(lw, torch.zeros(2), lr, torch.zeros(2), beta=2.0, clip=0.1, weight=w)
    want = (3.0 * -F.logsigmoid(torch.tensor(2 * 0.05)) + 0.5 * -F.logsigmoid(torch.tensor(-2 * 0.02))) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("name, kind", [("ddpo", "sd15"), ("grpo", "sd15"), ("grpo", "sdxl"), ("d3po", "sd15")])
def test_step_weighting_reaches_every_micro_batch(name, kind, request, pg_config, online_config):
    """On a v-prediction model every micro-batch carries its steps' weights into the loss; the default weighs every
    step 1; a bad rule is refused. Before the first update the policy is the sampler and the reference (LoRA
    B = 0), so each sample's loss is known: -A for DDPO and GRPO (every ratio 1), log 2 for D3PO."""
    from diffalign.training.logprob import step_weights

    model = request.getfixturevalue(f"tiny_{kind}")

    def make(*overrides):
        v = "model.prediction_type=v_prediction"
        if name == "d3po":
            return Trainer(online_config(model, "d3po", "objective.prompts_per_round=2", "train.batch_size=2",
                                         "objective.eval_every=0", v, *overrides))
        return Trainer(pg_config(model, name, "objective.eval_every=0", v, *overrides))

    plain, weighted = make(), make("objective.step_weighting=epsilon")
    src = weighted.feed.source
    want = step_weights(src.scheduler, src.eta, "epsilon", src.trainable_steps)
    assert (want - 1).abs().max() > 0.1
    assert all(torch.equal(b["weight"], torch.ones(len(b["weight"]))) for b in plain.feed.batches(0))
    batches = weighted.feed.batches(0)
    assert batches
    for batch in batches:
        steps = torch.tensor([j for _, j in batch["items"]])
        torch.testing.assert_close(batch["weight"], want[steps])
        with torch.no_grad():
            loss, _ = weighted.feed.loss(weighted.unet, batch, 0)
        if name == "d3po":
            expected = batch["weight"].mean() * math.log(2)
        else:
            expected = (-batch["weight"] * batch["advantages"].clamp(-5, 5)).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r"objective.step_weighting='sigma' is not valid; choose one of none, "
                                          r"epsilon"):
        make("objective.step_weighting=sigma")
