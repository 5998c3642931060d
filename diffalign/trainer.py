"""The one training loop: preference pairs -> LoRA adapter, on accelerate.

Each step draws one timestep and one noise per pair (shared by winner and loser), runs winners and
losers as one 2B batch through the UNet, runs the reference (same UNet, adapters off) when the
objective needs it, and hands per-pair errors to the objective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .data.cache import WithTrajectories, build_cache, build_trajectory_cache, cache_folder, is_complete
from .data.dataset import RawPairDataset, batch_conditioning, encode_batch
from .data.readers import DataError, load_pairs
from .logprob import ddim_step_log_prob
from .lora import add_lora, atomic_write_text, reference_mode, save_lora
from .models import Backbone, Conditioning, model_fingerprint, model_kind
from .noising import ddim_invert, finish_inversion, invert_to_shared_levels, inverted_noise
from .objectives.base import PairErrors
from .online import RolloutSource, Round
from .optim import build_optimizer
from .registry import objective_class
from .rollout import guided_prediction

log = logging.getLogger(__name__)


class OutputDirError(OSError):
    """``train.output_dir`` cannot be written."""


def check_writable(path: Path) -> None:
    """Fail early, without creating anything, when ``path`` cannot be created or written."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"train.output_dir={str(path)!r} is not writable ({probe} is not a writable folder)")


@dataclass
class TrainResult:
    output_dir: Path
    adapter: Path
    steps: int
    history: list[dict] = field(default_factory=list)  # metrics per optimizer step


class Trainer:
    """Builds everything a run needs from a :class:`Config`; :meth:`train` runs it."""

    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        check_writable(self.output_dir)
        # accelerate keeps one process-wide state; a second run in one process (a notebook, the tests) may use
        # another precision. The distributed state (PartialState) is kept.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=None if cfg.log.to == "none" else cfg.log.to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
        objective_cls = objective_class(cfg.objective)  # an unknown name fails before anything loads
        self.source: RolloutSource | None = None
        self._round: Round | None = None
        self._round_metrics: dict[str, float] = {}
        self._idle_rounds = 0  # consecutive D3PO rounds without a pair
        if objective_cls.data == "rollouts":
            self._init_rollouts(objective_cls)
        else:
            self._init_pairs(objective_cls)
        self._prepare_optimization()

    def _init_pairs(self, objective_cls) -> None:
        """Offline objectives: pairs (cached or raw), the backbone, the optional inversion cache."""
        cfg = self.cfg
        m, d = cfg.model, cfg.data
        raw_pairs = load_pairs(d)  # bad data fails before the model loads
        self.resolution = d.resolution or (1024 if model_kind(m.pretrained, m.revision) == "sdxl" else 512)
        raw = RawPairDataset(raw_pairs, self.resolution, cfg.train.seed, d.random_flip, d.center_crop)
        self.score_range = raw_pairs.score_range() if objective_cls.data == "soft_pairs" else None
        cache = None
        if cfg.cache.enabled:
            root = Path(cfg.cache.dir) if cfg.cache.dir else None
            cache = cache_folder(model_fingerprint(m.pretrained, m.vae, m.revision), raw, cfg.cache.dtype, root)
        # With a complete cache and nothing to validate, the text encoders are never loaded at all.
        need_text = cache is None or not is_complete(cache) or bool(cfg.train.validation_prompts)
        self.backbone = Backbone.load(m.pretrained, m.vae, m.prediction_type, m.revision, self.weight_dtype,
                                      text_encoders=need_text)
        self.objective = objective_cls(cfg.objective, num_timesteps=self.backbone.scheduler.config.num_train_timesteps)
        self.dataset, self.empty_prompt = self._prepare_data(raw, cache)
        self.validation_cond = self._validation_conditioning()
        if cfg.cache.enabled:
            self.backbone.free_encoders()
        self.backbone.unet.to(self.device)
        if cfg.objective.inversion_cache and self.objective.noising != "forward":
            self.dataset = self._with_trajectories(self.dataset)  # before LoRA: the UNet is the reference
        # From the cache the VAE only decodes validation images: keep it off the accelerator until then.
        self.vae_device = torch.device("cpu") if cfg.cache.enabled else self.device
        self.backbone.vae.to(self.vae_device)

    def _init_rollouts(self, objective_cls) -> None:
        """D3PO: prompts and rewards (online) or labelled trajectories (human feedback), then the backbone."""
        cfg, m = self.cfg, self.cfg.model
        if self.accelerator.num_processes > 1:
            # each rank's round has its own number of pairs, so the ranks' backward passes would not line up
            raise ConfigError("objective.name=d3po runs in one process for now; launch it without "
                              "--num_processes (several processes are planned)")
        self.source = RolloutSource(cfg)  # bad data fails before the model loads
        self.resolution = cfg.data.resolution or (1024 if model_kind(m.pretrained, m.revision) == "sdxl" else 512)
        need_text = self.source.needs_text_encoders or bool(cfg.train.validation_prompts)
        self.backbone = Backbone.load(m.pretrained, m.vae, m.prediction_type, m.revision, self.weight_dtype,
                                      text_encoders=need_text)
        self.objective = objective_cls(cfg.objective, num_timesteps=self.backbone.scheduler.config.num_train_timesteps)
        for part in (self.backbone.unet, self.backbone.vae, *self.backbone.text_encoders):
            part.to(self.device)
        self.vae_device, self.score_range = self.device, None
        self.source.bind(self.backbone, self.resolution, self.accelerator.process_index)
        self.validation_cond = self._validation_conditioning()
        # one optimizer update spans every trained step of grad_accum micro-batches of pairs
        self.accelerator.gradient_accumulation_steps = cfg.train.grad_accum * self.source.trained_steps

    def _prepare_optimization(self) -> None:
        """LoRA adapters, optimizer and LR schedule, handed to accelerate."""
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        self.lora_params = add_lora(self.backbone.unet, cfg.lora)
        if cfg.train.gradient_checkpointing:
            self.backbone.unet.enable_gradient_checkpointing()
        self.optimizer = build_optimizer(self.lora_params, cfg.optim)
        # accelerate steps a prepared schedule once per process per optimizer step
        n = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(cfg.optim.scheduler, self.optimizer, num_warmup_steps=cfg.optim.warmup_steps * n,
                                          num_training_steps=cfg.train.max_steps * n)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.backbone.unet, self.optimizer, self.lr_scheduler)

    # ----- data -----
    def _prepare_data(self, raw: RawPairDataset, cache: Path | None) -> tuple[torch.utils.data.Dataset, Conditioning]:
        d, b = self.cfg.data, self.backbone
        for enc in b.text_encoders:
            enc.to(self.device)
        if cache is not None:
            if not is_complete(cache):
                b.vae.to(self.device)
            with self.accelerator.main_process_first():
                cached = build_cache(b, raw, cache, self.cfg.cache.dtype, d.on_bad_image)
            return cached, cached.empty_prompt()
        b.vae.to(self.device)
        raw.drop_bad_rows(d.on_bad_image)
        return raw, b.encode_prompt([""])

    def _validation_conditioning(self) -> tuple[Conditioning, Conditioning] | None:
        prompts = self.cfg.train.validation_prompts
        if not prompts:
            return None
        return self.backbone.encode_prompt(prompts), self.backbone.encode_prompt([""] * len(prompts))

    def _epoch_loader(self, epoch: int) -> DataLoader:
        """Batches of one epoch: a seeded permutation, sharded across processes by accelerate."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch))
        loader = DataLoader(Subset(self.dataset, order.tolist()), batch_size=self.cfg.train.batch_size,
                            num_workers=self.cfg.data.num_workers if isinstance(self.dataset, RawPairDataset) else 0)
        return self.accelerator.prepare_data_loader(loader, device_placement=False)

    def encoded(self, batch: dict) -> dict:
        """The encoded form of a batch (a no-op for cached batches)."""
        if "latents_w" in batch:
            return batch
        return encode_batch(self.backbone, batch, self.resolution)

    # ----- one step -----
    def _generator(self, micro_step: int) -> torch.Generator:
        rank = self.accelerator.process_index
        return torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + micro_step) * 1009 + rank)

    def compute_loss(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and metrics of one encoded batch; noise, timesteps and caption dropout come from a generator
        seeded by ``(seed, micro_step, rank)``, so runs and resumes are reproducible."""
        b, dev = self.backbone, self.device
        z_w, z_l = batch["latents_w"].to(dev, torch.float32), batch["latents_l"].to(dev, torch.float32)
        n = len(z_w)
        g = self._generator(micro_step)
        t = torch.randint(0, b.scheduler.config.num_train_timesteps, (n,), generator=g)
        noise = torch.randn(z_w.shape, generator=g)
        drop = torch.rand(n, generator=g) < self.cfg.data.caption_dropout
        t, noise = t.to(dev), noise.to(dev)
        cond = batch_conditioning(b, batch, self.resolution)
        if drop.any():
            cond = cond.where(drop, self.empty_prompt.repeat(n))
        cond2 = cond.repeat(2).to(dev)
        latents = torch.cat([z_w, z_l])
        t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
        if self.objective.noising == "forward":
            x_t = b.scheduler.add_noise(latents, noise2, t2)
        else:  # InPO / SmPO: each latent's own inverted noise replaces the shared ε
            shared = torch.cat([batch["traj_w"], batch["traj_l"]]).to(dev) if "traj_w" in batch else None
            x_t = self._invert(latents, t2, cond2, shared)
            noise2 = inverted_noise(latents, x_t, t2, b.scheduler.alphas_cumprod)
        target = b.target(latents, noise2, t2).float()

        def errors(unet) -> tuple[torch.Tensor, torch.Tensor]:
            with self.accelerator.autocast():
                pred = b.predict(x_t, t2, cond2, unet=unet)
            return ((pred.float() - target) ** 2).mean(dim=(1, 2, 3)).chunk(2)

        model_w, model_l = errors(self.unet)
        ref_w = ref_l = None
        if self.objective.needs_reference:
            with reference_mode(self.accelerator.unwrap_model(self.unet)):
                ref_w, ref_l = errors(self.unet)
        scores = [None, None]
        if self.score_range is not None:
            lo, hi = self.score_range
            scores = ((batch["scores"].to(dev, torch.float32) - lo) / (hi - lo)).unbind(1)
        loss, metrics = self.objective(PairErrors(model_w, model_l, ref_w, ref_l, *scores))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at micro-step {micro_step}: {metrics}")
        return loss, metrics

    def rollout_loss(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """D3PO: per-step log-probabilities of the stored ``x_{t-1}`` under the policy and the reference, with
        CFG in the forward exactly as in sampling (winners and losers in one batch)."""
        b, s, dev = self.backbone, self.source, self.device
        x_t, x_prev, t = batch["x_t"].to(dev), batch["x_prev"].to(dev), batch["t"].to(dev)
        cond, negative = batch["cond"].to(dev), s.negative.to(dev)

        def log_probs(unet) -> tuple[torch.Tensor, torch.Tensor]:
            with self.accelerator.autocast():
                eps = guided_prediction(b, unet, x_t, t, cond, negative, s.guidance)
            return ddim_step_log_prob(s.scheduler, eps.float(), t, x_t, eta=s.eta, prev_sample=x_prev)[1].chunk(2)

        logp_w, logp_l = log_probs(self.unet)
        with torch.no_grad(), reference_mode(self.accelerator.unwrap_model(self.unet)):
            ref_w, ref_l = log_probs(self.unet)
        loss, metrics = self.objective(logp_w, ref_w, logp_l, ref_l)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at micro-step {micro_step}: {metrics}")
        return loss, metrics

    def training_step(self, batch: dict, micro_step: int) -> dict[str, float]:
        """One micro-step: encode if needed, loss, backward; on accumulation boundaries also clip and update."""
        acc = self.accelerator
        with acc.accumulate(self.unet):
            if self.source is not None:
                loss, metrics = self.rollout_loss(batch, micro_step)
            else:
                loss, metrics = self.compute_loss(self.encoded(batch), micro_step)
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.optim.max_grad_norm > 0:
                acc.clip_grad_norm_(self.lora_params, self.cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return metrics

    @torch.no_grad()
    def _invert(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                shared: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM (InPO) or ReNoise (SmPO) inversion of clean latents exactly to ``timesteps``, conditional, no CFG,
        with the policy (the official codes) or the reference (adapters off); from cached ``shared`` levels only
        the last step runs."""
        o, b = self.cfg.objective, self.backbone
        unet = self.accelerator.unwrap_model(self.unet)
        renoise = o.renoise_iters if self.objective.noising == "renoise" else 0
        context = reference_mode(unet) if o.inversion_model == "reference" else contextlib.nullcontext()
        predict = lambda x, t: b.predict(x, t, cond, unet=unet)  # noqa: E731
        alphas = b.scheduler.alphas_cumprod
        with context, self.accelerator.autocast():
            if shared is not None:
                return finish_inversion(predict, latents, shared, timesteps, alphas, o.inversion_steps, renoise)
            return ddim_invert(predict, latents, timesteps, alphas, o.inversion_steps, renoise)

    @torch.no_grad()
    def _with_trajectories(self, pairs) -> WithTrajectories:
        """Cache every latent's reference inversion at the shared levels (built once, next to the latent cache)."""
        o, b = self.cfg.objective, self.backbone
        renoise = o.renoise_iters if self.objective.noising == "renoise" else 0
        folder = pairs.folder / f"inversion-n{o.inversion_steps}-k{renoise}"

        def invert(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            cond = batch_conditioning(b, batch, self.resolution).repeat(2).to(self.device)
            z = torch.cat([batch["latents_w"], batch["latents_l"]]).to(self.device)
            with self.accelerator.autocast():
                traj = invert_to_shared_levels(lambda x, t: b.predict(x, t, cond), z, b.scheduler.alphas_cumprod,
                                               o.inversion_steps, renoise)
            return traj.chunk(2)

        with self.accelerator.main_process_first():
            return build_trajectory_cache(pairs, folder, invert, self.cfg.cache.dtype)

    # ----- the loop -----
    def train(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        step, epoch, batch_in_epoch = 0, 0, 0
        if cfg.train.resume:
            step, epoch, batch_in_epoch = self._resume(ckpt.find_resume(self.output_dir, cfg.train.resume))
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if cfg.log.to != "none":
                acc.init_trackers(cfg.log.project, config=cfg.to_flat_dict())
        history: list[dict] = []
        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="training", disable=not acc.is_local_main_process)
        pending: list[dict] = []
        self.unet.train()
        while step < cfg.train.max_steps:
            for batch in self._batches(epoch, batch_in_epoch):
                metrics = self.training_step(batch, step * cfg.train.grad_accum + len(pending))
                batch_in_epoch += 1
                pending.append(metrics)
                if not acc.sync_gradients:
                    continue
                step += 1
                logged = {k: sum(m[k] for m in pending) / len(pending) for k in pending[0]}
                logged["lr"] = self.lr_scheduler.get_last_lr()[0]
                logged.update(self._round_metrics)  # D3PO: the round's reward, pairs, timings (once)
                pending, self._round_metrics = [], {}
                history.append(logged)
                bar.update(1)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['implicit_acc']:.2f}", lr=f"{logged['lr']:.2e}")
                if cfg.log.to != "none" and step % cfg.train.log_every == 0:
                    acc.log(logged, step=step)
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self._checkpoint(step, epoch, batch_in_epoch)
                if cfg.train.validate_every and step % cfg.train.validate_every == 0:
                    self.validate(step)
                if step >= cfg.train.max_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
        bar.close()
        return self._finish(step, history)

    def _batches(self, epoch: int, skip: int):
        """The micro-batches of epoch (or D3PO round) ``epoch``, without the first ``skip`` (a resume)."""
        if self.source is None:
            loader = self._epoch_loader(epoch)
            return self.accelerator.skip_first_batches(loader, skip) if skip else loader
        if self._round is None or self._round.index != epoch:
            self._round = self._new_round(epoch)
        return self.source.batches(self._round, self.cfg.train.batch_size)[skip:]

    def _new_round(self, index: int) -> Round:
        """Evaluate (every ``eval_every`` rounds), then sample and score round ``index`` with the current policy."""
        unet, every = self.accelerator.unwrap_model(self.unet), self.cfg.objective.eval_every
        metrics = self.source.evaluate(unet, self.accelerator.autocast) if every and index % every == 0 else {}
        rnd = self.source.new_round(index, unet, self.accelerator.autocast)
        self._idle_rounds = 0 if rnd.pairs else self._idle_rounds + 1
        if self._idle_rounds >= 5:
            raise DataError(f"5 rounds in a row without a pair: the reward ties on every sample ({rnd.metrics})")
        self._round_metrics = {**rnd.metrics, **metrics, "round": float(index)}
        return rnd

    def _checkpoint(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            position = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
            extra = (lambda tmp: self.source.save_round(self._round, tmp)) if self.source is not None else None
            ckpt.save_checkpoint(self.output_dir / f"checkpoint-{step}", self._peft_state(), self.optimizer,
                                 self.lr_scheduler, self.accelerator.scaler, position, extra)
            ckpt.rotate(self.output_dir, self.cfg.train.checkpoints_keep)

    def _peft_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.accelerator.unwrap_model(self.unet)).items()}

    def _resume(self, folder: Path) -> tuple[int, int, int]:
        from peft.utils import set_peft_model_state_dict

        weights, pos = ckpt.load_checkpoint(folder, self.optimizer, self.lr_scheduler, self.accelerator.scaler)
        set_peft_model_state_dict(self.accelerator.unwrap_model(self.unet), weights)
        if self.source is not None:
            self._round = self.source.load_round(pos["epoch"], folder)
        log.info("resumed from %s at step %d", folder, pos["step"])
        return pos["step"], pos["epoch"], pos["batch_in_epoch"]

    def _finish(self, step: int, history: list[dict]) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        unet = acc.unwrap_model(self.unet)
        adapter = self.output_dir / "pytorch_lora_weights.safetensors"
        if acc.is_main_process:
            save_lora(unet, self.output_dir, self.backbone.is_sdxl)
            atomic_write_text(self.output_dir / "config.yaml", self.cfg.to_yaml())
            atomic_write_text(self.output_dir / "metrics.json", json.dumps(history, indent=1))
            self.validate(step)
            from .card import write_model_card

            write_model_card(self.output_dir, self.cfg, self.backbone.kind, step, history, self.objective.beta)
        acc.end_training()
        return TrainResult(self.output_dir, adapter, step, history)

    # ----- validation images -----
    def validate(self, step: int) -> Path | None:
        """A grid of validation images (one per prompt, fixed seeds) from a stock pipeline with our UNet."""
        if self.validation_cond is None or not self.accelerator.is_main_process:
            return None
        from .pipelines import image_grid
        from .pipelines.validation import validation_images

        t = self.cfg.train
        self.backbone.vae.to(self.device)
        images = validation_images(self.cfg.model, self.accelerator.unwrap_model(self.unet), self.backbone,
                                   *self.validation_cond, t.validation_steps, t.validation_guidance, t.seed,
                                   self.resolution, self.device)
        self.backbone.vae.to(self.vae_device)
        path = self.output_dir / "validation" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images).save(path)
        return path


def train(cfg: Config) -> TrainResult:
    """Train an adapter as ``cfg`` says and write it to ``cfg.train.output_dir``."""
    start = time.time()
    result = Trainer(cfg).train()
    log.info("trained %d steps in %.1fs", result.steps, time.time() - start)
    return result

