"""From people (or a reward) looking at images to training data: make-pairs --pairing thumbs, labels-to-pairs, and
the round trips sample -> label (API) -> D3PO and make-pairs -> rank labels -> labels-to-pairs -> DPO, and
make-pairs thumbs -> KTO."""

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.config import DataConfig
from diffalign.data.errors import DataError
from diffalign.data.readers import load_pairs
from diffalign.data.unpaired import load_unpaired
from diffalign.labelling.convert import labels_to_pairs
from diffalign.labelling.server import close_app, create_app
from diffalign.rewards.combine import pairs_from_scores, thumbs_from_scores
from diffalign.training.trainer import Trainer, train


def test_thumbs_split_each_prompt_at_its_median():
    assert thumbs_from_scores([0.1, 0.5, 0.3, 0.9]) == [(0, 0), (1, 1), (2, 0), (3, 1)]  # median 0.4
    assert thumbs_from_scores([1.0, 2.0, 3.0]) == [(0, 0), (2, 1)]  # odd K: the middle image gets no label
    assert thumbs_from_scores([0.1, 0.5, 0.3, 0.9], margin=0.15) == [(0, 0), (3, 1)]  # within 0.15 of 0.4: dropped
    assert thumbs_from_scores([0.2, 0.2, 0.2]) == []  # all tie
    with pytest.raises(ValueError, match="choose one of best-worst, all, pareto"):
        pairs_from_scores(torch.zeros(3, 1), "thumbs")


@pytest.fixture(scope="module")
def made(tiny_sd15, tmp_path_factory):
    """A make-pairs folder of the tiny SD1.5: 3 prompts x 4 images scored by brightness, with thumbs beside."""
    tmp = tmp_path_factory.mktemp("made")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green triangle\n")
    common = ["make-pairs", "--base", str(tiny_sd15), "--prompts", str(prompts), "--per-prompt", "4", "--reward",
              "brightness", "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp / "out")]
    assert main([*common, "--pairing", "thumbs"]) == 0
    return tmp / "out"


def test_make_pairs_thumbs_writes_unpaired_labels_for_kto(made):
    lines = [json.loads(line) for line in (made / "unpaired.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (made / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and not (made / "pairs.jsonl").exists()  # 4 images, no ties: 2 up and 2 down each
    for rec in records:
        mine = {x["image"]: x["label"] for x in lines if x["prompt"] == rec["prompt"]}
        order = sorted(range(4), key=lambda k: rec["scores"]["brightness"][k])
        assert [mine[rec["images"][k]] for k in order] == [0, 0, 1, 1]  # the brighter half is desirable
    src = load_unpaired(DataConfig(dataset=str(made)))  # the folder works as data.dataset
    assert len(src) == 12 and sum(src.desirable(r) for r in src.rows) == 6


def test_kto_trains_from_make_pairs_thumbs(made, tiny_sd15, make_config):
    result = train(make_config(tiny_sd15, "objective.name=kto", f"data.dataset={made}", "train.max_steps=2",
                               "train.batch_size=4"))
    assert result.steps == 2 and result.adapter.is_file()


def _label(client, annotator, pid, scores):
    r = client.post("/api/labels", json={"prompt_id": pid, "annotator": annotator, "scores": scores})
    assert r.status_code == 200, r.get_json()


def test_rank_labels_to_pairs_to_dpo(made, tiny_sd15, make_config):
    app = create_app(made, mode="rank")
    try:
        client = app.test_client()
        _label(client, "ann", 0, [3, 2, 1, 0])  # a full ranking: 6 ordered pairs
        _label(client, "bob", 0, [3, 2, 0, 1])  # means 3, 2, 0.5, 0.5: the last two tie
        _label(client, "ann", 1, [1, 1, 1, 1])  # all tie: no pair
    finally:
        close_app(app)
    out = labels_to_pairs(made)
    assert out == made / "human_pairs.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    images = json.loads((made / "scores.jsonl").read_text().splitlines()[0])["images"]
    assert [(images.index(r["chosen"]), images.index(r["rejected"])) for r in rows] == \
        [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert rows[0]["chosen_score"] == 3 and rows[1]["rejected_score"] == 0.5
    assert len(load_pairs(DataConfig(dataset=str(out)))) == 5
    result = train(make_config(tiny_sd15, f"data.dataset={out}", "train.max_steps=2"))
    assert result.steps == 2


def test_thumbs_labels_to_unpaired(made):
    labels = made / "thumbs.jsonl"
    labels.write_text('{"prompt_id": 0, "annotator": "a", "scores": [1, 0, 1, 0]}\n'
                      '{"prompt_id": 0, "annotator": "b", "scores": [1, 0, 0, 0]}\n'
                      '{"prompt_id": 2, "annotator": "a", "scores": [0, 0, 1, 1]}\n')
    out = labels_to_pairs(made, labels, made / "mine.jsonl", unpaired=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # prompt 0: image 2 is 1 vs 1 (dropped); prompt 2 as given
    assert [(r["prompt"], r["label"]) for r in rows] == [("a red square", 1), ("a red square", 0),
                                                         ("a red square", 0), ("a green triangle", 0),
                                                         ("a green triangle", 0), ("a green triangle", 1),
                                                         ("a green triangle", 1)]
    assert len(load_unpaired(DataConfig(dataset=str(out)))) == 7


def test_labels_to_pairs_refuses_what_it_cannot_write(made, tmp_path):
    labels = made / "ties.jsonl"
    labels.write_text('{"prompt_id": 1, "annotator": "a", "scores": [1, 1, 1, 1]}\n')
    with pytest.raises(DataError, match=r"ties.jsonl: no pairs: every labelled prompt's images tie"):
        labels_to_pairs(made, labels, made / "x.jsonl")
    with pytest.raises(DataError, match=r"--out .*: must lie in .* or a folder above it"):
        labels_to_pairs(made, labels, tmp_path / "elsewhere" / "x.jsonl")
    assert main(["labels-to-pairs", str(tmp_path / "nothing")]) == 2  # not a labelled folder: one line


def test_sample_label_with_the_page_then_d3po(tiny_sd15, online_config, tmp_path):
    prompts = tmp_path / "human.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "samples"
    assert main(["sample", "--base", str(tiny_sd15), "--prompts", str(prompts), "--per-prompt", "3", "--steps", "3",
                 "--resolution", "32", "--out", str(out)]) == 0
    app = create_app(out, mode="best-worst")
    try:
        client = app.test_client()
        assert [i["prompt_id"] for i in client.get("/api/items?annotator=a").get_json()["items"]] == [0, 1]
        _label(client, "a", 0, [0, 0.5, 1])
        _label(client, "a", 1, [1, 0, 0.5])
    finally:
        close_app(app)
    cfg = online_config(tiny_sd15, "d3po", "data.prompts=", f"data.labels={out / 'labels.jsonl'}",
                        "objective.reward=[]", "objective.prompts_per_round=2", "train.batch_size=1",
                        "train.max_steps=2")
    trainer = Trainer(cfg)
    # (prompt, winner, loser): best > middle > worst, every ordered pair of different scores
    assert sorted(trainer.feed.source.stored_pairs) == [(0, 1, 0), (0, 2, 0), (0, 2, 1), (1, 0, 1), (1, 0, 2), (1, 2, 1)]
    assert trainer.train().steps == 2
