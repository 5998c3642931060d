"""The feed of policy-gradient objectives (``data = "rewarded_rollouts"``: DDPO, GRPO): online rounds of single
trajectories, each with its own advantage.

A round samples ``objective.prompts_per_round`` prompts × ``per_prompt`` (GRPO: ``group_size``) trajectories with
the current policy (one x_T per sample, or per group with ``shared_noise``), scores them with every head, and
asks the objective for advantages from the signed scores (DDPO: per-prompt statistics; GRPO: group-relative).
Training items are ``(sample, step)``: for each of ``num_inner_epochs`` passes the samples in a new seeded order,
``train.batch_size`` at a time, and for each such batch one micro-batch per trained step (a random
``timestep_fraction`` of the steps, per sample, or per group where the objective says ``same_steps_in_group``).
One optimizer update therefore spans every trained step of ``batch_size × grad_accum`` samples, as ddpo-pytorch
accumulates. With several processes the round is gathered (advantages are computed over the global round, the
same on every rank) and each rank trains its own slice, padded to equal length as D3PO's are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..data.errors import DataError
from ..files import atomic_write_text
from ..lora import reference_mode
from ..objectives.base import StepRatios
from ..rewards.combine import signed
from ..sampling.trajectories import Rollouts
from .logprob import step_kl
from .rollouts import ROUND_FILE, RolloutSource, attach_model, guided_log_prob

ROUND_STATE = "round.json"


@dataclass
class RewardedRound:
    """One round's rollouts, their scores [P, K, heads], the advantage of each sample [P·K] and the metrics."""

    index: int
    rollouts: Rollouts
    scores: torch.Tensor
    advantages: torch.Tensor
    metrics: dict[str, float]


class RewardedRolloutFeed:
    """Rounds of single trajectories with advantages; a micro-batch's loss is the objective's on the policy's
    per-step log-probability of the stored step, the stored (sampling-time) one and the advantages, plus the KL
    to the reference when the objective needs it. Implements :class:`~diffalign.training.feeds.Feed`."""

    def __init__(self, cfg: Config, accelerator, weight_dtype: torch.dtype, objective_cls) -> None:
        self.cfg, self.accelerator, self.device = cfg, accelerator, accelerator.device
        options = cfg.objective.options
        self.source = RolloutSource(cfg, shared_noise=getattr(options, "shared_noise", False), labels_allowed=False)
        self.backbone, self.resolution, self.objective = attach_model(self.source, cfg, accelerator, weight_dtype,
                                                                      objective_cls)
        self.vae_device = self.device
        self.window = self.source.trained_steps  # an update spans every trained step of its samples
        self.round: RewardedRound | None = None
        self._metrics: dict[str, float] = {}
        self._idle_rounds = 0  # consecutive rounds whose advantages are all zero

    def ready(self) -> None:
        """Nothing to drop or place: sampling needs every part on the device."""

    # ----- rounds -----
    def _new_round(self, index: int) -> RewardedRound:
        unet = self.backbone.unet
        metrics = self.source.evaluation_due(unet, index, self.accelerator.autocast)
        rollouts, scores, round_metrics = self.source.sample_round(index, unet, self.accelerator.autocast)
        advantages = self._advantages(rollouts, scores)
        spread = scores.amax(dim=1) - scores.amin(dim=1)  # [P, heads]
        round_metrics.update(advantage_std=advantages.std(unbiased=False).item(),
                             zero_spread_groups=(spread == 0).all(dim=-1).float().mean().item(),
                             **getattr(self.objective, "advantage_metrics", dict)())  # optional (DDPO's tracker)
        self._idle_rounds = self._idle_rounds + 1 if bool((advantages == 0).all()) else 0
        if self._idle_rounds >= 5:
            raise DataError(f"5 rounds in a row with every advantage 0: the reward ties on every sample "
                            f"({round_metrics})")
        self._metrics = {**round_metrics, **metrics, "round": float(index)}
        return RewardedRound(index, rollouts, scores, advantages, round_metrics)

    def _advantages(self, rollouts: Rollouts, scores: torch.Tensor) -> torch.Tensor:
        p, k = scores.shape[:2]
        flat = signed(scores.reshape(p * k, -1).float(), self.source.higher_is_better)
        prompts = [text for text in rollouts.prompts for _ in range(k)]
        groups = torch.arange(p).repeat_interleave(k)
        return self.objective.advantages(prompts, flat, groups).float()

    def batches(self, epoch: int, skip: int = 0) -> list[dict]:
        """The micro-batches of round ``epoch`` (sampled and scored on first use), without the first ``skip``."""
        if self.round is None or self.round.index != epoch:
            self.round = self._new_round(epoch)
        return self._batches(self.round)[skip:]

    def _batches(self, rnd: RewardedRound) -> list[dict]:
        src, o = self.source, self.cfg.objective.options
        p, k = rnd.scores.shape[:2]
        n, trained = p * k, src.trained_steps
        g = src._generator(rnd.index, 1, shared=True)  # the same plan on every rank
        size, out = self.cfg.train.batch_size, []
        for _ in range(o.num_inner_epochs):
            if getattr(self.objective, "same_steps_in_group", False):
                per_group = [src.draw_steps(g) for _ in range(p)]
                plan = [per_group[i // k] for i in range(n)]
            else:
                plan = [src.draw_steps(g) for _ in range(n)]
            order = torch.randperm(n, generator=g).tolist()
            if src.world > 1:
                per_rank = -(-n // src.world)
                order = (order * src.world)[: per_rank * src.world][src.rank :: src.world]
            for s in range(0, len(order), size):
                group = order[s : s + size]
                out += [self._batch(rnd, [(i, plan[i][j]) for i in group]) for j in range(trained)]
        return out

    def _batch(self, rnd: RewardedRound, items: list[tuple[int, int]]) -> dict:
        r, k = rnd.rollouts, rnd.scores.shape[1]
        sample = torch.tensor([i for i, _ in items])
        prompt, within, step = sample // k, sample % k, torch.tensor([j for _, j in items])
        return {"x_t": r.latents[prompt, within, step], "x_prev": r.latents[prompt, within, step + 1],
                "t": r.timesteps[step], "cond": r.cond.select(prompt), "old_log_prob": r.log_probs[prompt, within, step],
                "advantages": rnd.advantages[sample], "weight": self.source.step_weight[step], "items": items}

    # ----- the loss -----
    def loss(self, unet, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy's log-probability of each stored step (CFG as in sampling), against the stored one, with the
        samples' advantages, into the objective; with a reference, also the per-sample KL of the two steps."""
        autocast = self.accelerator.autocast
        log_prob, mean, std = guided_log_prob(self.source, unet, batch, self.device, autocast)
        kl = None
        if self.objective.needs_reference:
            with torch.no_grad(), reference_mode(self.accelerator.unwrap_model(unet)):
                _, ref_mean, _ = guided_log_prob(self.source, unet, batch, self.device, autocast)
            kl = step_kl(mean, ref_mean, std)
        return self.objective(StepRatios(log_prob, batch["old_log_prob"].to(self.device).float(),
                                         batch["advantages"].to(self.device), kl, batch["weight"].to(self.device)))

    def final_evaluation(self, epoch: int) -> dict[str, float]:
        return self.source.evaluation_due(self.backbone.unet, epoch, self.accelerator.autocast, final=True)

    def take_metrics(self) -> dict[str, float]:
        """The round's metrics (reward, advantages, timings), once: with the first optimizer step that trains on it."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    # ----- resume -----
    def save(self, folder: Path) -> None:
        """The round's rollouts, scores and advantages, and the objective's state (DDPO's per-prompt statistics,
        already updated with this round), so a resume mid-round trains on exactly the same items."""
        self.source.guard.save(folder)
        if self.round is None:
            return
        self.round.rollouts.save(folder / ROUND_FILE)
        state = {"index": self.round.index, "scores": self.round.scores.tolist(),
                 "advantages": self.round.advantages.tolist(), "metrics": self.round.metrics,
                 "objective": self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}}
        atomic_write_text(folder / ROUND_STATE, json.dumps(state))

    def restore(self, folder: Path, epoch: int) -> None:
        self.source.guard.restore(folder)
        if not (folder / ROUND_STATE).is_file():
            return  # checkpointed before the first round
        state = json.loads((folder / ROUND_STATE).read_text())
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])
        self.round = RewardedRound(state["index"], Rollouts.load(folder / ROUND_FILE), torch.tensor(state["scores"]),
                                   torch.tensor(state["advantages"], dtype=torch.float32), state["metrics"])
