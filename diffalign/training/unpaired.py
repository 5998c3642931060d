"""The unpaired feed: single images labelled desirable or undesirable (Diffusion-KTO) in, per-image errors out.

The pairs feed's data path serves it unchanged (readers, transforms, the latent cache and its checks: an unpaired
row is a pair without a loser); what differs is one timestep and one noise per *image* (the official code's
noising: no partner to share them with) and, optionally, class-balanced sampling.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Subset

from ..config import Config
from ..data.cache import CachedPairDataset
from ..data.dataset import RawPairDataset
from ..data.unpaired import load_unpaired
from ..objectives.base import ImageErrors
from .pairs import PairFeed


class UnpairedFeed(PairFeed):
    """The feed of objectives whose ``data`` is ``unpaired``: an epoch is a seeded permutation of the images (or,
    with ``objective.desirable_share``, as many seeded draws with replacement, each class at that share), a
    micro-batch ``train.batch_size`` images, its loss the objective's on :class:`ImageErrors`."""

    def read_source(self, cfg: Config):
        return load_unpaired(cfg.data)

    def labels(self) -> torch.Tensor:
        """Every training image's label (bool [N], True: desirable), in dataset order; read once (the dataset does
        not change after :meth:`ready`), not every epoch."""
        if getattr(self, "_labels", None) is None:
            self._labels = self._read_labels()
        return self._labels

    def _read_labels(self) -> torch.Tensor:
        if isinstance(self.dataset, CachedPairDataset):
            parts = []
            for shard in self.dataset.shards:
                with safe_open(str(self.dataset.folder / shard["file"]), framework="pt") as f:
                    parts.append(f.get_tensor("label"))
            return torch.cat(parts).bool()
        assert isinstance(self.dataset, RawPairDataset)
        source = self.dataset.source
        return torch.tensor([bool(source.desirable(r)) for r in source.rows])

    def epoch_loader(self, epoch: int) -> DataLoader:
        share = getattr(self.objective.options, "desirable_share", None)
        g = torch.Generator().manual_seed(self.cfg.train.seed + epoch)
        if share is None:
            order = torch.randperm(len(self.dataset), generator=g)
        else:  # the official WeightedRandomSampler's weights: share / n_desirable, (1 - share) / n_undesirable
            labels = self.labels()
            good = int(labels.sum())
            weights = torch.where(labels, share / max(good, 1), (1 - share) / max(len(labels) - good, 1))
            order = torch.multinomial(weights.double(), len(labels), replacement=True, generator=g)
        loader = DataLoader(Subset(self.dataset, order.tolist()), batch_size=self.cfg.train.batch_size,
                            num_workers=self.cfg.data.num_workers if isinstance(self.dataset, RawPairDataset) else 0)
        return self.accelerator.prepare_data_loader(loader, device_placement=False)

    def loss(self, unet, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and metrics of one batch of images; noise, timesteps and caption dropout come from a generator
        seeded by ``(seed, micro_step, rank)`` as in the pairs feed, drawn per image."""
        batch = self.encoded(batch)
        b, dev = self.backbone, self.device
        z = batch["latents_w"].to(dev, torch.float32)
        t, noise, cond = self.draw(batch, z.shape, micro_step)
        x_t = b.scheduler.add_noise(z, noise, t)
        model, ref = self.errors(unet, x_t, t, cond.to(dev), b.target(z, noise, t).float())
        return self.objective(ImageErrors(model, ref, batch["label"].to(dev).bool()))
