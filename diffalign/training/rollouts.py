"""Where D3PO's training items come from: online rounds (sample → score → pair) or stored, human-labelled
rollouts (``diffalign sample`` + a label file).

A round yields micro-batches of ``(pair, step)`` items: for pair (w, l) of one prompt and denoising step j,
``x_t`` and the stored ``x_{t-1}`` of both samples. The trainer turns each into the per-step D3PO loss. One
micro-batch holds ``train.batch_size`` pairs at one of their trained steps, and the micro-batches of those pairs'
other trained steps follow it, so one optimizer update spans every trained step of specific pairs.

With several processes every rank samples and scores its own prompts, the ranks then gather one shared round,
and each rank trains on its own slice of the round's items: every rank runs the same number of micro-batches
(so the gradient all-reduces line up) and no item is trained twice except the few that pad the last slice.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data.errors import DataError
from ..data.prompts import read_prompts
from ..lora import reference_mode
from ..models import Backbone, Conditioning, default_resolution
from ..objectives.base import StepLogProbs
from ..objectives.d3po import rollout_pairs
from ..rewards import load_rewards, parse_reward_options, score
from ..sampling.settings import Sampling
from ..sampling.trajectories import Rollouts, ddim_scheduler, guided_prediction, sample_rollouts
from .logprob import ddim_step_distribution, gaussian_log_prob, step_stds, step_weights
from .reward_guard import RewardGuard

log = logging.getLogger(__name__)
ROUND_FILE = "rollouts.safetensors"


@dataclass
class Round:
    """One round's rollouts, the pairs drawn from them, and their metrics."""

    index: int
    rollouts: Rollouts
    pairs: list[tuple[int, int, int]]
    metrics: dict[str, float]


def position_generator(seed: int, rank: int, *key: int, shared: bool = False) -> torch.Generator:
    """A CPU generator seeded by ``seed`` (``train.seed``), the position ``key`` (round, micro-batch, ...) and the
    rank (``shared``: the same on every rank), so a resume at that position draws the same numbers."""
    for k in (*key, 0 if shared else rank):
        seed = seed * 1_000_003 + k
    return torch.Generator().manual_seed(seed % (2**63))


class RolloutSource:
    """Rounds of rollouts: online sampling and scoring (``data.prompts`` + ``objective.reward``; D3PO, DDPO,
    GRPO share it, :meth:`sample_round`), or stored rollouts with human labels (``data.labels``, D3PO), and D3PO's
    pairs and micro-batches of them."""

    def __init__(self, cfg: Config, shared_noise: bool = True, labels_allowed: bool = True):
        """Read the prompts or the labelled rollouts and build the reward heads: bad data fails before the
        diffusion model loads. ``shared_noise``: a prompt's samples start from one x_T (D3PO); else each from its
        own."""
        name = cfg.objective.name
        if cfg.data.labels and not labels_allowed:
            raise DataError(f"data.labels: objective {name!r} trains on online rollouts scored by objective.reward; "
                            "human labels of stored rollouts train objective.name=d3po")
        self.shared_noise = shared_noise
        self.cfg, o = cfg, cfg.objective
        # the rollouts' steps, guidance and η: the sampling section's, or those the stored trajectories were drawn with
        self.sampling = cfg.sampling
        self.stored, self.rewards, self.eval_prompts = None, {}, []
        if cfg.data.labels:
            from ..sampling.human import load_labelled_rollouts

            if getattr(o, "guard", None):
                raise ConfigError(f"objective.guard={o.guard}: a guard scores samples drawn during training; with "
                                  "data.labels (stored, human-labelled rollouts) nothing is drawn", ("objective.guard",))

            self.stored, scores, settings = load_labelled_rollouts(cfg.data.labels, cfg.data.rollouts or None)
            self.sampling = Sampling(steps=settings["steps"], guidance=settings["guidance"], eta=settings["eta"])
            log.info("%s: steps, guidance and η of the stored trajectories (%d, %g, %g), not the sampling section's",
                     cfg.data.labels, settings["steps"], settings["guidance"], settings["eta"])
            self.stored_pairs = rollout_pairs(scores.unsqueeze(-1))
            if not self.stored_pairs:
                raise DataError(f"{cfg.data.labels}: every prompt's samples tie; no pair to train on")
        elif cfg.data.prompts:
            if not o.reward:
                raise DataError(f"objective.reward is empty; online {name} needs a reward head to score its rollouts")
            self.prompts = read_prompts(cfg.data.prompts)
            self.eval_prompts = read_prompts(cfg.data.eval_prompts) if cfg.data.eval_prompts else []
            self.rewards = load_rewards(o.reward, parse_reward_options(o.reward_options))
        else:
            raise DataError(f"objective.name={name} needs data.prompts (online, with objective.reward)" +
                            (" or data.labels (human feedback on `diffalign sample` output)" if labels_allowed else ""))
        self.guard = RewardGuard(cfg)
        self.steps, self.guidance = self.sampling.steps, self.sampling.guidance
        self.eta = self.sampling.trajectory_eta()

    @property
    def needs_text_encoders(self) -> bool:
        return self.stored is None

    def bind(self, backbone: Backbone, resolution: int, rank: int = 0, world: int = 1,
             gather: Callable[[Rollouts, torch.Tensor], tuple[Rollouts, torch.Tensor]] | None = None) -> None:
        """Attach the model: the DDIM scheduler of its noise schedule and the unconditional embedding; with several
        processes, this rank's index, their number and how to gather every rank's rollouts and scores."""
        self.backbone, self.resolution, self.rank, self.world, self.gather = backbone, resolution, rank, world, gather
        self.scheduler = ddim_scheduler(backbone, self.steps)
        self.trainable_steps = self._trainable_steps()
        self.trained_steps = max(1, round(self.cfg.objective.timestep_fraction * len(self.trainable_steps)))
        rule = getattr(self.cfg.objective, "step_weighting", "none")  # a plug-in rollout objective may not have it
        self.step_weight = step_weights(self.scheduler, self.eta, rule, self.trainable_steps)
        if rule != "none":
            log.info("objective.step_weighting=%s: the trained steps' losses are weighted %s (t = %s)", rule,
                     [round(self.step_weight[j].item(), 3) for j in self.trainable_steps],
                     [int(self.scheduler.timesteps[j]) for j in self.trainable_steps])
        negative = self.sampling.negative_prompt
        self.negative = self.stored.negative if self.stored is not None else self.backbone.at_resolution(
            self.backbone.encode_negative(negative), self.resolution)

    def _trainable_steps(self) -> list[int]:
        """The steps that may be trained: every step, or those whose noise std is at least
        ``objective.min_step_std``."""
        floor = getattr(self.cfg.objective, "min_step_std", 0.0)  # a plug-in rollout objective may not have it
        stds = step_stds(self.scheduler, self.eta).tolist()
        keep = [j for j, std in enumerate(stds) if std >= floor]
        if not keep:
            raise ConfigError(f"objective.min_step_std={floor!r} leaves no step to train: the {self.steps} steps' noise "
                              f"std is at most {max(stds):.4g}", ("objective.min_step_std",))
        if len(keep) < self.steps:
            skipped = [j for j in range(self.steps) if j not in keep]
            log.info("objective.min_step_std=%g: %d of %d steps are sampled but not trained (t = %s, noise std %s)",
                     floor, len(skipped), self.steps, [int(self.scheduler.timesteps[j]) for j in skipped],
                     [round(stds[j], 4) for j in skipped])
        return keep

    def draw_steps(self, generator: torch.Generator) -> list[int]:
        """``trained_steps`` of the trainable steps, drawn at random (every step, in random order, by default)."""
        pick = torch.randperm(len(self.trainable_steps), generator=generator)[: self.trained_steps]
        return [self.trainable_steps[i] for i in pick.tolist()]

    def _encode(self, prompts: list[str]) -> Conditioning:
        return self.backbone.at_resolution(self.backbone.encode_prompt(prompts), self.resolution)

    def _generator(self, *key: int, shared: bool = False) -> torch.Generator:
        return position_generator(self.cfg.train.seed, self.rank, *key, shared=shared)

    # ----- rounds -----
    def new_round(self, index: int, unet, autocast=None) -> Round:
        """Round ``index``: sample and score with the current policy (online), or reuse the stored rollouts."""
        if self.stored is not None:
            return Round(index, self.stored, self.stored_pairs, {"pairs": float(len(self.stored_pairs))})
        rollouts, scores, metrics = self.sample_round(index, unet, autocast)
        pairs = rollout_pairs(scores, self.higher_is_better)
        return Round(index, rollouts, pairs, {**metrics, "pairs": float(len(pairs))})

    @property
    def higher_is_better(self) -> list[bool]:
        return [r.higher_is_better for r in self.rewards.values()]

    def sample_round(self, index: int, unet, autocast=None) -> tuple[Rollouts, torch.Tensor, dict[str, float]]:
        """Round ``index``'s rollouts, their scores [P, K, heads] and metrics: this rank's prompts sampled with the
        current policy and scored, then (several processes) every rank's gathered into the one shared round."""
        g = self._generator(index, 0)
        n = self.cfg.objective.prompts_per_round
        picks = torch.randint(len(self.prompts), (n,), generator=g).tolist()
        prompts = [self.prompts[i] for i in picks]
        start = time.perf_counter()
        rollouts = self._sample(unet, prompts, g, autocast)
        sampled = time.perf_counter()
        scores = self._score(rollouts)
        if self.gather is not None:
            rollouts, scores = self.gather(rollouts, scores)
        metrics = self._score_metrics(scores)
        metrics.update(time_sampling=sampled - start, time_scoring=time.perf_counter() - sampled,
                       samples=float(scores.shape[0] * scores.shape[1]))
        return rollouts, scores, metrics

    def _sample(self, unet, prompts: list[str], generator: torch.Generator, autocast=None,
                per_prompt: int | None = None) -> Rollouts:
        was_training = unet.training
        unet.eval()
        try:
            return sample_rollouts(self.backbone, unet, prompts, self._encode(prompts), self.negative,
                                   per_prompt or self.cfg.objective.per_prompt, self.sampling, self.resolution,
                                   generator, autocast=autocast, shared_noise=self.shared_noise)
        finally:
            unet.train(was_training)

    def _score(self, rollouts: Rollouts) -> torch.Tensor:
        """Scores [P, K, heads] of a round's images."""
        p, k = rollouts.latents.shape[:2]
        images = rollouts.images.reshape(p * k, *rollouts.images.shape[2:])
        texts = [t for t in rollouts.prompts for _ in range(k)]
        with torch.no_grad():
            heads = [score(r, images, texts).cpu() for r in self.rewards.values()]
        return torch.stack(heads, dim=-1).reshape(p, k, len(heads))

    def _score_metrics(self, scores: torch.Tensor) -> dict[str, float]:
        """The mean (and spread) of each head over a round's scores [P, K, heads]."""
        metrics = {}
        for i, name in enumerate(self.rewards):
            metrics[f"reward_{name}"] = scores[..., i].mean().item()
            metrics[f"reward_{name}_std"] = scores[..., i].std(unbiased=False).item()
        return metrics

    def evaluation_due(self, unet, index: int, autocast=None, final: bool = False) -> dict[str, float]:
        """The evaluation before round ``index`` where one is due (every ``objective.eval_every`` rounds) or, with
        ``final``, of the final adapter after the last round; nothing when the run does not evaluate."""
        every = self.cfg.objective.eval_every
        return self.evaluate(unet, index, autocast) if every and (final or index % every == 0) else {}

    @torch.no_grad()
    def evaluate(self, unet, index: int, autocast=None) -> dict[str, float]:
        """Mean reward (and guard, which may stop the run: training/reward_guard.py) of one sample per held-out
        prompt, with fixed noise (the same every evaluation), before round ``index``."""
        if not self.eval_prompts:
            return {}
        # the same noise on every rank, so every rank logs the same number (and every rank's guard agrees)
        rollouts = self._sample(unet, self.eval_prompts, self._generator(-1, shared=True), autocast, per_prompt=1)
        metrics = {f"eval_{k}": v for k, v in self._score_metrics(self._score(rollouts)).items()}
        images = rollouts.images.reshape(-1, *rollouts.images.shape[2:])
        return {**metrics, **self.guard.check(images, list(rollouts.prompts), unet, index)}

    def batches(self, rnd: Round, batch_size: int) -> list[dict]:
        """This rank's micro-batches of the round: the pairs in a seeded order, ``batch_size`` at a time, and for
        each such group one micro-batch per trained step (``trained_steps`` of its steps, a random subset drawn
        per pair). As in the official code, an accumulation window (``grad_accum × trained_steps`` micro-batches)
        therefore holds every trained step of ``batch_size × grad_accum`` specific pairs. The pair order is the
        same on every rank and each rank takes its own slice of it; the last slices are padded from the start of
        the order (as torch's ``DistributedSampler`` does), so every rank runs the same number of micro-batches."""
        g = self._generator(rnd.index, 1, shared=True)
        steps = [sorted(self.draw_steps(g)) for _ in rnd.pairs]
        order = torch.randperm(len(rnd.pairs), generator=g).tolist()
        if self.world > 1 and order:
            per_rank = -(-len(order) // self.world)
            order = (order * self.world)[: per_rank * self.world][self.rank :: self.world]
        return [self._batch(rnd, [(i, steps[i][k]) for i in order[s : s + batch_size]])
                for s in range(0, len(order), batch_size) for k in range(self.trained_steps)]

    def _batch(self, rnd: Round, items: list[tuple[int, int]]) -> dict:
        r = rnd.rollouts
        prompt = torch.tensor([rnd.pairs[i][0] for i, _ in items])
        win = torch.tensor([rnd.pairs[i][1] for i, _ in items])
        lose = torch.tensor([rnd.pairs[i][2] for i, _ in items])
        step = torch.tensor([j for _, j in items])
        both = (torch.cat([prompt, prompt]), torch.cat([win, lose]), torch.cat([step, step]))
        return {"x_t": r.latents[both[0], both[1], both[2]], "x_prev": r.latents[both[0], both[1], both[2] + 1],
                "t": r.timesteps[both[2]], "cond": r.cond.select(both[0]), "weight": self.step_weight[step],
                "items": items}

    # ----- resume -----
    def save_round(self, rnd: Round, folder: Path) -> None:
        """Online rounds go into the checkpoint, so a resume mid-round trains on exactly the same samples."""
        if self.stored is None:
            rnd.rollouts.save(folder / ROUND_FILE)

    def load_round(self, index: int, folder: Path) -> Round:
        if self.stored is not None:
            return self.new_round(index, None)
        rollouts = Rollouts.load(folder / ROUND_FILE)
        scores = self._score(rollouts)
        pairs = rollout_pairs(scores, self.higher_is_better)
        return Round(index, rollouts, pairs, {**self._score_metrics(scores), "pairs": float(len(pairs))})


def online_resolution(cfg: Config) -> int:
    """The training resolution online objectives sample at (square); a sampling size other than it is refused."""
    m = cfg.model
    resolution = cfg.data.resolution or default_resolution(m.pretrained, m.revision)
    if cfg.sampling.size(resolution) != (resolution, resolution):
        raise ConfigError(f"sampling.height/width={cfg.sampling.size(resolution)}: online rollouts are drawn square at "
                          f"the training resolution ({resolution}); set data.resolution instead",
                          ("sampling.height", "sampling.width"))
    return resolution


def attach_model(source: RolloutSource, cfg: Config, accelerator, weight_dtype: torch.dtype, objective_cls):
    """Load the backbone for online rollouts (text encoders only when prompts are encoded), build the objective,
    place everything on the device and bind ``source`` to them: ``(backbone, resolution, objective)``."""
    m = cfg.model
    resolution = online_resolution(cfg)
    need_text = source.needs_text_encoders or bool(cfg.train.validation_prompts)
    backbone = Backbone.load(m.pretrained, m.vae, m.prediction_type, m.revision, weight_dtype, text_encoders=need_text)
    objective = objective_cls(cfg.objective.options, num_timesteps=backbone.scheduler.config.num_train_timesteps)
    backbone.to(accelerator.device)
    gather = functools.partial(gather_round, accelerator.device) if accelerator.num_processes > 1 else None
    source.bind(backbone, resolution, accelerator.process_index, accelerator.num_processes, gather)
    return backbone, resolution, objective


def gather_round(device, rollouts: Rollouts, scores: torch.Tensor) -> tuple[Rollouts, torch.Tensor]:
    """Every rank's rollouts and scores, concatenated in rank order (the same round on every rank)."""
    from accelerate.utils import gather, gather_object

    def cat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else gather(t.to(device)).cpu()

    r = rollouts
    cond = Conditioning(cat(r.cond.prompt_embeds), cat(r.cond.pooled), cat(r.cond.time_ids))
    return (Rollouts(gather_object(list(r.prompts)), cat(r.latents), r.timesteps, cat(r.log_probs), cond,
                     r.negative, cat(r.images)), cat(scores))


def guided_log_prob(source: RolloutSource, model, batch: dict, device, autocast):
    """``(log π(x_prev | x_t), μ, std)`` of a micro-batch's stored steps under ``model``, CFG in the forward exactly
    as in sampling."""
    x_t, x_prev, t = batch["x_t"].to(device), batch["x_prev"].to(device), batch["t"].to(device)
    with autocast():
        eps = guided_prediction(source.backbone, model, x_t, t, batch["cond"].to(device), source.negative.to(device),
                                source.guidance)
    mean, std = ddim_step_distribution(source.scheduler, eps.float(), t, x_t, eta=source.eta)
    return gaussian_log_prob(x_prev, mean, std), mean, std


class RolloutFeed:
    """The feed of objectives whose ``data`` is ``rollouts`` (D3PO): an epoch is a round (sample, score, pair), a
    micro-batch ``train.batch_size`` pairs at one denoising step, its loss the objective's on the per-step
    log-probabilities of policy and reference. Implements :class:`~diffalign.training.feeds.Feed`."""

    def __init__(self, cfg: Config, accelerator, weight_dtype: torch.dtype, objective_cls) -> None:
        """Prompts and rewards (online) or labelled trajectories (human feedback), then the backbone."""
        self.cfg, self.accelerator, self.device = cfg, accelerator, accelerator.device
        self.source = RolloutSource(cfg)  # bad data fails before the model loads
        self.backbone, self.resolution, self.objective = attach_model(self.source, cfg, accelerator, weight_dtype,
                                                                      objective_cls)
        self.vae_device = self.device
        # one optimizer update spans every trained step of grad_accum micro-batches of pairs
        self.window = self.source.trained_steps
        self.round: Round | None = None
        self._metrics: dict[str, float] = {}
        self._idle_rounds = 0  # consecutive rounds without a pair

    def ready(self) -> None:
        """Nothing to drop or place: sampling needs every part on the device."""

    def batches(self, epoch: int, skip: int = 0) -> list[dict]:
        """The micro-batches of round ``epoch`` (sampled and scored on first use), without the first ``skip``."""
        if self.round is None or self.round.index != epoch:
            self.round = self._new_round(epoch)
        return self.source.batches(self.round, self.cfg.train.batch_size)[skip:]

    def loss(self, unet, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-step log-probabilities of the stored ``x_{t-1}`` under the policy ``unet`` and the reference, with
        CFG in the forward exactly as in sampling (winners and losers in one batch), into the objective."""
        def log_probs(model) -> tuple[torch.Tensor, torch.Tensor]:
            return guided_log_prob(self.source, model, batch, self.device, self.accelerator.autocast)[0].chunk(2)

        logp_w, logp_l = log_probs(unet)
        with torch.no_grad(), reference_mode(self.accelerator.unwrap_model(unet)):
            ref_w, ref_l = log_probs(unet)
        return self.objective(StepLogProbs(logp_w, ref_w, logp_l, ref_l, batch["weight"].to(self.device)))

    def _new_round(self, index: int) -> Round:
        """Evaluate (every ``eval_every`` rounds), then sample and score round ``index`` with the current policy."""
        unet = self.backbone.unet
        metrics = self.source.evaluation_due(unet, index, self.accelerator.autocast)
        rnd = self.source.new_round(index, unet, self.accelerator.autocast)
        self._idle_rounds = 0 if rnd.pairs else self._idle_rounds + 1
        if self._idle_rounds >= 5:
            raise DataError(f"5 rounds in a row without a pair: the reward ties on every sample ({rnd.metrics})")
        self._metrics = {**rnd.metrics, **metrics, "round": float(index)}
        return rnd

    def final_evaluation(self, epoch: int) -> dict[str, float]:
        return self.source.evaluation_due(self.backbone.unet, epoch, self.accelerator.autocast, final=True)

    def take_metrics(self) -> dict[str, float]:
        """The round's metrics (reward, pairs, timings), once: with the first optimizer step that trains on it."""
        metrics, self._metrics = self._metrics, {}
        return metrics

    def save(self, folder: Path) -> None:
        """The current round's rollouts and the guard's state go into the checkpoint."""
        if self.round is not None:
            self.source.save_round(self.round, folder)
        self.source.guard.save(folder)

    def restore(self, folder: Path, epoch: int) -> None:
        """Resume mid-round on exactly the checkpointed samples."""
        self.round = self.source.load_round(epoch, folder)
        self.source.guard.restore(folder)
