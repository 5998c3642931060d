"""``report.html`` for ``diffalign eval``: one page with the numbers, plots (matplotlib PNGs) and, per prompt,
the images of every model side by side (same seeds), all referenced relative to the page."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

from ..files import atomic_write_text
from .metrics import outcomes, prompt_groups

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
.grid img{width:128px;height:128px;image-rendering:pixelated;margin:1px}.grid td{text-align:left;vertical-align:top}
img.plot{max-width:560px;margin:4px}img.samples{max-width:100%;image-rendering:pixelated}"""

# the page counts images that really decoded, so a headless browser test can read the result from the DOM
CHECK = """<script>window.addEventListener('load',()=>{const imgs=[...document.images];
document.body.dataset.imagesTotal=imgs.length;
document.body.dataset.imagesOk=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;});</script>"""


def plots(out: Path, report: dict) -> list[str]:
    """Score distributions per head (one box per model) and win rates with 95% intervals; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    models = list(report["scores"])
    heads = list(report["scores"][models[0]])
    for head in heads:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.boxplot([report["scores"][m][head] for m in models])
        ax.set_xticks(range(1, len(models) + 1), models)
        ax.set_title(f"{head}: score per image")
        fig.tight_layout()
        name = f"plots/scores_{_slug(head)}.png"
        fig.savefig(out / name, dpi=96)
        plt.close(fig)
        files.append(name)
    if report["win_rates"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        labels, rates, low, high = [], [], [], []
        for model, per_head in report["win_rates"].items():
            for head, w in per_head.items():
                labels.append(f"{model}\n{head}")
                rates.append(w["rate"])
                bounds = prompt_bounds(w)
                low.append(w["rate"] - bounds[0])
                high.append(bounds[1] - w["rate"])
        ax.bar(range(len(rates)), rates, yerr=[low, high], capsize=4, color="#4c72b0")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(rates)), labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("win rate vs base (95% interval over prompts)")
        fig.tight_layout()
        fig.savefig(out / "plots/win_rates.png", dpi=96)
        plt.close(fig)
        files.append("plots/win_rates.png")
    return files


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th{' class=l' if i == 0 else ''}>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{' class=l' if i == 0 else ''}>{html.escape(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned text columns, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


DIFFERENCE_HEADER = ["a", "b", "head", "a - b", "95% CI, prompts", "95% CI, these prompts", "verdict"]


def comparisons(report: dict, head: str, higher_is_better: bool = True,
                model: str | None = None) -> tuple[list[float], list[int]]:
    """The outcome of each of ``model``'s comparisons with the base under ``head`` in a ``diffalign eval`` report
    (1 a win, 0.5 a tie, 0 a loss) and the prompt of each: what a paired difference of two reports reads.
    ``model`` defaults to the report's one adapter."""
    if model is None:
        adapters = [m for m in report["scores"] if m != "base"]
        if len(adapters) != 1:
            raise ValueError(f"the report holds adapters {adapters}: name the model to read")
        model = adapters[0]
    points = outcomes(report["scores"][model][head], report["scores"]["base"][head], higher_is_better)
    return points, prompt_groups(len(report["prompts"]), report["seeds"])


def prompt_bounds(w: dict) -> tuple[float, float]:
    """A win rate's 95% interval over prompts (see :mod:`diffalign.evaluation.metrics`); reports written before it
    was measured have only the Wilson interval, which then stands in."""
    return (w["prompt_low"], w["prompt_high"]) if w.get("prompt_low") is not None else (w["low"], w["high"])


def _win_rows(report: dict) -> list[list[str]]:
    """Per adapter and head: model, head, win rate, 95% interval over prompts, Wilson's over comparisons,
    wins/ties/n (the page's and the printout's)."""
    return [[m, h, f"{w['rate']:.3f}", "[{:.3f}, {:.3f}]".format(*prompt_bounds(w)),
             f"[{w['low']:.3f}, {w['high']:.3f}]", f"{w['wins']}/{w['ties']}/{w['n']}"]
            for m, per_head in report["win_rates"].items() for h, w in per_head.items()]


def _difference_rows(report: dict) -> list[list[str]]:
    """Per pair of adapters and head: a, b, head, a's win rate minus b's, its 95% intervals over prompts and for
    these prompts (other seeds; "-" in reports written before it was measured), the verdict, read on the interval
    over prompts (reports of one adapter, or written before differences were measured, have none)."""
    def verdict(d: dict) -> str:
        return f"{d['a']} better" if d["low"] > 0 else f"{d['b']} better" if d["high"] < 0 else "not measurably"

    def these_prompts(d: dict) -> str:
        return f"[{d['seed_low']:+.3f}, {d['seed_high']:+.3f}]" if "seed_low" in d else "-"
    return [[d["a"], d["b"], d["head"], f"{d['difference']:+.3f}", f"[{d['low']:+.3f}, {d['high']:+.3f}]",
             these_prompts(d), verdict(d)] for d in report.get("differences") or []]


def _accuracy_rows(report: dict) -> list[list[str]]:
    """Per adapter: model, held-out implicit accuracy, ranking accuracy, pairs."""
    return [[m, f"{a['implicit_accuracy']:.3f}", f"{a['ranking_accuracy']:.3f}", f"{a['pairs']:.0f}"]
            for m, a in (report.get("pair_accuracy") or {}).items()]


def summary_text(report: dict) -> str:
    """The numbers of a ``diffalign eval`` report as plain text (what the command prints): per adapter and reward
    head, the win rate vs base with its 95% intervals (over prompts, and Wilson's over comparisons), wins/ties/n
    and the mean scores of base and adapter; with several adapters, each pair's difference in win rate with its
    interval; then the held-out implicit and ranking accuracies when pairs were given."""
    base, images = report["mean_scores"]["base"], len(report["prompts"]) * report["seeds"]
    lines = [f"{len(report['prompts'])} prompts x {report['seeds']} seeds = {images} images per model; win rate: "
             "share of (prompt, seed) where the adapter's image scores better than base's (ties count 1/2)"]
    rows = [[*row, f"{base[row[1]]:.4g}", f"{report['mean_scores'][row[0]][row[1]]:.4g}"] for row in _win_rows(report)]
    lines += _columns(["model", "head", "win rate", "95% CI, prompts", "95% CI, Wilson", "wins/ties/n", "base mean",
                       "aligned mean"], rows)
    if report.get("differences"):
        lines += ["", "adapter vs adapter: win rate of a minus b's, on the same comparisons",
                  *_columns(DIFFERENCE_HEADER, _difference_rows(report))]
    if report.get("pair_accuracy"):
        lines += ["", "held-out pairs", *_columns(["model", "implicit acc", "ranking acc", "pairs"],
                                                  _accuracy_rows(report))]
    return "\n".join(lines)


def write_html(out: Path, report: dict, higher_is_better: Mapping[str, bool]) -> Path:
    """Write ``out/report.html`` (and its plots) from a ``diffalign eval`` report."""
    models = list(report["scores"])
    heads = list(report["scores"][models[0]])
    arrow = {h: "↑" if higher_is_better.get(h, True) else "↓" for h in heads}
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>diffalign eval</title><style>{STYLE}</style>"
             f"</head><body><h1>diffalign eval</h1><p>base <code>{html.escape(report['base'])}</code>, "
             f"{len(report['prompts'])} prompts × {report['seeds']} seeds, {report['steps']} steps, "
             f"CFG {report['guidance']}</p>", "<h2>Mean scores</h2>",
             _table(["model", *[f"{h} {arrow[h]}" for h in heads]],
                    [[m, *[f"{report['mean_scores'][m][h]:.4g}" for h in heads]] for m in models])]
    if report["win_rates"]:
        parts += ["<h2>Win rate vs base</h2>", _table(
            ["model", "head", "win rate", "95% interval over prompts", "95% Wilson interval", "wins/ties/n"],
            _win_rows(report))]
    if report.get("differences"):
        parts += ["<h2>Adapter vs adapter</h2><p>win rate of a minus b's, on the same (prompt, seed) comparisons</p>",
                  _table(DIFFERENCE_HEADER, _difference_rows(report))]
    if report["pair_accuracy"]:
        parts += ["<h2>Held-out pairs</h2>", _table(["model", "implicit accuracy", "ranking accuracy", "pairs"],
                                                    _accuracy_rows(report))]
    grids = [m for m in models[1:] if (out / "plots" / f"samples_{m}.png").is_file()]
    if grids:  # the base-over-aligned grids (already enlarged), shown at their own size
        parts += ["<h2>Base vs aligned</h2>", "".join(
            f"<p>{html.escape(m)} (top row base, bottom row aligned; first seed of the first prompts)</p>"
            f"<img class=samples src='plots/samples_{html.escape(m)}.png' alt='base vs {html.escape(m)}'>"
            for m in grids)]
    parts += ["<h2>Plots</h2>", "".join(f"<img class=plot src='{html.escape(f)}' alt='{html.escape(f)}'>"
                                        for f in plots(out, report))]
    parts.append("<h2>Images</h2><table class=grid><tr><th class=l>prompt</th>"
                 + "".join(f"<th class=l>{html.escape(m)}</th>" for m in models) + "</tr>")
    seeds = report["seeds"]
    for i, prompt in enumerate(report["prompts"]):
        cells = "".join("<td>" + "".join(f"<img src='{html.escape(p)}' alt='{html.escape(m)} seed {k}'>" for k, p in
                                         enumerate(report["images"][m][i * seeds:(i + 1) * seeds])) + "</td>"
                        for m in models)
        parts.append(f"<tr><td class=l>{html.escape(prompt)}</td>{cells}</tr>")
    parts.append(f"</table>{CHECK}</body></html>")
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
