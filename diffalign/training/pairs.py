"""The pairs feed: preference pairs (cached or raw) in, per-pair denoising errors and the objective's loss out.

Each step draws one timestep and one noise per pair (shared by winner and loser), runs winners and losers as one
2B batch through the UNet, runs the reference (same UNet, adapters off) when the objective needs it, and hands
per-pair errors to the objective. InPO and SmPO replace forward noising by DDIM / ReNoise inversion.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ..config import Config
from ..data.cache import WithTrajectories, build_cache, build_trajectory_cache, cache_folder, is_complete
from ..data.dataset import RawPairDataset, batch_conditioning, encode_batch
from ..data.readers import load_pairs
from ..lora import reference_mode
from ..models import Backbone, Conditioning, default_resolution, model_fingerprint
from ..objectives.base import PairErrors
from .noising import ddim_invert, finish_inversion, invert_to_shared_levels, inverted_noise

log = logging.getLogger(__name__)


class PairFeed:
    """The feed of objectives whose ``data`` is ``pairs`` or ``soft_pairs`` (DPO, MaPO, InPO, SmPO): an epoch is a
    seeded permutation of the pairs, a micro-batch ``train.batch_size`` of them, its loss the objective's on the
    per-pair errors. Implements :class:`~diffalign.training.feeds.Feed`."""

    window = 1  # micro-batches per optimizer update (times train.grad_accum)

    def __init__(self, cfg: Config, accelerator, weight_dtype: torch.dtype, objective_cls) -> None:
        """Read the pairs (bad data fails before the model loads), load the backbone, build the objective and
        prepare the training data (cached or raw). Text encoders stay loaded until :meth:`ready`."""
        self.cfg, self.accelerator, self.device = cfg, accelerator, accelerator.device
        m, d = cfg.model, cfg.data
        raw_pairs = self.read_source(cfg)  # bad data fails before the model loads
        self.resolution = d.resolution or default_resolution(m.pretrained, m.revision)
        raw = RawPairDataset(raw_pairs, self.resolution, cfg.train.seed, d.random_flip, d.center_crop)
        self.score_range = raw_pairs.score_range() if objective_cls.data == "soft_pairs" else None
        cache = None
        if cfg.cache.enabled:
            root = Path(cfg.cache.dir) if cfg.cache.dir else None
            cache = cache_folder(model_fingerprint(m.pretrained, m.vae, m.revision), raw, cfg.cache.dtype, root)
        # With a complete cache and nothing to validate or measure, the text encoders are never loaded at all.
        need_text = cache is None or not is_complete(cache) or bool(cfg.train.validation_prompts) \
            or bool(cfg.data.eval_pairs)
        self.backbone = Backbone.load(m.pretrained, m.vae, m.prediction_type, m.revision, weight_dtype,
                                      text_encoders=need_text)
        self.objective = objective_cls(cfg.objective.options, num_timesteps=self.backbone.scheduler.config.num_train_timesteps)
        self.dataset, self.empty_prompt = self._prepare_data(raw, cache)
        if self.accelerator.is_main_process:
            log.info("data: %s", raw_pairs.summary())

    def read_source(self, cfg: Config):
        """The training data as a :class:`~diffalign.data.readers.PairSource`."""
        return load_pairs(cfg.data)

    def ready(self) -> None:
        """After the trainer encoded what it needs (validation prompts): drop what the cache made unnecessary, place
        the parts, and (InPO/SmPO with ``inversion_cache``) cache the reference inversions."""
        if self.cfg.cache.enabled:
            self.backbone.free_encoders()
        self.backbone.unet.to(self.device)
        if getattr(self.objective.options, "inversion_cache", False):
            self.dataset = self._with_trajectories(self.dataset)  # before LoRA: the UNet is the reference
        # From the cache the VAE only decodes validation images: keep it off the accelerator until then.
        self.vae_device = torch.device("cpu") if self.cfg.cache.enabled else self.device
        self.backbone.vae.to(self.vae_device)

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
        raw.drop_bad_rows(d.on_bad_image, b.tokenizers)
        return raw, b.encode_prompt([""])

    def batches(self, epoch: int, skip: int = 0) -> Iterable[dict]:
        """The micro-batches of epoch ``epoch``, without the first ``skip`` (a resume)."""
        loader = self.epoch_loader(epoch)
        return self.accelerator.skip_first_batches(loader, skip) if skip else loader

    def epoch_loader(self, epoch: int) -> DataLoader:
        """Batches of one epoch: a seeded permutation, sharded across processes by accelerate."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch))
        loader = DataLoader(Subset(self.dataset, order.tolist()), batch_size=self.cfg.train.batch_size,
                            num_workers=self.cfg.data.num_workers if isinstance(self.dataset, RawPairDataset) else 0)
        return self.accelerator.prepare_data_loader(loader, device_placement=False)

    def encoded(self, batch: dict) -> dict:
        """The encoded form of a batch (a no-op for cached batches)."""
        if "latents_w" in batch:
            return batch
        return encode_batch(self.backbone, batch)

    # ----- one step -----
    def _generator(self, micro_step: int) -> torch.Generator:
        rank = self.accelerator.process_index
        return torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + micro_step) * 1009 + rank)

    def loss(self, unet, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and metrics of one batch (encoded here unless it comes from the cache), the policy being ``unet``
        (the accelerate-wrapped module, so gradients sync); noise, timesteps and caption dropout come from a
        generator seeded by ``(seed, micro_step, rank)``, so runs and resumes are reproducible."""
        batch = self.encoded(batch)
        b, dev = self.backbone, self.device
        z_w, z_l = batch["latents_w"].to(dev, torch.float32), batch["latents_l"].to(dev, torch.float32)
        t, noise, cond = self.draw(batch, z_w.shape, micro_step)
        cond2 = cond.repeat(2).to(dev)
        latents = torch.cat([z_w, z_l])
        t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
        if self.objective.noising == "forward":
            x_t = b.scheduler.add_noise(latents, noise2, t2)
        else:  # InPO / SmPO: each latent's own inverted noise replaces the shared ε
            shared = torch.cat([batch["traj_w"], batch["traj_l"]]).to(dev) if "traj_w" in batch else None
            x_t = self.invert(latents, t2, cond2, shared)
            noise2 = inverted_noise(latents, x_t, t2, b.scheduler.alphas_cumprod)
        target = b.target(latents, noise2, t2).float()

        model, ref = self.errors(unet, x_t, t2, cond2, target)
        (model_w, model_l), (ref_w, ref_l) = model.chunk(2), ref.chunk(2) if ref is not None else (None, None)
        scores = [None, None]
        if self.score_range is not None:
            lo, hi = self.score_range
            scores = ((batch["scores"].to(dev, torch.float32) - lo) / (hi - lo)).unbind(1)
        return self.objective(PairErrors(model_w, model_l, ref_w, ref_l, *scores))

    def draw(self, batch: dict, shape: torch.Size, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """One timestep and one noise per row of ``shape`` (on the device) and the batch's conditioning with caption
        dropout applied, all from the generator of ``micro_step``."""
        g, n = self._generator(micro_step), shape[0]
        t = torch.randint(0, self.backbone.scheduler.config.num_train_timesteps, (n,), generator=g)
        noise = torch.randn(shape, generator=g)
        drop = torch.rand(n, generator=g) < self.cfg.data.caption_dropout
        cond = batch_conditioning(self.backbone, batch, self.resolution)
        if drop.any():
            cond = cond.where(drop, self.empty_prompt.repeat(n))
        return t.to(self.device), noise.to(self.device), cond

    def errors(self, unet, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
               target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample denoising errors of the policy ``unet`` and, when the objective needs it, of the reference
        (the same UNet with its adapters off)."""
        def error() -> torch.Tensor:
            with self.accelerator.autocast():
                return self.backbone.denoising_error(x_t, t, cond, target, unet=unet, space=self.cfg.train.error_space)

        model = error()
        if not self.objective.needs_reference:
            return model, None
        with reference_mode(self.accelerator.unwrap_model(unet)):
            return model, error()

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                shared: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM (InPO) or ReNoise (SmPO) inversion of clean latents exactly to ``timesteps``, conditional, no CFG,
        with the policy (the official codes) or the reference (adapters off); from cached ``shared`` levels only
        the last step runs."""
        o, b = self.cfg.objective, self.backbone
        unet = b.unet  # the policy: the LoRA is attached to the backbone's UNet itself
        renoise = o.renoise_iters if self.objective.noising == "renoise" else 0
        context = reference_mode(unet) if o.inversion_model == "reference" else contextlib.nullcontext()
        predict = lambda x, t: b.predict_noise(x, t, cond, unet=unet)  # noqa: E731
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
        # the prediction type is in the name: a cache built before v-prediction was converted to ε is not reused
        folder = pairs.folder / f"inversion-{b.prediction_type}-n{o.inversion_steps}-k{renoise}"

        def invert(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            cond = batch_conditioning(b, batch, self.resolution).repeat(2).to(self.device)
            z = torch.cat([batch["latents_w"], batch["latents_l"]]).to(self.device)
            with self.accelerator.autocast():
                traj = invert_to_shared_levels(lambda x, t: b.predict_noise(x, t, cond), z, b.scheduler.alphas_cumprod,
                                               o.inversion_steps, renoise)
            return traj.chunk(2)

        with self.accelerator.main_process_first():
            return build_trajectory_cache(pairs, folder, invert, self.cfg.cache.dtype)


    # ----- the rest of the feed protocol: nothing per epoch to log or to checkpoint -----
    def take_metrics(self) -> dict[str, float]:
        return {}

    def save(self, folder: Path) -> None:
        pass

    def restore(self, folder: Path, epoch: int) -> None:
        pass
