"""``diffalign sweep``: a small grid search over a recipe's settings (learning rate, β, steps, or any key) for a
user's own data, picking by a signal that needs no reward model and never sees the test prompts.

Every trial trains the recipe with its grid point into ``OUT/trial-NN/run`` while measuring held-out pairs
(``data.eval_pairs``: pairs the run never trains on). The pick, without a reward: by default the highest final
held-out winner gain (how much better than the reference the policy denoises the held-out winners). Chosen on the
testbed benchmark's tuning rewards over DPO lr x beta grids (docs/benchmarks.md, "Rewards nobody tuned for"): it
and the held-out loss came within 0.05 of the grid's best win rate on 2 of 3 rewards, the margin and the implicit
accuracy on 1; within one sweep over step sizes the margin and accuracy grow with the step while the images get
worse, and the winner gain mostly turns negative there (not always: on jpeg_compressibility the best trial's was
negative too). With a reward (``reward`` + ``prompts``): the highest win rate against the base on those prompts
(``diffalign eval``'s), and the table also gives each signal's rank correlation with it over the grid and each
trial's win rate minus the chosen one's on the same comparisons, with its interval over prompts. Give validation
prompts, not the ones you will report on, as many as you have (a warning under 32; your training prompts with
fresh seeds will do): picked on all 128 training prompts x 8 fresh seeds, it came within 0.05 of the grid's best
test win rate (32 seeds of the held-out prompts) on 8 of 9 report rewards x seeds, on 64 prompts 7 and on 32
prompts 6 of 9 (``scripts/bench_sweep.py``). ``hold_out_prompts`` (``--hold-out-prompts``) leaves the validation
prompts' pairs out of every trial's training, so a trial that does better on the prompts it trained on cannot lead
the validation for that alone: on 32 held-out prompts x 32 seeds it came within 0.05 on 3 of 3 at seed 0 (128
training prompts: 2 of 3) but missed at seed 1's left_position where they did not (docs/benchmarks.md, "Validation
prompts held out of training").

Resumable: a finished trial's ``trial.json`` is read back (the grid point must match); an interrupted one resumes
from its last checkpoint. Writes ``sweep.json`` (every trial), ``best.yaml`` (the chosen trial's config, which
repeats its run) and prints a table.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config
from .data.prompts import read_prompts
from .files import atomic_write_text

log = logging.getLogger(__name__)
# fewer and the reward pick is mostly which prompts (docs/benchmarks.md, "How precise one win rate is")
MIN_VALIDATION_PROMPTS = 32

SHORT = {"lr": "optim.lr", "beta": "objective.beta", "max_steps": "train.max_steps"}
# The held-out signals a pick without a reward can maximise (all from the final held-out measurement):
# - loss: the held-out Diffusion-DPO loss (lowest);
# - margin: the mean held-out margin (highest);
# - implicit_acc: the implicit accuracy (highest; ties by margin). Accuracy only counts signs, so a learning rate
#   too small to change any image still scores 1.0 when its tiny moves point the right way;
# - winner_gain: how much better than the reference the policy denoises the held-out winners (highest). Large steps
#   can grow the margin by making losers worse faster than winners (both get worse), which this does not reward;
# - margin_per_drift: margin / sqrt(drift), the margin per unit the policy moved (highest): how well the move points
#   toward the preference (the margin grows linearly with a small move, the drift quadratically; on the testbed it
#   still favoured the largest steps);
# - guarded_margin: the highest margin among trials whose held-out winners did not get worse (winner_gain >= 0),
#   else the highest winner_gain.
PICKS = ("loss", "margin", "implicit_acc", "winner_gain", "margin_per_drift", "guarded_margin")
DEFAULT_PICK = "winner_gain"  # chosen on the tuning rewards: see the module doc


@dataclass
class Trial:
    """One grid point, what training measured on the held-out pairs and (with a reward) its win rate."""

    index: int
    values: dict[str, Any]
    heldout: dict[str, float] = field(default_factory=dict)
    win_rate: float | None = None
    minutes: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # with --hold-out-prompts: the validation prompts file whose pairs this trial did not train on
    held_out: str = ""
    # with a reward: this trial's validation win rate minus the chosen trial's on the same comparisons, with its 95%
    # interval over prompts (difference, low, high); an interval holding 0 is "not measurably worse"
    vs_chosen: list[float] | None = None

    @property
    def name(self) -> str:
        return f"trial-{self.index:02d}"

    def signal(self, pick: str = DEFAULT_PICK) -> tuple[float, ...]:
        """What the pick without a reward maximises (see :data:`PICKS`)."""
        h, low = self.heldout, float("-inf")
        margin, winner = h.get("heldout_margin", low), h.get("heldout_winner_gain", low)
        if pick == "loss":
            return (-h.get("heldout_loss", float("inf")),)
        if pick == "margin":
            return (margin,)
        if pick == "winner_gain":
            return (winner,)
        if pick == "margin_per_drift":
            drift = h.get("heldout_drift", 0.0)
            return (margin / drift ** 0.5 if drift > 0 else low,)
        if pick == "guarded_margin":
            return (1.0, margin) if winner >= 0 else (0.0, winner)
        return (h.get("heldout_implicit_acc", low), margin)


def grid(axes: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis slowest: ``{"optim.lr": [1, 2]}`` x ... ."""
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"sweep axis {key}: no values")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def spearman(a: list, b: list) -> float:
    """Spearman's rank correlation of two equally long lists of comparable values (numbers, or tuples such as a
    pick's signal; average ranks for ties); NaN when one is constant."""
    def ranks(xs: list) -> list[float]:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        out, i = [0.0] * len(xs), 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    sa, sb = sum((x - ma) ** 2 for x in ra) ** 0.5, sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (sa * sb) if sa and sb else float("nan")


def check_pick(pick: str) -> str:
    if pick not in PICKS:
        raise ConfigError(f"--pick {pick!r}: choose one of {', '.join(PICKS)}")
    return pick


def choose(trials: list[Trial], by_reward: bool, pick: str = DEFAULT_PICK) -> Trial:
    """The best trial: by win rate with a reward, else by the held-out signal ``pick``."""
    check_pick(pick)
    return max(trials, key=(lambda t: (t.win_rate, *t.signal(pick))) if by_reward else (lambda t: t.signal(pick)))


def _train_trial(recipe: str | None, overrides: list[str], trial: Trial, folder: Path, eval_pairs: str):
    from .training import checkpoint as ckpt
    from .training.trainer import train

    run = folder / "run"
    resume = ["train.resume=latest"] if ckpt.list_checkpoints(run) else ["train.overwrite=true"]
    values = [f"{k}={v}" for k, v in trial.values.items()]
    cfg = load_config(recipe, [*overrides, *values, f"train.output_dir={run}", f"data.eval_pairs={eval_pairs}", *resume])
    if Path(cfg.data.dataset).resolve() == Path(eval_pairs).resolve():
        raise ConfigError(f"--eval-pairs {eval_pairs} is the training data; hold out pairs the runs never train on")
    return cfg, train(cfg)


def run_sweep(recipe: str | None, axes: dict[str, list], eval_pairs: str, out: str | Path,
              overrides: list[str] = (), reward: str | None = None, prompts: str | None = None,
              seeds: int = 4, sampling=None, pick: str = DEFAULT_PICK,
              hold_out_prompts: bool = False) -> tuple[list[Trial], Trial]:
    """Train every grid point of ``axes`` (config keys to values) and pick the best (see the module doc).
    ``hold_out_prompts``: the trials do not train on the pairs of the validation ``prompts`` (their win rate is then
    judged on prompts no trial saw); ``best.yaml`` trains the chosen setting on every pair.
    Returns every trial and the chosen one."""
    out = Path(out)
    check_pick(pick)  # a bad --pick fails before anything trains
    if not Path(eval_pairs).exists():
        raise FileNotFoundError(f"--eval-pairs {eval_pairs}: no such file or folder")
    if bool(reward) != bool(prompts):
        raise ConfigError("sweep: --reward and --prompts go together (the win rate needs both)")
    if hold_out_prompts and not prompts:
        raise ConfigError("sweep: --hold-out-prompts leaves the validation prompts' pairs out of training; it needs "
                          "--reward and --prompts")
    if hold_out_prompts and any(o.startswith("data.exclude_prompts=") for o in overrides):
        raise ConfigError("sweep: --hold-out-prompts sets data.exclude_prompts to the validation prompts; drop the "
                          "--set data.exclude_prompts=... or the flag")
    held_out = str(prompts) if hold_out_prompts else ""
    if held_out:
        overrides = [*overrides, f"data.exclude_prompts={held_out}"]
    if prompts and (count := len(read_prompts(prompts))) < MIN_VALIDATION_PROMPTS:
        log.warning("sweep: %d validation prompts in %s; the win rate that picks the trial varies mostly with which "
                    "prompts are drawn (on the testbed one over 16 prompts x 8 seeds is off by ~0.07, not Wilson's "
                    "~0.04): give %d or more", count, prompts, MIN_VALIDATION_PROMPTS)
    axes = {SHORT.get(k, k): v for k, v in axes.items()}
    if "train.error_space" in axes and len(axes["train.error_space"]) > 1 and not reward:
        # each trial's held-out errors are measured in its own space: their signals do not compare across spaces
        raise ConfigError("sweep: a grid over train.error_space needs --reward and --prompts; the held-out signals of "
                          "trials in different error spaces are on different scales")
    out.mkdir(parents=True, exist_ok=True)
    trials = []
    for index, values in enumerate(grid(axes)):
        trial, folder = Trial(index, values, held_out=held_out), out / f"trial-{index:02d}"
        record = folder / "trial.json"
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved["values"] != values:
                raise ConfigError(f"{record}: made for {saved['values']}, not {values}; use a new --out for another grid")
            if saved.get("held_out", "") != held_out:
                raise ConfigError(f"{record}: trained " + (f"without the pairs of {saved['held_out']}" if
                                  saved.get("held_out") else "on every pair") + "; use a new --out to "
                                  + ("hold out " + held_out if held_out else "train on every pair"))
            trials.append(Trial(**saved))
            log.info("%s: done earlier", trial.name)
            continue
        start = time.time()
        cfg, result = _train_trial(recipe, list(overrides), trial, folder, eval_pairs)
        last = result.history[-1] if result.history else {}
        trial.heldout = {k: v for k, v in last.items() if k.startswith("heldout_")}
        trial.warnings = result.warnings
        if reward:
            trial.win_rate = win_rate_vs_base(cfg.model.pretrained, result.output_dir, reward, prompts, seeds, sampling,
                                              out / "base_images", folder / "eval")
        trial.minutes = (time.time() - start) / 60
        atomic_write_text(record, json.dumps(trial.__dict__, indent=1) + "\n")
        trials.append(trial)
    best = choose(trials, by_reward=bool(reward), pick=pick)
    if reward:
        _compare_with_chosen(trials, best, out, reward)
    chosen = load_config(out / best.name / "run" / "config.yaml")
    chosen.train.resume, chosen.train.overwrite = "", False  # a fresh run of the chosen setting
    if held_out:  # the validation prompts were held out only to choose; the chosen setting trains on every pair
        chosen.data.exclude_prompts = ""
    chosen.train.output_dir = str(out / "best")
    atomic_write_text(out / "best.yaml", chosen.to_yaml())
    atomic_write_text(out / "sweep.json", json.dumps({"axes": axes, "best": best.name,
                                                      "trials": [t.__dict__ for t in trials]}, indent=1) + "\n")
    return trials, best


def _compare_with_chosen(trials: list[Trial], best: Trial, out: Path, reward: str) -> None:
    """Each trial's ``vs_chosen``: its validation comparisons against the chosen trial's, paired (the same prompts,
    seeds and base images), so a pick that is only noise shows as intervals holding 0."""
    from .evaluation.metrics import paired_difference
    from .evaluation.report import comparisons
    from .rewards import load_reward

    higher = load_reward(reward).higher_is_better

    def points(trial: Trial) -> tuple[list[float], list[int]]:
        return comparisons(json.loads((out / trial.name / "eval" / "report.json").read_text()), reward, higher)

    chosen, groups = points(best)
    for t in trials:
        t.vs_chosen = list(paired_difference(points(t)[0], chosen, groups))


def win_rate_vs_base(base: str, adapter: Path, reward: str, prompts: str, seeds: int, sampling, base_images: Path,
                     folder: Path) -> float:
    """The adapter's win rate against the ``base`` model under ``reward`` on ``prompts`` x ``seeds``, evaluated into
    ``folder`` (``diffalign eval``'s layout, so a rerun reuses its images). The base's images are drawn once into
    ``base_images`` and copied into every later evaluation that shares that folder."""
    from .evaluation.evaluate import evaluate, shared_base_images
    from .rewards import load_reward
    from .sampling.settings import Sampling

    with shared_base_images(base_images, folder):
        report = evaluate(base, [adapter], prompts, {reward: load_reward(reward)}, folder,
                          seeds=seeds, sampling=sampling or Sampling(seed_policy="shared"))
    aligned = next(name for name in report["images"] if name != "base")
    return report["win_rates"][aligned][reward]["rate"]


def sweep_table(trials: list[Trial], best: Trial) -> str:
    """The sweep as a markdown table, the chosen row marked; with a reward, each trial's win rate minus the chosen
    one's with its interval, how many are not measurably worse, how well each held-out signal ranks the trials
    (Spearman with the win rate) and what its pick would have won."""
    keys = list(trials[0].values)
    with_reward = any(t.win_rate is not None for t in trials)
    paired = with_reward and all(t.vs_chosen for t in trials)
    head = [*keys, "held-out loss", "implicit acc", "margin", "winner gain", "drift", *(["win rate"] if with_reward else []),
            *(["vs chosen [95%]"] if paired else []), "minutes", "warnings", ""]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    nan = float("nan")
    for t in trials:
        h, versus = t.heldout, []
        if paired:
            diff, low, high = t.vs_chosen
            versus = [f"{diff:+.3f} [{low:+.2f}, {high:+.2f}]"]
        cells = [*(str(t.values[k]) for k in keys), f"{h.get('heldout_loss', nan):.4f}",
                 f"{h.get('heldout_implicit_acc', nan):.3f}", f"{h.get('heldout_margin', nan):+.3f}",
                 f"{h.get('heldout_winner_gain', nan):+.3f}",
                 f"{h.get('heldout_drift', nan):.3f}", *([f"{t.win_rate:.3f}"] if with_reward else []), *versus,
                 f"{t.minutes:.1f}", str(len(t.warnings)), "**chosen**" if t is best else ""]
        rows.append("| " + " | ".join(cells) + " |")
    text = "\n".join(rows) + "\n"
    if paired and len(trials) > 1:
        tied = sum(t.vs_chosen[2] >= 0 for t in trials if t is not best)
        text += (f"\n{tied} of the {len(trials) - 1} other trials are not measurably worse than the chosen one on "
                 "these validation prompts (their paired difference's 95% interval over prompts holds 0)"
                 + (": among those the pick is noise; more validation prompts narrow it\n" if tied else "\n"))
    if with_reward and len(trials) >= 3:
        text += "\n"
        for pick in PICKS:
            rho = spearman([t.signal(pick) for t in trials], [t.win_rate for t in trials])
            chosen = choose(trials, by_reward=False, pick=pick)
            text += (f"- held-out {pick}: Spearman {rho:+.2f} with the win rate; its pick ({chosen.name}) wins "
                     f"{chosen.win_rate:.3f} (best in the grid {best.win_rate:.3f})\n")
    return text
