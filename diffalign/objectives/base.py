"""The objective protocol: what an objective needs from the trainer and how it turns errors into a loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from torch import Tensor

from ..options import ConfigError, check_choice, check_positive

# The help of ``objective.min_step_std``, an option of every rollout objective (D3PO, DDPO, GRPO).
MIN_STEP_STD_HELP = (
    "Steps whose sampling noise std (η·σ_t of the DDIM step) is under this are sampled but not trained. The "
    "log-probability gradient of a step grows as 1/std while so little noise barely changes the image, so such "
    "a step adds gradient noise and almost no reward signal. At η = 1 and 20 steps the last two have std 0.015 "
    "and 0.007 on the testbed's schedule, 0.041 and 0.021 on SD1.5's and SDXL's, the others 0.15 or more. 0: "
    "train every step, as the papers do; anything else is a deviation from them.")

# ``objective.step_weighting``, likewise: how each trained step's loss is weighted (training/logprob.step_weights).
STEP_WEIGHTINGS = ("none", "epsilon")
STEP_WEIGHTING_HELP = (
    "Weight of each denoising step's loss. none: 1, as the papers. epsilon: |dμ/dε| / |dμ/d(output)| of the DDIM "
    "step, scaled to mean 1 over the trained steps, so each step's gradient has the size relative to the others "
    "that it has on an ε-prediction model (where DDPO, D3PO and GRPO were made): exactly 1 there; on a "
    "v-prediction model the early, layout-setting steps otherwise get ~100x less gradient than the last ones. "
    "epsilon on a v-prediction model is a deviation from the papers.")


def check_step_weighting(options) -> None:
    """``objective.step_weighting`` names a rule of :data:`STEP_WEIGHTINGS`."""
    check_choice("objective", "step_weighting", options.step_weighting, STEP_WEIGHTINGS)


# The reward-hacking guard's options, shared by every online objective (training/reward_guard.py).
GUARD_HELP = ("Reward-hacking guard: head(s) scored on the evaluation images of data.eval_prompts (every "
              "objective.eval_every), not trained on; logged as eval_guard_<head>.")
GUARD_OPTIONS_HELP = "Guard heads' keyword arguments as HEAD.KEY=VALUE strings."
GUARD_MARGIN_HELP = ("Stop when a guard's mean falls more than this below its first evaluation (before training), "
                     "handing back the adapter of the last evaluation where every guard held; 0: only log.")


def check_guard(options) -> None:
    """``objective.guard_margin`` is not negative."""
    check_positive("objective", "guard_margin", options.guard_margin, allow_zero=True)


@dataclass
class PairErrors:
    """Per-pair denoising errors ``e = mean over (C,H,W) of (prediction - target)^2`` in fp32, shape [B].
    ``ref_*`` are None for reference-free objectives; ``score_*`` are given to ``soft_pairs`` objectives."""

    model_w: Tensor
    model_l: Tensor
    ref_w: Tensor | None = None
    ref_l: Tensor | None = None
    score_w: Tensor | None = None  # reward scores normalised on the training set (soft_pairs objectives)
    score_l: Tensor | None = None


@dataclass
class ImageErrors:
    """Per-image denoising errors of unpaired labelled images (fp32, shape [B]), for ``unpaired`` objectives
    (Diffusion-KTO): the policy's, the reference's, and each image's label (True: desirable)."""

    model: Tensor
    ref: Tensor
    desirable: Tensor


@dataclass
class StepLogProbs:
    """Per-step log-probabilities ``log π(x_{t-1} | x_t)`` of winners and losers under the policy and the
    reference (shape [B], fp32): what ``rollouts`` objectives are given, one denoising step per micro-batch."""

    policy_w: Tensor
    ref_w: Tensor
    policy_l: Tensor
    ref_l: Tensor
    weight: Tensor | None = None  # each pair's step weight (objective.step_weighting); None: 1


@dataclass
class StepRatios:
    """One denoising step of single trajectories, for ``rewarded_rollouts`` objectives (DDPO, GRPO), shape [B] in
    fp32: the policy's ``log π_θ(x_{t-1} | x_t)``, the sampling policy's stored one, each sample's advantage, and,
    when the objective ``needs_reference``, the per-sample KL of the policy's step to the reference's
    (``||μ_θ - μ_ref||² / (2σ_t²)`` averaged over latent elements)."""

    log_prob: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    kl: Tensor | None = None
    weight: Tensor | None = None  # each sample's step weight (objective.step_weighting); None: 1


class Objective(Protocol):
    """A preference objective, constructed as ``Class(options, num_timesteps=T)`` where ``options`` is an instance
    of its own ``Options`` dataclass (which carries ``beta``), built and validated from the ``objective:`` section
    of a config. The trainer
    reads the three declarations to decide what to compute: ``data`` picks the feed (``pairs``/``soft_pairs``:
    the pairs feed, which hands over :class:`PairErrors`; ``unpaired``: the pairs feed over single labelled images,
    which hands over :class:`ImageErrors`; ``rollouts``: the rollouts feed, pairs of trajectories,
    which hands over :class:`StepLogProbs`; ``rewarded_rollouts``: the rollouts feed, single trajectories with
    advantages, which hands over :class:`StepRatios` and asks the objective for ``advantages(prompts, rewards,
    groups)``, then logs its ``advantage_metrics()`` where it has one; ``prompts``: the reward-backprop feed,
    which hands over the differentiable rewards [B, heads] of images sampled with gradients), ``noising`` how the
    pairs feed makes x_t (``rollout``: the sampled trajectory's own)."""

    Options: type  # a dataclass; its fields are this objective's config keys (help in field metadata)
    needs_reference: bool
    noising: Literal["forward", "ddim_inversion", "renoise", "rollout"]
    data: Literal["pairs", "soft_pairs", "unpaired", "rollouts", "rewarded_rollouts", "prompts"]

    def __call__(self, outputs: PairErrors | ImageErrors | StepLogProbs | StepRatios | Tensor) -> tuple[Tensor, dict[str, float]]:
        """Return ``(loss, metrics)``; metrics are plain floats for logging."""
        ...


def check_reward_weights(options) -> None:
    """``objective.reward_weights``, when given, has one number per head of ``objective.reward``."""
    if options.reward_weights and len(options.reward_weights) != len(options.reward):
        raise ConfigError(f"objective.reward_weights has {len(options.reward_weights)} number(s) for "
                          f"{len(options.reward)} head(s) in objective.reward",
                          ("objective.reward_weights", "objective.reward"))


def implicit_accuracy(inside: Tensor) -> Tensor:
    """Fraction of pairs whose implicit reward margin is positive; exact ties count 0.5."""
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()


def pair_metrics(loss: Tensor, model_w: Tensor, model_l: Tensor, ref_w: Tensor | None, ref_l: Tensor | None,
                 margin: Tensor, preferred: Tensor | None = None, **extra: Tensor) -> dict[str, float]:
    """The metrics every objective logs: loss, policy (and reference) errors of winners and losers, the mean
    margin, and implicit accuracy (the sign of ``preferred``, default the margin; ties 0.5)."""
    metrics = {"loss": loss.item(), "err_policy_w": model_w.mean().item(), "err_policy_l": model_l.mean().item()}
    if ref_w is not None and ref_l is not None:
        metrics.update(err_ref_w=ref_w.mean().item(), err_ref_l=ref_l.mean().item())
    metrics.update(margin=margin.mean().item(),
                   implicit_acc=implicit_accuracy(margin if preferred is None else preferred).item())
    metrics.update({k: v.float().mean().item() for k, v in extra.items()})
    return metrics
