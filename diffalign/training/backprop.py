"""The feed of reward backprop (``data = "prompts"``): each micro-batch samples ``train.batch_size`` prompts with
the policy, carrying gradients through the last K DDIM steps and the VAE decode into a differentiable reward.

Nothing is stored: a micro-batch's prompts and noise come from ``train.seed``, its position and the rank, so a
resume draws exactly what the uninterrupted run would. An epoch is one optimizer update (``train.grad_accum``
micro-batches). Sampling follows the ``sampling`` section (DDIM; η 0 unless ``sampling.eta`` says otherwise, as
DRaFT and AlignProp sample), CFG included, under the accelerator's autocast.

Every ``objective.eval_every`` updates the mean reward of one fixed-noise sample per ``data.eval_prompts``
prompt is logged (``eval_reward_<head>``), and so is every guard head (``eval_guard_<head>``): the reward-hacking
guard (training/reward_guard.py). A guard falling more than ``objective.guard_margin`` below its first evaluation
stops training, with the adapter of the last evaluation where every guard held.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ..config import Config, ConfigError
from ..data.errors import DataError
from ..data.prompts import read_prompts
from ..models import Backbone
from ..rewards import load_rewards, parse_reward_options, score
from ..rewards.combine import signed
from ..sampling.trajectories import ddim_scheduler, guided_prediction
from .reward_guard import RewardGuard
from .rollouts import online_resolution, position_generator


class RewardBackpropFeed:
    """Micro-batches of prompts; the loss is the objective's on the rewards of images sampled with gradients in
    the last K steps. Implements :class:`~diffalign.training.feeds.Feed`."""

    window = 1

    def __init__(self, cfg: Config, accelerator, weight_dtype: torch.dtype, objective_cls) -> None:
        self.cfg, self.accelerator, self.device = cfg, accelerator, accelerator.device
        o, d = cfg.objective.options, cfg.data
        name = cfg.objective.name
        if d.labels or not d.prompts:
            raise DataError(f"objective.name={name} needs data.prompts (online, with objective.reward); it does not "
                            "train on data.labels or data.dataset")
        if not o.reward:
            raise DataError(f"objective.reward is empty; {name} needs a differentiable reward head to maximise")
        self.prompts = read_prompts(d.prompts)
        self.eval_prompts = read_prompts(d.eval_prompts) if d.eval_prompts else []
        self.rewards = load_rewards(o.reward, parse_reward_options(o.reward_options))
        for head, reward in self.rewards.items():
            if not getattr(reward, "differentiable", False):
                raise ConfigError(f"objective.reward: head {head!r} is not differentiable (its `differentiable` is "
                                  f"False); {name} needs the reward's gradient. Use a differentiable head, or an "
                                  "online objective that only needs scores (ddpo, grpo, d3po)", ("objective.reward",))
        self.guard = RewardGuard(cfg)
        m = cfg.model
        self.resolution = online_resolution(cfg)
        self.backbone = Backbone.load(m.pretrained, m.vae, m.prediction_type, m.revision, weight_dtype)
        self.objective = objective_cls(o, num_timesteps=self.backbone.scheduler.config.num_train_timesteps)
        self.backbone.to(self.device)
        self.vae_device = self.device
        self.sampling = cfg.sampling
        self.eta = cfg.sampling.eta or 0.0
        self.scheduler = ddim_scheduler(self.backbone, cfg.sampling.steps)
        self.negative = self.backbone.at_resolution(self.backbone.encode_negative(cfg.sampling.negative_prompt),
                                                   self.resolution)
        self.rank = accelerator.process_index
        self._metrics: dict[str, float] = {}

    def ready(self) -> None:
        """Nothing to drop or place: sampling needs every part on the device."""

    def _encode(self, prompts: list[str]):
        return self.backbone.at_resolution(self.backbone.encode_prompt(prompts), self.resolution)

    def _generator(self, *key: int, shared: bool = False) -> torch.Generator:
        return position_generator(self.cfg.train.seed, self.rank, *key, shared=shared)

    # ----- sampling with gradients in the last K steps -----
    def sample(self, unet, prompts: list[str], generator: torch.Generator, backprop_steps: int) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] of ``prompts``; the last ``backprop_steps`` DDIM steps and the decode
        carry gradients (when gradients are enabled at all), the earlier ones run under no_grad."""
        b, dev = self.backbone, self.device
        cond, negative = self._encode(prompts).to(dev), self.negative.to(dev)
        size = self.resolution // b.vae_scale_factor
        x = torch.randn((len(prompts), b.unet.config.in_channels, size, size), generator=generator)
        x = (x * self.scheduler.init_noise_sigma).to(dev)
        steps, use_checkpoint = len(self.scheduler.timesteps), self.cfg.objective.options.checkpointing
        tracking = torch.is_grad_enabled()

        def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.accelerator.autocast():
                return guided_prediction(b, unet, x_t, t, cond, negative, self.sampling.guidance).float()

        for j, t in enumerate(self.scheduler.timesteps):
            grad = tracking and j >= steps - backprop_steps
            with torch.set_grad_enabled(grad):
                t_batch = t.expand(len(x)).to(dev)
                eps = checkpoint(guided, x, t_batch, use_reentrant=False) if grad and use_checkpoint else guided(x, t_batch)
                x = self.scheduler.step(eps, t, x.float(), eta=self.eta, generator=generator).prev_sample
        with torch.set_grad_enabled(tracking):
            return checkpoint(b.decode, x, use_reentrant=False) if tracking and use_checkpoint else b.decode(x)

    def _scores(self, heads: dict, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.stack([score(r, images, prompts, name) for name, r in heads.items()], dim=-1)

    # ----- the feed -----
    def batches(self, epoch: int, skip: int = 0) -> list[dict]:
        """Epoch ``epoch`` is one optimizer update: ``train.grad_accum`` micro-batches of prompts (evaluated first,
        every ``objective.eval_every`` updates)."""
        every, t = self.cfg.objective.options.eval_every, self.cfg.train
        if every and epoch % every == 0 and skip == 0:
            self._metrics.update(self.evaluate(self.backbone.unet, epoch))
        self._metrics["samples"] = float(t.batch_size * t.grad_accum * self.accelerator.num_processes)
        batches = []
        for i in range(self.cfg.train.grad_accum):
            g = self._generator(epoch, i)
            picks = torch.randint(len(self.prompts), (self.cfg.train.batch_size,), generator=g).tolist()
            batches.append({"prompts": [self.prompts[p] for p in picks], "position": (epoch, i)})
        return batches[skip:]

    def loss(self, unet, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Sample with gradients in the last K steps, decode, score, and hand the signed rewards to the objective."""
        g = self._generator(*batch["position"], 1)
        k = self.objective.steps_with_gradient(g)
        images = self.sample(unet, batch["prompts"], g, k)
        scores = self._scores(self.rewards, images, batch["prompts"])
        loss, metrics = self.objective(signed(scores, [r.higher_is_better for r in self.rewards.values()]))
        metrics.update({f"reward_{n}": scores[:, i].mean().item() for i, n in enumerate(self.rewards)},
                       backprop_steps=float(k))
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, unet, epoch: int) -> dict[str, float]:
        """Mean reward and guard of one fixed-noise sample per held-out prompt, before update ``epoch``; stops on
        a guard fall (:class:`~diffalign.training.reward_guard.GuardFell`)."""
        if not self.eval_prompts:
            return {}
        was_training = unet.training
        unet.eval()
        try:
            images = self.sample(unet, self.eval_prompts, self._generator(-1, shared=True), 0)
        finally:
            unet.train(was_training)
        metrics = {f"eval_reward_{n}": v.mean().item() for n, v in
                   zip(self.rewards, self._scores(self.rewards, images, self.eval_prompts).unbind(-1))}
        return {**metrics, **self.guard.check(images, self.eval_prompts, unet, epoch)}

    def final_evaluation(self, epoch: int) -> dict[str, float]:
        """The evaluation of the final adapter, when the run evaluates at all."""
        return self.evaluate(self.backbone.unet, epoch) if self.cfg.objective.options.eval_every else {}

    def take_metrics(self) -> dict[str, float]:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def save(self, folder: Path) -> None:
        """The guard's state (its first evaluation and the adapter to hand back); everything else is drawn from
        seeds."""
        self.guard.save(folder)

    def restore(self, folder: Path, epoch: int) -> None:
        self.guard.restore(folder)
