"""On-disk cache of VAE latents and text embeddings, so training needs neither the VAE encoder nor the
text encoders after one pass over the data.

Layout: ``<cache dir>/<key>/shard-00000.safetensors ...``, ``empty_prompt.safetensors`` and ``meta.json``,
which is written last and marks the cache complete. The key hashes the cache format, the model's frozen
parts, the dataset's content fingerprint, the resolution and the transform settings. Shards are written
atomically, so an interrupted build resumes at the first missing shard.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..files import atomic_save_safetensors, atomic_write_text
from ..models import Backbone, Conditioning
from .dataset import RawPairDataset, check_captions, encode_batch, note_counts
from .images import BadImageError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SHARD_SIZE = 256
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_root() -> Path:
    return Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign"))


def cache_key(model_fingerprint: str, raw: RawPairDataset, dtype: str) -> str:
    parts = [CACHE_VERSION, model_fingerprint, raw.source.fingerprint, raw.source.rows, raw.resolution,
             raw.seed, raw.random_flip, raw.center_crop, dtype]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


class CachedPairDataset(Dataset):
    """Encoded pairs read row by row from memory-mapped safetensors shards."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.shards = self.meta["shards"]
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + shard["size"])
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def _open(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt", device="cpu")
        return self._handles[name]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.offsets, i) - 1
        f = self._open(self.shards[k]["file"])
        j = i - self.offsets[k]
        return {key: f.get_slice(key)[j : j + 1][0].float() if key not in ("geometry", "row", "label")
                else f.get_slice(key)[j : j + 1][0] for key in f.keys()}

    def empty_prompt(self) -> Conditioning:
        """The cached conditioning of the empty prompt (caption dropout), batch size 1."""
        f = self._open("empty_prompt.safetensors")
        return Conditioning(f.get_tensor("prompt_embeds").float()[None],
                            f.get_tensor("pooled").float()[None] if "pooled" in f.keys() else None)

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        return {**self.__dict__, "_handles": {}}


def _save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    atomic_save_safetensors(path, tensors, metadata)


def _collate_good(items: list) -> dict | None:
    from torch.utils.data import default_collate

    good = [x for x in items if x is not None]
    return default_collate(good) if good else None


class _SkipBad(Dataset):
    def __init__(self, raw: RawPairDataset, policy: str):
        self.raw, self.policy = raw, policy

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int):
        try:
            return self.raw[i]
        except BadImageError as e:
            if self.policy == "error":
                raise
            log.warning("skipping pair: %s", e)
            return None


def cache_folder(model_fingerprint: str, raw: RawPairDataset, dtype: str, root: Path | None = None) -> Path:
    """Where the cache of ``raw`` encoded by the model with ``model_fingerprint`` lives."""
    return (root or default_cache_root()) / cache_key(model_fingerprint, raw, dtype)


def is_complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def build_cache(backbone: Backbone, raw: RawPairDataset, folder: Path, dtype: str = "float32",
                on_bad_image: str = "skip", batch_size: int = 8, num_workers: int = 0) -> CachedPairDataset:
    """Encode ``raw`` into ``folder`` (or reuse it if complete) and open it. The data checks of the pass
    (undecodable, composited, converted and tiny images, truncated captions) are recorded in ``raw.source`` and
    in meta.json, from which a reused cache restores them."""
    if is_complete(folder):
        log.info("reusing cache %s", folder)
        cached = CachedPairDataset(folder)
        raw.source.restore_counts(cached.meta.get("data_counts", {}))
        raw.source.kept = cached.meta.get("pairs")
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    store = DTYPES[dtype]
    shards, skipped, composited, converted, tiny_rows = [], 0, 0, 0, []
    n_shards = (len(raw) + SHARD_SIZE - 1) // SHARD_SIZE
    with tqdm(total=len(raw), desc="caching latents", unit="pair", leave=False) as bar:
        for k in range(n_shards):
            name = f"shard-{k:05d}.safetensors"
            lo, hi = k * SHARD_SIZE, min(len(raw), (k + 1) * SHARD_SIZE)
            if (folder / name).is_file():  # finished by an interrupted build
                with safe_open(str(folder / name), framework="pt") as f:
                    size, info = f.get_slice("row").get_shape()[0], f.metadata()
                bad = int(info["skipped"])
                notes = {"composited": int(info.get("composited", 0)), "converted": int(info.get("converted", 0)),
                         "tiny_rows": [int(r) for r in info.get("tiny_rows", "").split(",") if r]}
            else:
                part = torch.utils.data.Subset(_SkipBad(raw, on_bad_image), range(lo, hi))
                loader = DataLoader(part, batch_size=batch_size, collate_fn=_collate_good, num_workers=num_workers)
                batches = [b for b in loader if b is not None]
                chunks = [encode_batch(backbone, b) for b in batches]
                size = sum(len(c["row"]) for c in chunks)
                bad = (hi - lo) - size
                notes = note_counts([r for b in batches for r in b["row"].tolist()],
                                    torch.cat([b["notes"] for b in batches]) if batches else torch.zeros(0, 3))
                if size:
                    tensors = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
                    tensors = {key: v.to(store) if v.is_floating_point() and key != "scores" else v
                               for key, v in tensors.items()}
                    _save(tensors, folder / name, {"skipped": str(bad), "composited": str(notes["composited"]),
                                                   "converted": str(notes["converted"]),
                                                   "tiny_rows": ",".join(map(str, notes["tiny_rows"]))})
            bar.update(hi - lo)
            skipped += bad
            composited, converted = composited + notes["composited"], converted + notes["converted"]
            tiny_rows += notes["tiny_rows"]
            if size:
                shards.append({"file": name, "size": size})
    if not shards:
        raise BadImageError(f"{raw.source.name}: every pair has an undecodable image; nothing to train on")
    if skipped:
        log.warning("%s: skipped %d pair(s) with undecodable images", raw.source.name, skipped)
    raw.source.bad_images_skipped = skipped
    raw.report_images(composited, converted, tiny_rows)
    check_captions(raw.source, backbone.tokenizers)
    empty = backbone.encode_prompt([""])
    _save({"prompt_embeds": empty.prompt_embeds[0].float().cpu(),
           **({"pooled": empty.pooled[0].float().cpu()} if empty.pooled is not None else {})},
          folder / "empty_prompt.safetensors")
    raw.source.kept = sum(s["size"] for s in shards)
    meta = {"version": CACHE_VERSION, "source": raw.source.name, "pairs": raw.source.kept,
            "skipped_bad_images": skipped, "ties_dropped": raw.source.ties_dropped, "resolution": raw.resolution,
            "dtype": dtype, "shards": shards, "data_counts": raw.source.counts()}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2))
    return CachedPairDataset(folder)


class WithTrajectories(Dataset):
    """A cached pair dataset whose items also carry each latent's reference inversion at the shared levels
    (``traj_w``, ``traj_l``: [n - 1, C, H, W]), read from their own shards."""

    def __init__(self, pairs: CachedPairDataset, trajectories: CachedPairDataset):
        if len(pairs) != len(trajectories):
            raise ValueError(f"{trajectories.folder}: {len(trajectories)} trajectories for {len(pairs)} pairs")
        self.pairs, self.trajectories = pairs, trajectories
        self.folder = pairs.folder

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {**self.pairs[i], **self.trajectories[i]}

    def empty_prompt(self) -> Conditioning:
        return self.pairs.empty_prompt()


def build_trajectory_cache(pairs: CachedPairDataset, folder: Path, invert, dtype: str = "float32",
                           batch_size: int = 8) -> WithTrajectories:
    """Run ``invert(batch) -> (traj_w, traj_l)`` over ``pairs`` once, in order, into ``folder`` (reused when
    complete; resumed shard by shard when interrupted), and return the pairs with their trajectories."""
    if not is_complete(folder):
        folder.mkdir(parents=True, exist_ok=True)
        store, shards = DTYPES[dtype], []
        with tqdm(total=len(pairs), desc="caching inversions", unit="pair", leave=False) as bar:
            for k, lo in enumerate(range(0, len(pairs), SHARD_SIZE)):
                hi, name = min(len(pairs), lo + SHARD_SIZE), f"shard-{k:05d}.safetensors"
                if not (folder / name).is_file():
                    loader = DataLoader(torch.utils.data.Subset(pairs, range(lo, hi)), batch_size=batch_size)
                    parts = [invert(batch) for batch in loader]
                    _save({"traj_w": torch.cat([w for w, _ in parts]).to(store).cpu(),
                           "traj_l": torch.cat([l for _, l in parts]).to(store).cpu()}, folder / name)
                shards.append({"file": name, "size": hi - lo})
                bar.update(hi - lo)
        atomic_write_text(folder / "meta.json", json.dumps({"version": CACHE_VERSION, "shards": shards}, indent=2))
    return WithTrajectories(pairs, CachedPairDataset(folder))
