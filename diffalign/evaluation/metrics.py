"""Evaluation arithmetic: win rates with Wilson intervals and intervals over prompts, and implicit / ranking accuracy
on held-out pairs.

A win rate over P prompts x K seeds has two intervals. The Wilson interval treats the P·K comparisons as
independent: right for "these prompts, other seeds". Comparisons of one prompt are alike (an adapter that wins on a
prompt tends to win on all its seeds), so for "other prompts like these" the prompt interval is the one to read:
the cluster-robust (sandwich) standard error of a proportion, ``SE² = P/(P-1) · Σ_i (s_i - p·n_i)² / N²`` over
prompts i with s_i wins (ties half) out of n_i, N = Σ n_i, taken no narrower than the Wilson interval (with few
prompts that agree by chance the sandwich estimate can come out below the binomial one, down to zero). A paired
difference of two adapters (:func:`paired_difference`) has the same two readings: over prompts (cluster-robust) and
for these prompts (:func:`stratified_standard_error`, the spread within each prompt).

Ranking accuracy (Chen et al., arXiv 2405.19534) asks whether the policy alone prefers the winner: with shared
(t, ε) Monte Carlo over several t, ``mean_t e_θ^w < mean_t e_θ^l``. Implicit accuracy asks whether the policy
moved towards the winner relative to the reference: ``mean_t [(e_ref^w - e_ref^l) - (e_θ^w - e_θ^l)] > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class WinRate:
    rate: float  # (wins + ties / 2) / n
    low: float  # 95% Wilson score interval
    high: float
    wins: int
    ties: int
    n: int
    prompt_low: float | None = None  # 95% interval over prompts (see the module doc); None without prompt groups
    prompt_high: float | None = None
    prompts: int | None = None  # how many prompts the comparisons came from


def wilson_interval(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed on ``n`` trials (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # analytically low <= p <= high; at p = 0 or 1 rounding can put a bound a hair on the wrong side of p
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def prompt_groups(prompts: int, seeds: int) -> list[int]:
    """The prompt of each comparison in ``diffalign eval``'s order (every seed of prompt 0, then of prompt 1, ...)."""
    return [p for p in range(prompts) for _ in range(seeds)]


def cluster_standard_error(points: Sequence[float], groups: Sequence) -> float:
    """The cluster-robust (sandwich) standard error of the mean of ``points``, ``groups[i]`` naming the prompt of
    point i: ``sqrt(P/(P-1) · Σ_i (s_i - mean·n_i)²) / N`` over the P prompts (module doc); 0 with one prompt."""
    n, mean = len(points), sum(points) / len(points)
    per_group: dict = {}
    for x, g in zip(points, groups):
        s, k = per_group.get(g, (0.0, 0))
        per_group[g] = (s + x, k + 1)
    m = len(per_group)
    if m < 2:
        return 0.0
    return math.sqrt(m / (m - 1) * sum((s - mean * k) ** 2 for s, k in per_group.values())) / n


def stratified_standard_error(points: Sequence[float], groups: Sequence) -> float:
    """The standard error of the mean of ``points`` for *these* prompts (``groups[i]`` the prompt of point i), other
    seeds: from the spread within each prompt, ``sqrt(Σ_i n_i · s_i²) / N`` with s_i² prompt i's sample variance
    (a prompt with one point adds nothing). Right when the prompts are the whole population asked about, as the
    testbed's 16 held-out combinations are all it has; :func:`cluster_standard_error` is for other prompts."""
    per_group: dict = {}
    for x, g in zip(points, groups):
        per_group.setdefault(g, []).append(x)
    total = 0.0
    for values in per_group.values():
        if len(values) > 1:
            mean = sum(values) / len(values)
            total += sum((x - mean) ** 2 for x in values) * len(values) / (len(values) - 1)
    return math.sqrt(total) / len(points)


def prompt_interval(points: Sequence[float], groups: Sequence, z: float = 1.959964) -> tuple[float, float]:
    """The 95% interval over prompts of the mean of ``points`` (1 a win, 0.5 a tie, 0 a loss), ``groups[i]`` naming
    the prompt of comparison i: the cluster-robust interval of the module doc, no narrower than Wilson's."""
    p = sum(points) / len(points)
    low, high = wilson_interval(p, len(points), z)
    se = cluster_standard_error(points, groups)  # 0 with one prompt: Wilson's interval stands
    return max(0.0, min(low, p - z * se)), min(1.0, max(high, p + z * se))


def outcomes(candidate: Sequence[float], baseline: Sequence[float], higher_is_better: bool = True) -> list[float]:
    """Each comparison's outcome for ``candidate[i]`` against ``baseline[i]``: 1 a win, 0.5 a tie, 0 a loss."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError(f"win rate needs two equally long, non-empty score lists (got {len(candidate)} and "
                         f"{len(baseline)})")
    sign = 1 if higher_is_better else -1
    return [1.0 if sign * (c - b) > 0 else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline)]


def win_rate(candidate: Sequence[float], baseline: Sequence[float], higher_is_better: bool = True,
             groups: Sequence | None = None) -> WinRate:
    """How often ``candidate[i]`` beats ``baseline[i]`` (same prompt and seed); a tie counts as half a win.
    ``groups[i]`` (the prompt of comparison i) adds the interval over prompts (see the module doc)."""
    points = outcomes(candidate, baseline, higher_is_better)
    if groups is not None and len(groups) != len(points):
        raise ValueError(f"win rate: {len(points)} comparisons but {len(groups)} prompt groups")
    wins, ties, n = points.count(1.0), points.count(0.5), len(points)
    rate = sum(points) / n
    result = WinRate(rate, *wilson_interval(rate, n), wins, ties, n)
    if groups is not None:
        result.prompt_low, result.prompt_high = prompt_interval(points, groups)
        result.prompts = len(set(groups))
    return result


def paired_difference(a: Sequence[float], b: Sequence[float], groups: Sequence, z: float = 1.959964,
                      over: str = "prompts") -> tuple[float, float, float]:
    """How much higher the win rate of outcomes ``a`` is than of ``b`` (:func:`outcomes` of two adapters against the
    same base on the same comparisons, ``groups[i]`` the prompt of comparison i), with its 95% interval:
    ``(difference, low, high)``. ``over="prompts"`` (default): for other prompts like these
    (:func:`cluster_standard_error`); ``over="seeds"``: for these prompts, other seeds
    (:func:`stratified_standard_error`). Pairing takes out what the two share (which prompts are easy), so the
    difference is known better than from two separate evaluations (on the testbed its standard error over prompts
    was about 3/4 of theirs); an interval holding 0 is "not measurably different"."""
    if not len(a) == len(b) == len(groups) or not a:
        raise ValueError(f"paired difference needs equally long, non-empty outcomes and groups (got {len(a)}, "
                         f"{len(b)} and {len(groups)})")
    errors = {"prompts": cluster_standard_error, "seeds": stratified_standard_error}
    if over not in errors:
        raise ValueError(f"paired difference: over={over!r}; expected one of {list(errors)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, se = sum(diffs) / len(diffs), errors[over](diffs, groups)
    return mean, mean - z * se, mean + z * se


HELD_OUT_BETA = 5000.0  # Diffusion-DPO's default β (our ½ convention), whatever the run's objective


@torch.no_grad()
def encode_pairs(backbone, pairs, batch_size: int = 4) -> list[dict]:
    """The encoded batches (latents of both images, conditioning, geometry; on the CPU) of held-out ``pairs`` (a
    :class:`~diffalign.data.dataset.RawPairDataset`): what :func:`pair_statistics` reads, so held-out pairs can be
    encoded once while the encoders are loaded and measured later with the UNet alone."""
    from ..data.dataset import encode_batch

    return [encode_batch(backbone, batch) for batch in torch.utils.data.DataLoader(pairs, batch_size=batch_size)]


@torch.no_grad()
def pair_statistics(backbone, encoded: list[dict], resolution: int,
                    timesteps: Sequence[int] = (100, 300, 500, 700, 900), seed: int = 0,
                    device: str | torch.device = "cpu", unet=None, space: str = "prediction") -> dict[str, float]:
    """Implicit and ranking accuracy of the UNet's active adapter on encoded held-out pairs (see the module doc;
    the reference is the same UNet with adapters off), their mean implicit margin ``mean_t h`` with
    ``h = (e_ref^w - e_ref^l) - (e_θ^w - e_θ^l)`` (×1000, per-pixel MSE units), its winner half ``e_ref^w - e_θ^w``
    (``winner_gain``: positive when the policy denoises the held-out winners better than the reference; large steps
    can grow the margin while making both images worse), and the policy's drift from the
    reference, ``mean over images and t of mean (pred_θ - pred_ref)²`` (×1000): the KL-like distance the adapter
    has moved, and the Diffusion-DPO loss of the held-out pairs at β = :data:`HELD_OUT_BETA` (log 2 at the start;
    it rewards moving toward held-out winners and punishes moving away, where accuracy only counts signs). Every
    pair sees the same (t, ε) for a given ``seed``. ``space`` is the error's (``train.error_space``; errors and
    drift alike): a run is measured on the errors it trains on."""
    from ..data.dataset import batch_conditioning
    from ..lora import reference_mode

    unet = unet or backbone.unet
    g = torch.Generator().manual_seed(seed)
    ranking, implicit, margin, winner, drift, loss, n = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for enc in encoded:
        z = torch.cat([enc["latents_w"], enc["latents_l"]]).to(device, torch.float32)
        cond = batch_conditioning(backbone, enc, resolution).repeat(2).to(device)
        b = len(enc["latents_w"])
        policy, ref = torch.zeros(2 * b, device=device), torch.zeros(2 * b, device=device)
        for t_value in timesteps:
            noise = torch.randn(z[:b].shape, generator=g).to(device).repeat(2, 1, 1, 1)  # shared by w and l
            t = torch.full((2 * b,), t_value, device=device, dtype=torch.long)
            x_t = backbone.scheduler.add_noise(z, noise, t)
            target = backbone.target(z, noise, t).float()
            pred = backbone.predict(x_t, t, cond, unet=unet).float()
            with reference_mode(unet):
                pred_ref = backbone.predict(x_t, t, cond, unet=unet).float()
            weight = backbone.error_weight(t, space)
            policy += weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))
            ref += weight * ((pred_ref - target) ** 2).mean(dim=(1, 2, 3))
            drift += (weight * ((pred - pred_ref) ** 2).mean(dim=(1, 2, 3))).sum().item()
        pw, pl = policy.chunk(2)
        rw, rl = ref.chunk(2)
        inside = (rw - rl) - (pw - pl)
        ranking += ((pw < pl).float() + 0.5 * (pw == pl).float()).sum().item()
        implicit += ((inside > 0).float() + 0.5 * (inside == 0).float()).sum().item()
        margin += inside.sum().item() / len(timesteps)
        winner += (rw - pw).sum().item() / len(timesteps)
        loss += torch.nn.functional.softplus(-0.5 * HELD_OUT_BETA * inside / len(timesteps)).sum().item()
        n += b
    if n == 0:
        raise ValueError("no held-out pairs to measure")
    return {"ranking_accuracy": ranking / n, "implicit_accuracy": implicit / n, "pairs": float(n),
            "margin": 1000 * margin / n, "winner_gain": 1000 * winner / n,
            "drift": 1000 * drift / (2 * n * len(timesteps)), "loss": loss / n}


def pair_accuracies(backbone, pairs, resolution: int, timesteps: Sequence[int] = (100, 300, 500, 700, 900),
                    seed: int = 0, batch_size: int = 4, device: str | torch.device = "cpu") -> dict[str, float]:
    """:func:`pair_statistics` of held-out ``pairs`` (a :class:`~diffalign.data.dataset.RawPairDataset`)."""
    return pair_statistics(backbone, encode_pairs(backbone, pairs, batch_size), resolution, timesteps, seed, device)
