"""`diffalign score` and `diffalign make-pairs`: values by hand, datasets that the readers load back, resume,
plug-in rewards, bad input."""

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.config import DataConfig
from diffalign.data.readers import load_pairs
from diffalign.rewards.combine import combine, pairs_from_scores, signed
from diffalign.sampling import make_pairs as make_pairs_module
from diffalign.testing import write_pairs_jsonl, write_pickapic_parquet, write_plugin_distribution


def _brightness(path) -> float:
    img = Image.open(path).convert("RGB")
    return float(torch.tensor(list(img.getdata()), dtype=torch.float32).mean() / 255)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A user module named by import path, and an installed distribution declaring an entry point."""
    (tmp_path / "my_rewards.py").write_text("def redness(images, prompts):\n    return images[:, 0].mean(dim=(1, 2))\n")
    write_plugin_distribution(tmp_path / "site", "blue_rewards", "def blueness(images, prompts):\n"
                              "    return images[:, 2].mean(dim=(1, 2))\n", {"blueness": "blue_rewards:blueness"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    for mod in ("my_rewards", "blue_rewards"):
        sys.modules.pop(mod, None)


def test_score_images_folder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, colour in (("b.png", (255, 0, 0)), ("a.png", (0, 0, 128))):
        Image.new("RGB", (16, 16), colour).save(folder / name)
    (tmp_path / "p.txt").write_text("red\n\nnavy\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--reward", "brightness", "--images", str(folder), "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["red", "navy"]  # file-name order: a.png, b.png
    assert rows[0]["path"].endswith("a.png")
    assert rows[0]["brightness"] == pytest.approx(128 / 255 / 3, abs=1e-6)
    assert rows[1]["brightness"] == pytest.approx(1 / 3, abs=1e-6)


def test_score_local_pairs_feeds_soft_labels(tmp_path, plugin):
    pairs = write_pairs_jsonl(tmp_path / "data", n=4, size=32)
    assert main(["score", "--reward", "brightness,my_rewards:redness,blueness", "--weights", "1,2,0",
                 "--dataset", str(pairs)]) == 0
    out = pairs.with_name("pairs.scored.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    first = rows[0]
    bright = _brightness(pairs.parent / first["chosen"])
    assert first["chosen_brightness"] == pytest.approx(bright, abs=1e-5)
    assert first["chosen_score"] == pytest.approx(bright + 2 * first["chosen_my_rewards:redness"], abs=1e-5)
    assert "rejected_blueness" in first
    source = load_pairs(DataConfig(dataset=str(out)))
    assert source.score_pairs()[0] == pytest.approx((first["chosen_score"], first["rejected_score"]))


def test_score_a_make_pairs_folder_like_data_dataset(tmp_path):
    pairs = write_pairs_jsonl(tmp_path / "data", n=2, size=32)  # data/pairs.jsonl, as make-pairs writes
    assert main(["score", "--reward", "brightness", "--dataset", str(pairs.parent)]) == 0
    assert (pairs.parent / "pairs.scored.jsonl").is_file()


def test_score_pickapic_parquet(tmp_path):
    data = write_pickapic_parquet(tmp_path / "pp.parquet", n=4, size=32)
    out = tmp_path / "scored.parquet"
    assert main(["score", "--reward", "jpeg_compressibility", "--dataset", str(data), "--out", str(out)]) == 0
    source = load_pairs(DataConfig(dataset=str(out)))
    w, l = source.score_pairs()[0]
    assert w < 0 and l < 0  # minus kilobytes
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("args, message", [
    (["--images", "IMGS"], "either --images DIR with --prompts FILE, or --dataset"),
    (["--images", "IMGS", "--prompts", "TWO"], "2 prompts for 3 images"),
    (["--dataset", "PAIRS", "--out", "ELSEWHERE"], "in the dataset's own folder"),
    (["--dataset", "PAIRS", "--weights", "1,2"], "--weights has 2 number"),
    (["--dataset", "PAIRS", "--reward-option", "clip.model=x"], r"options given for reward\(s\) clip that are not used"),
    (["--dataset", "PAIRS", "--reward-option", "brightness.gain=2"], r"reward 'brightness': Brightness\(\) takes no arguments"),
])
def test_score_bad_input(tmp_path, capsys, args, message):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    (tmp_path / "two.txt").write_text("a\nb\n")
    pairs = write_pairs_jsonl(tmp_path / "data", n=2, size=16)
    subs = {"IMGS": str(folder), "TWO": str(tmp_path / "two.txt"), "PAIRS": str(pairs),
            "ELSEWHERE": str(tmp_path / "out.jsonl")}
    assert main(["score", "--reward", "brightness", *[subs.get(a, a) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out.jsonl").exists() and not (pairs.parent / "pairs.scored.jsonl").exists()


def select_pairs(scores, combined, pairing="best-worst", margin=0.0, higher_is_better=None):
    """make-pairs' pairing of one prompt, through the one reward-combination module."""
    table = signed(torch.tensor([scores[h] for h in scores]).T, [(higher_is_better or {}).get(h, True) for h in scores])
    return pairs_from_scores(table, pairing, combined, margin)


def test_select_pairs():
    scores = {"a": [0.0, 2.0, 1.0], "b": [1.0, 0.0, 0.5]}
    combined = [1.0, 2.0, 1.5]
    assert combine(scores, {"a": True, "b": True}) == combined
    assert combine(scores, {"a": True, "b": False}, [1.0, 2.0]) == [-2.0, 2.0, 0.0]
    assert select_pairs(scores, combined) == [(1, 0)]
    assert select_pairs(scores, combined, margin=1.0) == []
    assert select_pairs(scores, combined, "all", margin=0.2) == [(1, 0), (1, 2), (2, 0)]
    assert select_pairs(scores, combined, "pareto") == []  # every pair trades one head against the other
    assert select_pairs({"a": [0.0, 2.0, 2.0], "b": [1.0, 1.0, 0.5]}, combined, "pareto") == [(1, 0), (1, 2)]
    # lower-is-better heads flip
    assert select_pairs({"a": [0.0, 2.0]}, [0.0, 2.0], "pareto", higher_is_better={"a": False}) == [(0, 1)]


def test_make_pairs_generates_scores_and_resumes(tmp_path, tiny_sd15, plugin, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "pairs"
    args = ["make-pairs", "--base", str(tiny_sd15), "--prompts", str(prompts), "--per-prompt", "3", "--reward",
            "brightness,blueness", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red square", "a blue circle"]  # best vs worst: one pair per prompt
    for r in rows:
        assert r["chosen_score"] > r["rejected_score"]
        assert r["chosen_score"] == pytest.approx(r["chosen_brightness"] + r["chosen_blueness"])
        assert r["chosen_brightness"] == pytest.approx(_brightness(out / r["chosen"]), abs=1e-5)
    assert len(load_pairs(DataConfig(dataset=str(out / "pairs.jsonl")))) == 2
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    assert len(before) == 6

    # a rerun with everything done does not load the model
    monkeypatch.setattr("diffalign.pipelines.load_aligned_pipeline", lambda *a, **k: pytest.fail("regenerated"))
    assert main(args) == 0
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    # interrupted after the first prompt: only the second is generated again, with the same seeds
    records = (out / "scores.jsonl").read_text().splitlines()
    (out / "scores.jsonl").write_text(records[0] + "\n" + records[1][:20])  # a torn last line
    for name in [n for n in before if n.startswith("p00001")]:
        (out / "images" / name).unlink()
    calls = []
    real = make_pairs_module.score_images
    monkeypatch.setattr(make_pairs_module, "score_images", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert main(args) == 0
    assert calls == [["a blue circle"] * 3]
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before
    assert [json.loads(line)["prompt_id"] for line in (out / "scores.jsonl").read_text().splitlines()] == [0, 1]

    # other settings in the same folder: refused
    capsys.readouterr()
    assert main([*args[:-2], "--seed", "1", "--out", str(out)]) == 2
    assert "seed differ" in capsys.readouterr().err


def test_make_pairs_with_an_import_path_reward_and_all_pairs(tmp_path, tiny_sd15, plugin):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a green square"}) + "\n")
    out = tmp_path / "pairs"
    assert main(["make-pairs", "--base", str(tiny_sd15), "--prompts", str(prompts), "--per-prompt", "3", "--reward",
                 "my_rewards:redness", "--pairing", "all", "--steps", "2", "--height", "32", "--width", "32",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # three distinct scores: every ordered pair once
    assert all(r["chosen_my_rewards:redness"] > r["rejected_my_rewards:redness"] for r in rows)


@pytest.mark.parametrize("kind", ["tiny_sd15", "tiny_sdxl"])
def test_make_pairs_from_the_same_start(tmp_path, kind, request, capsys):
    """--same-start: a prompt's images share image 0's x_T and keep their own step noise, so (SD1.5's DDIM) image 0
    is the image it is without it, and with almost no step noise (η tiny) every image of a prompt is almost the same.
    The tiny SDXL, like SDXL, ships Euler, which has no η: it draws with DDIM, so its images still differ."""
    base = request.getfixturevalue(kind)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")

    def images(name: str, eta: str, *extra: str) -> list[np.ndarray]:
        out = tmp_path / name
        assert main(["make-pairs", "--base", str(base), "--prompts", str(prompts), "--per-prompt", "3", "--reward",
                     "brightness", "--steps", "3", "--height", "32", "--width", "32", "--eta", eta, *extra,
                     "--out", str(out)]) == 0
        return [np.asarray(Image.open(p), dtype=np.float64) for p in sorted((out / "images").iterdir())]

    own, same = images("own", "1"), images("same", "1", "--same-start")
    if kind == "tiny_sd15":  # the model's own DDIM: only the start changed
        assert np.array_equal(own[0], same[0]) and np.array_equal(own[3], same[3])  # image 0 of each prompt
        assert all(np.abs(own[i] - same[i]).max() > 10 for i in (1, 2, 4, 5))  # a new start: another image
    assert all(np.abs(same[first] - same[first + k]).max() > 10 for first in (0, 3) for k in (1, 2))
    quiet_own, quiet_same = images("quiet-own", "1e-4"), images("quiet-same", "1e-4", "--same-start")
    for first in (0, 3):
        assert all(np.abs(quiet_same[first] - quiet_same[first + k]).max() <= 2 for k in (1, 2))
        assert np.abs(quiet_own[first] - quiet_own[first + 1]).max() > 10
    capsys.readouterr()
    assert main(["make-pairs", "--base", str(base), "--prompts", str(prompts), "--reward", "brightness", "--steps",
                 "2", "--same-start", "--out", str(tmp_path / "bad")]) == 2
    assert "--same-start with --eta None" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["tiny_sd15", "tiny_sdxl"])
def test_make_pairs_refines_the_best_image(tmp_path, kind, request, monkeypatch, capsys):
    """--refine: K img2img variants of each prompt's best image, exactly what the stock img2img pipeline draws from
    it with the variants' seeds, paired among themselves (never with an image of another layout); resumable."""
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    base = request.getfixturevalue(kind)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "pairs"
    args = ["make-pairs", "--base", str(base), "--prompts", str(prompts), "--per-prompt", "3", "--reward",
            "brightness", "--steps", "4", "--height", "32", "--width", "32", "--refine", "0.5", "--out", str(out)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # best vs worst of the images, and of the variants, per prompt
    img2img = AutoPipelineForImage2Image.from_pipe(DiffusionPipeline.from_pretrained(str(base)))
    img2img.set_progress_bar_config(disable=True)
    for rec, (coarse, fine) in zip(records, zip(rows[::2], rows[1::2])):
        best = rec["variant_of"]
        assert rec["scores"]["brightness"][best] == max(rec["scores"]["brightness"])
        assert rec["variant_seeds"] == [s + make_pairs_module.REFINE_SEED_OFFSET for s in rec["seeds"]]
        assert {coarse["chosen"], coarse["rejected"]} <= set(rec["images"])
        assert {fine["chosen"], fine["rejected"]} <= set(rec["variants"])
        assert fine["chosen_brightness"] == max(rec["variant_scores"]["brightness"])
        assert fine["chosen_brightness"] == pytest.approx(_brightness(out / fine["chosen"]), abs=1e-5)
        stock = img2img(rec["prompt"], image=Image.open(out / rec["images"][best]), strength=0.5, num_inference_steps=4,
                        guidance_scale=5.0, num_images_per_prompt=3,
                        generator=[torch.Generator().manual_seed(s) for s in rec["variant_seeds"]]).images
        for mine, theirs in zip(rec["variants"], stock):
            diff = np.abs(np.asarray(Image.open(out / mine), dtype=np.float64) - np.asarray(theirs, dtype=np.float64))
            assert diff.max() <= 1  # the same draw (PNG rounding aside)

    monkeypatch.setattr("diffalign.pipelines.load_aligned_pipeline", lambda *a, **k: pytest.fail("regenerated"))
    assert main(args) == 0  # everything done: nothing drawn again
    capsys.readouterr()
    assert main([*args[:-4], "--refine", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "--refine 1.0: the img2img strength of the variants must be in (0, 1)" in capsys.readouterr().err
