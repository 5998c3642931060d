"""``diffalign labels-to-pairs``: people's labels of a ``sample`` or ``make-pairs`` folder, turned into training data
for the offline objectives.

- pairs (DPO, MaPO, InPO, SmPO): per prompt, the mean score of each image over its annotators; every ordered pair
  of images whose means differ (the higher one chosen), ties dropped. A ranking gives all its ordered pairs, a
  best/worst choice best > the others > worst, thumbs liked > disliked.
- unpaired (KTO, ``unpaired=True``): thumbs labels (every score 0 or 1) make an image desirable when more of its
  annotators liked it than not (even splits dropped); other scores split each prompt at its median, as
  ``make-pairs --pairing thumbs`` does (:func:`~diffalign.rewards.combine.thumbs_from_scores`).

The output is a local-pairs (or unpaired) JSONL whose image paths are relative to the file's folder, so it must
lie in the labelled folder or a folder above it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..data.errors import DataError
from ..files import atomic_write_text
from ..rewards.combine import thumbs_from_scores
from ..sampling.human import read_label_lines
from .items import read_items

log = logging.getLogger(__name__)


def labels_to_pairs(folder: str | Path, labels: str | Path | None = None, out: str | Path | None = None,
                    unpaired: bool = False) -> Path:
    """Write the pairs (or unpaired labels) that the label file of ``folder`` implies; returns the file written
    (default ``FOLDER/human_pairs.jsonl`` or ``FOLDER/human_unpaired.jsonl``)."""
    labelled = read_items(folder)
    root = Path(folder).resolve()
    labels = Path(labels) if labels else root / "labels.jsonl"
    out = Path(out) if out else root / ("human_unpaired.jsonl" if unpaired else "human_pairs.jsonl")
    base = out.resolve().parent
    if not root.is_relative_to(base):
        raise DataError(f"--out {out}: must lie in {root} or a folder above it (image paths are relative to the file "
                        "and may not leave its folder)")
    manifest = {"per_prompt": labelled.per_prompt, "prompts": [{"prompt_id": i.prompt_id} for i in labelled.items]}
    lines = read_label_lines(labels, manifest)
    thumbs = all(s in (0.0, 1.0) for _, scores in lines for s in scores)
    by_prompt: dict[int, list[list[float]]] = {}
    for pid, scores in lines:
        by_prompt.setdefault(pid, []).append(scores)
    items = {i.prompt_id: i for i in labelled.items}
    rows = []
    for pid in sorted(by_prompt):
        item, votes = items[pid], by_prompt[pid]
        mean = [sum(col) / len(votes) for col in zip(*votes)]
        path = [os.path.relpath(root / image, base) for image in item.images]
        if unpaired:
            chosen = [(k, int(m > 0.5)) for k, m in enumerate(mean) if m != 0.5] if thumbs else thumbs_from_scores(mean)
            rows += [{"prompt": item.prompt, "image": path[k], "label": label, "score": mean[k]} for k, label in chosen]
        else:
            rows += [{"prompt": item.prompt, "chosen": path[i], "rejected": path[j], "chosen_score": mean[i],
                      "rejected_score": mean[j]}
                     for i in range(len(mean)) for j in range(len(mean)) if mean[i] > mean[j]]
    what = "unpaired labels" if unpaired else "pairs"
    if not rows:
        raise DataError(f"{labels}: no {what}: every labelled prompt's images tie")
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    log.info("%s: %d %s from %d labelled prompt(s)", out, len(rows), what, len(by_prompt))
    return out
