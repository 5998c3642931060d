"""The one training loop: preference data -> LoRA adapter, on accelerate.

The loop, optimization, guards, checkpoints, logging and validation live here; what a micro-batch is and how its
loss is computed comes from the feed the trainer holds (:mod:`diffalign.training.feeds`): the pairs feed (DPO, MaPO, InPO,
SmPO) or the rollouts feed (D3PO). The objective's ``data`` declaration picks one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..environment import package_versions
from ..files import atomic_save_image, atomic_write_text
from ..lora import add_lora, peft_state, save_lora
from ..models import Conditioning
from ..registry import objective_class
from . import checkpoint as ckpt
from .checkpoint import OutputDirError, check_writable
from .feeds import Feed, make_feed
from .guards import StopSignals, TrainingStopped, any_process, grads_finite, zero_loss
from .optim import build_optimizer, check_available
from .reward_guard import GuardFell
from .watch import HeldOutPairs, RunWatcher

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    adapter: Path | None  # None when interrupted (the checkpoint holds the weights)
    steps: int
    history: list[dict] = field(default_factory=list)  # metrics per optimizer step of this run (metrics.json: all)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)  # what the run watcher warned about (training/watch.py)
    stopped: str | None = None  # why the adapter written is not the last step's (a reward-hacking guard fell)


class Trainer:
    """Builds everything a run needs from a :class:`Config`; :meth:`train` runs it. The data side is
    :attr:`feed`; :attr:`backbone` and :attr:`objective` are the feed's."""

    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        check_writable(self.output_dir)
        if not cfg.train.resume and not cfg.train.overwrite and (earlier := ckpt.previous_run(self.output_dir)):
            raise OutputDirError(
                f"train.output_dir={str(self.output_dir)!r} already holds a run ({earlier[-1].name}); resume it with "
                "--set train.resume=latest, replace it with --set train.overwrite=true, or choose another output_dir")
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
        check_available(cfg.optim)  # so does an optimizer whose package is missing
        self._bad_window = False  # a non-finite loss in the current accumulation window
        self.feed: Feed = make_feed(cfg, self.accelerator, self.weight_dtype, objective_cls)
        self.backbone, self.objective = self.feed.backbone, self.feed.objective
        self.validation_cond = self._validation_conditioning()
        # encoded now, while the encoders are loaded (ready() may free them)
        self.heldout = HeldOutPairs(cfg, self.backbone, self.feed.resolution, self.device) if cfg.data.eval_pairs else None
        self.watcher = RunWatcher()
        self.feed.ready()
        self.accelerator.gradient_accumulation_steps = cfg.train.grad_accum * self.feed.window
        self._prepare_optimization()

    def _prepare_optimization(self) -> None:
        """LoRA adapters, optimizer and LR schedule, handed to accelerate."""
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        # LoRA A matrices are drawn from torch's global RNG: seed it here, so the start does not depend on what
        # ran before (e.g. whether the cache had to be built)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.lora_params = add_lora(self.backbone.unet, cfg.lora)
        if cfg.train.gradient_checkpointing:
            self.backbone.unet.enable_gradient_checkpointing()
        if cfg.train.attention == "xformers":
            try:
                self.backbone.unet.enable_xformers_memory_efficient_attention()
            except (ImportError, ModuleNotFoundError, ValueError) as e:
                raise ConfigError(f"train.attention=xformers: {e}; `pip install diffalign[xformers]` on a CUDA "
                                  "machine, or use train.attention=sdpa") from None
        self.optimizer = build_optimizer(self.lora_params, cfg.optim)
        # accelerate steps a prepared schedule once per process per optimizer step
        n = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(cfg.optim.scheduler, self.optimizer, num_warmup_steps=cfg.optim.warmup_steps * n,
                                          num_training_steps=cfg.train.max_steps * n)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.backbone.unet, self.optimizer, self.lr_scheduler)

    def _validation_conditioning(self) -> tuple[Conditioning, Conditioning] | None:
        prompts = self.cfg.train.validation_prompts
        if not prompts:
            return None
        negative = self.cfg.sampling.negative_prompt
        return self.backbone.encode_prompt(prompts), self.backbone.encode_negative(negative).repeat(len(prompts))

    def training_step(self, batch: dict, micro_step: int) -> dict[str, float]:
        """One micro-step: encode if needed, loss, backward; on accumulation boundaries also clip and update. A
        non-finite loss or gradient anywhere in the window skips the update (``metrics["skipped"] = 1``)."""
        acc = self.accelerator
        with acc.accumulate(self.unet):
            loss, metrics = self.feed.loss(self.unet, batch, micro_step)
            finite = bool(torch.isfinite(loss))
            acc.backward(loss if finite else zero_loss(self.lora_params))
            self._bad_window = self._bad_window or not finite
            metrics["skipped"] = 0.0
            if acc.sync_gradients:
                # with fp16 the gradient scaler skips overflowing steps itself; otherwise check the gradients
                bad = self._bad_window or (acc.scaler is None and not grads_finite(self.lora_params))
                self._bad_window = False
                if any_process(acc, bad):
                    self.optimizer.zero_grad(set_to_none=True)
                    metrics["skipped"] = 1.0
                    return metrics
                if self.cfg.optim.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.lora_params, self.cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return metrics

    # ----- the loop -----
    def train(self) -> TrainResult:
        """Run (or resume) training to ``train.max_steps``; the output folder is locked while this runs."""
        lock = ckpt.OutputLock(self.output_dir) if self.accelerator.is_main_process else contextlib.nullcontext()
        with lock:
            return self._train()

    def _train(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        step, epoch, batch_in_epoch = 0, 0, 0
        self._earlier_history: list[dict] = []
        # the optimizer step at which each epoch began, where it is not the epoch itself (a guard's adapter is named
        # by its epoch: an update of reward backprop, a round of the rollout objectives)
        self._epoch_steps: dict[int, int] = {}
        if cfg.train.resume:
            step, epoch, batch_in_epoch = self._resume(ckpt.find_resume(self.output_dir, cfg.train.resume))
        if acc.is_main_process:
            if cfg.train.overwrite and not cfg.train.resume:
                ckpt.clear_previous_run(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if cfg.log.to != "none":
                acc.init_trackers(cfg.log.project, config=cfg.to_flat_dict())
            log.info("training %s from step %d to %d into %s", cfg.objective.name, step,
                     cfg.train.max_steps, self.output_dir.resolve())
        self._history = history = []  # this run's steps; metrics.json and checkpoints also hold the earlier ones
        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="training", disable=not acc.is_local_main_process)
        pending: list[dict] = []
        bad_steps = 0
        self.unet.train()
        with StopSignals() as signals:
            while step < cfg.train.max_steps:
                if batch_in_epoch == 0 and step != epoch:  # not a resume mid-epoch
                    self._epoch_steps[epoch] = step
                try:
                    batches = self.feed.batches(epoch, batch_in_epoch)
                except GuardFell as fell:
                    bar.close()
                    return self._guard_stop(fell, history)
                for batch in batches:
                    metrics = self.training_step(batch, step * acc.gradient_accumulation_steps + len(pending))
                    batch_in_epoch += 1
                    pending.append(metrics)
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    logged = {"step": step, **self._gather(pending)}
                    pending = []
                    every = cfg.train.heldout_every
                    if self.heldout is not None and ((every and step % every == 0) or step >= cfg.train.max_steps):
                        logged.update(self.heldout.measure(acc.unwrap_model(self.unet)))
                    self.watcher.update(logged)
                    history.append(logged)
                    bar.update(1)
                    shown = {"loss": f"{logged['loss']:.4f}", "lr": f"{logged['lr']:.2e}"}
                    if "implicit_acc" in logged:  # preference objectives
                        shown["acc"] = f"{logged['implicit_acc']:.2f}"
                    bar.set_postfix(shown)
                    if cfg.log.to != "none" and step % cfg.train.log_every == 0:
                        acc.log(logged, step=step)
                    bad_steps = bad_steps + 1 if logged["skipped"] else 0
                    if bad_steps:
                        log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row): %s",
                                    step, bad_steps, logged)
                    if bad_steps >= cfg.train.max_bad_steps:
                        self._checkpoint(step, epoch, batch_in_epoch)
                        raise TrainingStopped(
                            f"stopped at step {step} after {bad_steps} consecutive non-finite steps (train.max_bad_steps); "
                            f"checkpoint-{step} written. Lower optim.lr or objective.beta, or use bf16 instead of fp16")
                    if any_process(acc, signals.requested is not None):
                        self._checkpoint(step, epoch, batch_in_epoch)
                        bar.close()
                        log.warning("stopped by %s at step %d; checkpoint-%d written. Resume with --set "
                                    "train.resume=latest", signals.requested or "a signal", step, step)
                        self._close()
                        return TrainResult(self.output_dir, None, step, history, interrupted=True,
                                           warnings=self.watcher.warnings)
                    if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                        self._checkpoint(step, epoch, batch_in_epoch)
                    if cfg.train.validate_every and step % cfg.train.validate_every == 0:
                        self.validate(step)
                    if step >= cfg.train.max_steps:
                        break
                else:
                    epoch, batch_in_epoch = epoch + 1, 0
        bar.close()
        final = getattr(self.feed, "final_evaluation", None)  # online feeds: the last adapter meets the guard too
        if final is not None and history:
            try:
                history[-1].update(final(epoch + 1))
            except GuardFell as fell:
                return self._guard_stop(fell, history)
        return self._finish(step, history)

    def _gather(self, pending: list[dict]) -> dict[str, float]:
        """One optimizer step's metrics: the mean over its micro-steps and over all processes. A metric a micro-step
        could not measure is NaN there (KTO's mean g of a class absent from the batch) and left out of its mean."""
        keys = list(pending[0])
        local = torch.tensor([[m[k] for k in keys] for m in pending], dtype=torch.float64).nanmean(0)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local.to(self.device), reduction="mean").cpu()
        logged = dict(zip(keys, local.tolist()))
        logged["skipped"] = float(logged["skipped"] > 0)
        logged["lr"] = self.lr_scheduler.get_last_lr()[0]
        logged.update(self.feed.take_metrics())  # D3PO: the round's reward, pairs, timings (once)
        return logged

    def _checkpoint(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            position = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                        "num_processes": self.accelerator.num_processes}
            position["epoch_steps"] = self._epoch_steps
            position["lora"] = {"rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha,
                                "targets": list(self.cfg.lora.targets)}
            history = self._earlier_history + self._history

            def extra(tmp: Path) -> None:
                atomic_write_text(tmp / ckpt.HISTORY, json.dumps(history, indent=1))
                self.feed.save(tmp)

            ckpt.save_checkpoint(self.output_dir / f"checkpoint-{step}", self._peft_state(), self.optimizer,
                                 self.lr_scheduler, self.accelerator.scaler, position, extra)
            ckpt.rotate(self.output_dir, self.cfg.train.checkpoints_keep)

    def _peft_state(self) -> dict[str, torch.Tensor]:
        return peft_state(self.accelerator.unwrap_model(self.unet))

    def _resume(self, folder: Path) -> tuple[int, int, int]:
        from peft.utils import set_peft_model_state_dict

        weights, pos, environment = ckpt.load_checkpoint(folder, self.optimizer, self.lr_scheduler,
                                                         self.accelerator.scaler)
        ckpt.check_lora_shape(folder, pos, weights, self.cfg.lora)
        if changed := ckpt.install_changes(environment):
            # the run goes on, but the same code and seeds on another install have moved a testbed win rate by 0.45
            # (docs/benchmarks.md, "A fresh install"): a resumed run need not match the one it continues
            self.watcher.warn("install", f"train.resume: {folder} was written by another install ({changed}); "
                                         "the resumed run need not match what the interrupted one would have given")
        set_peft_model_state_dict(self.accelerator.unwrap_model(self.unet), weights)
        self._earlier_history = ckpt.load_history(folder, pos["step"])
        self._epoch_steps = {int(e): s for e, s in pos.get("epoch_steps", {}).items()}
        self.feed.restore(folder, pos["epoch"])
        then, now = pos.get("num_processes", 1), self.accelerator.num_processes
        batch = pos["batch_in_epoch"]
        if then != now:  # the same data position and LR-schedule position in this world size's units
            batch = batch * then // now
            sched = self.lr_scheduler.scheduler
            sched.last_epoch = sched.last_epoch * now // then
            for group, lr in zip(self.optimizer.param_groups, [f(sched.last_epoch) * base for f, base in
                                                               zip(sched.lr_lambdas, sched.base_lrs)]):
                group["lr"] = lr
            log.info("checkpoint of %d process(es) resumed on %d: data position %d -> %d batches", then, now,
                     pos["batch_in_epoch"], batch)
        log.info("resumed from %s at step %d", folder, pos["step"])
        return pos["step"], pos["epoch"], batch

    def _guard_stop(self, fell: GuardFell, history: list[dict]) -> TrainResult:
        """A reward-hacking guard fell: the adapter of its last evaluation that held becomes the run's adapter."""
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.accelerator.unwrap_model(self.unet), fell.adapter)
        step = self._epoch_steps.get(fell.epoch, fell.epoch)
        message = (f"{fell}: the adapter written is the one of the last evaluation where every guard held, at step "
                   f"{step}")
        self.watcher.warn("guard", message)
        return self._finish(step, history, stopped=message)

    def _finish(self, step: int, history: list[dict], stopped: str | None = None) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        unet = acc.unwrap_model(self.unet)
        adapter = self.output_dir / "pytorch_lora_weights.safetensors"
        if acc.is_main_process:
            try:
                save_lora(unet, self.output_dir, self.backbone.pipeline_class)
                atomic_write_text(self.output_dir / "config.yaml", self.cfg.to_yaml())
                atomic_write_text(self.output_dir / "environment.json", json.dumps(package_versions(), indent=1))
                everything = self._earlier_history + history
                atomic_write_text(self.output_dir / "metrics.json", json.dumps(everything, indent=1))
            except OSError as e:
                raise OutputDirError(f"cannot write the adapter to {self.output_dir}: {e.strerror or e}; the last "
                                     "checkpoint (if any) is intact: free space and resume with "
                                     "--set train.resume=latest") from None
            self.validate(step)
            from ..evaluation.card import write_model_card

            write_model_card(self.output_dir, self.cfg, self.backbone.kind, step, everything,
                             getattr(self.objective.options, "beta", None), stopped)
        self._close()
        return TrainResult(self.output_dir, adapter, step, history, warnings=self.watcher.warnings, stopped=stopped)

    def _close(self) -> None:
        """Trackers finished and the process group destroyed, by every process together: one that destroyed it
        and exited while the main process was still writing aborted once under gloo ("terminate called without an
        active exception")."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    # ----- validation images -----
    def validate(self, step: int) -> Path | None:
        """A grid of validation images (one per prompt, fixed seeds) from a stock pipeline with our UNet."""
        if self.validation_cond is None or not self.accelerator.is_main_process:
            return None
        from ..pipelines import image_grid
        from ..pipelines.validation import validation_images

        self.backbone.vae.to(self.device)
        images = validation_images(self.cfg.model, self.accelerator.unwrap_model(self.unet), self.backbone,
                                   *self.validation_cond, self.cfg.sampling, self.feed.resolution, self.device)
        self.backbone.vae.to(self.feed.vae_device)
        path = self.output_dir / "validation" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_image(path, image_grid(images))
        return path


def train(cfg: Config) -> TrainResult:
    """Train an adapter as ``cfg`` says and write it to ``cfg.train.output_dir``."""
    start = time.time()
    result = Trainer(cfg).train()
    ran = len(result.history)
    log.info("trained %d step(s) (%d to %d) in %.1f s", ran, result.steps - ran + 1 if ran else result.steps,
             result.steps, time.time() - start)
    return result

