"""Run by tests/test_distributed.py under ``torch.distributed.run``: trains with the given overrides and records,
per rank, the rows (D3PO: the round's items) of every micro-batch, a fingerprint of the LoRA weights after every step, the logged metrics
and which files this rank wrote."""

import hashlib
import json
import sys
from pathlib import Path

import diffalign.training.checkpoint as ckpt
import diffalign.training.trainer as trainer_mod
from diffalign.config import load_config

record_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
trainer = trainer_mod.Trainer(load_config(None, overrides))
rank = trainer.accelerator.process_index
record = {"rows": [], "weights": [], "writes": []}

real_step = trainer.training_step


def step(batch, micro_step):
    if "row" in batch:  # offline pairs: dataset rows; D3PO: (pair, step) items of the round
        record["rows"].append([int(r) for r in batch["row"]])
    else:
        record["rows"].append([f"{i}:{j}" for i, j in batch["items"]])
    metrics = real_step(batch, micro_step)
    if trainer.accelerator.sync_gradients:
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        digest = hashlib.sha256()
        for name, p in sorted(unet.named_parameters()):
            if "lora_" in name:
                digest.update(p.detach().cpu().numpy().tobytes())
        record["weights"].append(digest.hexdigest())
    return metrics


def spy(name, fn):
    def wrapped(*a, **k):
        record["writes"].append(name)
        return fn(*a, **k)
    return wrapped


trainer.training_step = step
trainer_mod.save_lora = spy("adapter", trainer_mod.save_lora)
ckpt.save_checkpoint = spy("checkpoint", ckpt.save_checkpoint)
result = trainer.train()
record["history"] = result.history
if hasattr(trainer.feed, "source"):  # D3PO: the round every rank trained on
    record["round_prompts"] = trainer.feed.round.rollouts.prompts
(record_dir / f"rank{rank}.json").write_text(json.dumps(record))
