"""Two processes on CPU (gloo) with torch.distributed.run: identical LoRA weights on every rank after every step,
disjoint data shards, metrics averaged across ranks, only rank 0 writes; checkpoints move between 1 and 2
processes; D3PO's online rounds shared and sharded across ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, record: Path, overrides: list[str]) -> list[dict]:
    record.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(WORKER), str(record), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture
def overrides(tiny_sd15, pickapic, tmp_path):
    return [f"model.pretrained={tiny_sd15}", f"data.dataset={pickapic}", "data.resolution=32", "train.batch_size=2",
            "log.to=none", "optim.lr=1e-3", "lora.rank=4", f"cache.dir={tmp_path / 'cache'}",
            "data.caption_dropout=0"]


def test_two_processes_stay_in_sync_and_shard_the_data(overrides, tmp_path):
    out = tmp_path / "two"
    ranks = _run(2, tmp_path / "rec2", [*overrides, "train.max_steps=2", "train.checkpoint_every=2",
                                        f"train.output_dir={out}"])
    assert len(ranks[0]["weights"]) == 2 and ranks[0]["weights"] == ranks[1]["weights"]
    for a, b in zip(ranks[0]["rows"], ranks[1]["rows"]):
        assert not set(a) & set(b), (a, b)  # each micro-step, the two ranks see different pairs
    seen = [r for rank in ranks for batch in rank["rows"] for r in batch]
    assert len(seen) == len(set(seen)) == 8  # 2 steps x 2 ranks x 2 pairs, none twice
    assert [h["loss"] for h in ranks[0]["history"]] == [h["loss"] for h in ranks[1]["history"]]  # gathered
    assert ranks[0]["writes"] == ["checkpoint", "adapter"] and ranks[1]["writes"] == []
    assert (out / "checkpoint-2").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()

    # the 2-process checkpoint resumes on 1 process, which sees the remaining pairs of the epoch
    one = _run(1, tmp_path / "rec1", [*overrides, "train.max_steps=3", "train.resume=latest", f"train.output_dir={out}"])
    assert len(one[0]["history"]) == 1 and not set(one[0]["rows"][0]) & set(seen)


def test_a_one_process_checkpoint_resumes_on_two(overrides, tmp_path):
    out = tmp_path / "one"
    first = _run(1, tmp_path / "rec1", [*overrides, "train.max_steps=2", "train.checkpoint_every=2",
                                        f"train.output_dir={out}"])
    ranks = _run(2, tmp_path / "rec2", [*overrides, "train.max_steps=3", "train.resume=latest",
                                        f"train.output_dir={out}"])
    assert ranks[0]["weights"] == ranks[1]["weights"] and len(ranks[0]["history"]) == 1
    seen = {r for batch in first[0]["rows"] for r in batch}
    assert not (set(ranks[0]["rows"][0]) | set(ranks[1]["rows"][0])) & seen  # no pair of the epoch repeated


def test_two_processes_share_a_d3po_round_and_shard_its_items(tiny_sd15, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green triangle\n")
    out = tmp_path / "d3po"
    common = [f"model.pretrained={tiny_sd15}", "objective.name=d3po", f"data.prompts={prompts}",
              "objective.reward=[brightness]", "sampling.steps=3", "objective.prompts_per_round=2",
              "sampling.guidance=3.0", "data.resolution=32", "train.batch_size=1", "log.to=none", "optim.lr=1e-3",
              "lora.rank=4", f"train.output_dir={out}"]
    ranks = _run(2, tmp_path / "rec", [*common, "train.max_steps=2", "train.checkpoint_every=2"])
    assert len(ranks[0]["weights"]) == 2 and ranks[0]["weights"] == ranks[1]["weights"]  # in sync every step
    assert ranks[0]["round_prompts"] == ranks[1]["round_prompts"] and len(ranks[0]["round_prompts"]) == 4  # 2 x 2
    items = [[i for batch in rank["rows"] for i in batch] for rank in ranks]
    assert len(items[0]) == len(items[1]) and not set(items[0]) & set(items[1])  # same count, disjoint slices
    assert [h["loss"] for h in ranks[0]["history"]] == [h["loss"] for h in ranks[1]["history"]]
    assert ranks[0]["writes"] == ["checkpoint", "adapter"] and ranks[1]["writes"] == []
    assert (out / "checkpoint-2" / "rollouts.safetensors").is_file()

    # the 2-process round (4 pairs x 3 steps = 6 micro-batches per rank) was used up: on 1 process the resume
    # starts the next round
    one = _run(1, tmp_path / "rec1", [*common, "train.max_steps=3", "train.resume=latest"])
    assert len(one[0]["history"]) == 1 and one[0]["history"][0]["round"] == 1.0


@pytest.mark.parametrize("name", ["ddpo", "grpo"])
def test_two_processes_share_a_policy_gradient_round(name, tiny_sd15, tmp_path):
    """Advantages over the gathered round (the same on both ranks), disjoint training slices, LoRA in sync."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green triangle\n")
    size = "objective.group_size=2" if name == "grpo" else "objective.per_prompt=2"
    common = [f"model.pretrained={tiny_sd15}", f"objective.name={name}", f"data.prompts={prompts}",
              "objective.reward=[brightness]", "sampling.steps=3", "objective.prompts_per_round=1", size,
              "objective.timestep_fraction=1.0", "data.resolution=32", "train.batch_size=1", "log.to=none",
              "optim.lr=1e-3", "lora.rank=4", f"train.output_dir={tmp_path / name}", "train.max_steps=2"]
    ranks = _run(2, tmp_path / "rec", common)
    assert len(ranks[0]["weights"]) == 2 and ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["round_prompts"] == ranks[1]["round_prompts"] and len(ranks[0]["round_prompts"]) == 2  # 1 x 2
    items = [[i for batch in rank["rows"] for i in batch] for rank in ranks]
    assert len(items[0]) == len(items[1]) and not set(items[0]) & set(items[1])
    assert [h["loss"] for h in ranks[0]["history"]] == [h["loss"] for h in ranks[1]["history"]]
