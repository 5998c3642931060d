"""The testbed: its checker against hand-made images, its rewards, and the committed model's prompt following."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from diffalign import testbed as tb
from diffalign.models import model_kind
from diffalign.rewards import load_reward, score


def _tensor(images) -> torch.Tensor:
    return torch.tensor(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255


def test_prompts_split_trains_every_word_and_holds_out_combinations():
    train, held = tb.split_prompts()
    assert len(train) + len(held) == len(tb.all_prompts()) == 144 and not set(train) & set(held)
    for words in (tb.SHAPES, tb.SHAPE_COLOURS, tb.BACKGROUND_COLOURS):
        for word in words:
            assert any(f" {word} " in f" {p} " for p in train), word
    assert tb.parse_prompt("a red circle on a gray background") == ("circle", "red", "gray")
    with pytest.raises(ValueError, match="not a testbed prompt"):
        tb.parse_prompt("a photo")
    with pytest.raises(ValueError, match="orange"):
        tb.parse_prompt("a orange circle on a gray background")


def test_checker_reads_hand_made_scenes():
    scenes = [tb.Scene("circle", "red", "gray", 9, 14, 16, 1.0), tb.Scene("square", "cyan", "black", 6, 20, 12, 0.6),
              tb.Scene("triangle", "yellow", "purple", 10, 16, 18, 0.8), tb.Scene("circle", "blue", "white", 5, 8, 8, 0.6),
              tb.Scene("triangle", "green", "red", 6, 24, 24, 1.0), tb.Scene("square", "purple", "gray", 11, 16, 16, 0.6)]
    seen = tb.analyse(_tensor([tb.render(s) for s in scenes]))
    assert [(a.shape, a.colour, a.background) for a in seen] == [(s.shape, s.colour, s.background) for s in scenes]
    circle = seen[0]
    assert circle.area == pytest.approx(np.pi * 9**2 / 32**2, rel=0.08)  # the disc's area within pixel rounding
    assert seen[1].chroma < seen[4].chroma  # desaturated cyan vs full green


def test_checker_on_many_random_scenes_and_on_an_empty_image():
    rng = random.Random(1)
    scenes = [tb.random_scene(rng.choice(tb.all_prompts()), rng) for _ in range(300)]
    acc = tb.prompt_following(_tensor([tb.render(s) for s in scenes]), [s.prompt for s in scenes])
    assert acc == {"shape_colour": 1.0, "background": 1.0, "colour": 1.0, "shape": 1.0, "all": 1.0}
    blank = torch.full((1, 3, 32, 32), 0.5)
    assert tb.analyse(blank)[0].shape is None
    assert tb.prompt_following(blank, ["a red circle on a gray background"])["shape_colour"] == 0.0
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        tb.prompt_following(blank, ["a", "b"])


def test_prompt_colours_scores_both_colours_per_image():
    image = _tensor([tb.render(tb.Scene("circle", "red", "gray", 9, 16, 16, 1.0))])[0]
    prompts = ["a red circle on a gray background", "a red square on a gray background",  # the shape is not asked
               "a blue circle on a gray background", "a red circle on a black background"]
    images = image.expand(len(prompts), -1, -1, -1)
    values = score(load_reward("prompt_colours"), images, prompts)
    assert values.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert values.mean().item() == tb.prompt_following(images, prompts)["colour"]  # the benchmark's guard


def test_rewards_rank_size_and_saturation():
    small, large = tb.Scene("circle", "red", "gray", 5), tb.Scene("circle", "red", "gray", 10)
    dull, vivid = tb.Scene("square", "blue", "black", 8, saturation=0.6), tb.Scene("square", "blue", "black", 8)
    images = _tensor([tb.render(s) for s in (small, large, dull, vivid)])
    size, vividness = load_reward("shape_size"), load_reward("vividness")
    s = score(size, images, [""] * 4)
    v = score(vividness, images, [""] * 4)
    assert s[1] > 3 * s[0] and s[1].item() == pytest.approx(np.pi * 100 / 1024, rel=0.08)
    assert v[3] > v[2] + 0.2
    blank = torch.zeros(1, 3, 32, 32)
    assert score(size, blank, [""]).item() == 0 and score(vividness, blank, [""]).item() == 0


def test_middle_size_prefers_the_middling_shape_from_either_side():
    # squares of half size 3, 7 and 12 cover 36, 196 and 576 of 1024 pixels: small, about 0.2, large
    small, middling, large = (tb.Scene("square", "red", "gray", h) for h in (3, 7, 12))
    s = score(load_reward("middle_size"), _tensor([tb.render(x) for x in (small, middling, large)]), [""] * 3)
    expected = [1 - abs(area / 1024 - 0.2) / 0.8 for area in (36, 196, 576)]
    assert s.tolist() == pytest.approx(expected, abs=0.01)
    assert s[1] > s[0] and s[1] > s[2]  # not monotone: both smaller and larger lose
    assert score(load_reward("middle_size"), torch.zeros(1, 3, 32, 32), [""]).item() == 0


def test_position_rewards_read_where_the_shape_is():
    scenes = [tb.Scene("square", "red", "gray", 4, cx=8, cy=16), tb.Scene("square", "red", "gray", 4, cx=24, cy=16),
              tb.Scene("circle", "blue", "white", 5, cx=16, cy=16), tb.Scene("circle", "blue", "white", 5, cx=8, cy=8)]
    images = _tensor([tb.render(s) for s in scenes])
    left = score(load_reward("left_position"), images, [""] * 4)
    centre = score(load_reward("centredness"), images, [""] * 4)
    assert left[0].item() == pytest.approx(1 - 8 / 32, abs=0.02) and left[1].item() == pytest.approx(1 - 24 / 32, abs=0.02)
    assert centre[2].item() == pytest.approx(1.0, abs=0.02)
    assert centre[3].item() == pytest.approx(0.5, abs=0.03)  # (8, 8): half way from the centre to the corner
    assert centre[0].item() == pytest.approx(centre[1].item(), abs=0.02)  # symmetric: left and right alike
    blank = torch.zeros(1, 3, 32, 32)
    assert score(load_reward("left_position"), blank, [""]).item() == 0
    assert score(load_reward("centredness"), blank, [""]).item() == 0


def test_edge_sharpness_is_one_over_the_edge_width():
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0  # a hard vertical step
    ramp = step.clone()
    ramp[..., 4] = 0.5  # the same edge over two pixels
    dim = step * 0.3  # a hard step of lower contrast
    noisy = step + 0.05 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    s = score(load_reward("edge_sharpness"), torch.cat([step, ramp, dim, noisy.clamp(0, 1)]), [""] * 4)
    assert s[0].item() == pytest.approx(1.0) and s[1].item() == pytest.approx(0.5, abs=1e-5)
    assert s[2].item() == pytest.approx(1.0, abs=1e-5) and s[3] < 0.8  # contrast does not matter; noise lowers it
    sharp, soft = tb.render(tb.Scene("square", "red", "gray", 8)), tb.render(tb.Scene("square", "red", "gray", 8))
    from PIL import ImageFilter

    rendered = score(load_reward("edge_sharpness"), _tensor([sharp, soft.filter(ImageFilter.GaussianBlur(1.0))]), ["", ""])
    assert rendered[0] > rendered[1] + 0.2


@pytest.mark.parametrize("name", ["left_position", "centredness", "edge_sharpness", "middle_size"])
def test_new_rewards_are_differentiable(name):
    images = _tensor([tb.render(tb.Scene("circle", "green", "black", 6, cx=12, cy=20))]).requires_grad_(True)
    head = load_reward(name)
    assert head.differentiable
    head(images, [""]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_benchmark_reward_sets_are_disjoint_registered_rewards():
    tuning, report = tb.REWARD_SETS["tuning"], tb.REWARD_SETS["report"]
    assert not set(tuning) & set(report)  # a report reward must never be one a recipe was chosen on
    for name in (*tuning, *report):
        assert load_reward(name).name == name
    assert tb.rewards_of("report,shape_size") == [*report, "shape_size"]


def test_each_testbed_trains_its_own_recipe_where_it_has_one():
    from diffalign.demo import testbed_recipe

    assert testbed_recipe("dpo").name == "testbed-dpo.yaml"
    assert testbed_recipe("dpo", "sdxl").name == "testbed-sdxl-dpo.yaml"  # the SD1.5 step size overshoots there
    assert testbed_recipe("reward_backprop", "sdxl").name == "testbed-reward-backprop.yaml"  # none of its own
    assert testbed_recipe("dpo", "sdxl").is_file() and testbed_recipe("reward_backprop", "sdxl").is_file()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_testbed_model_follows_prompts(kind):
    """Each committed testbed (SD1.5 and SDXL architecture) loads into its stock pipeline and draws what held-out
    prompts ask for (the card reports the full numbers; here a small fixed set with a margin: 16 held-out prompts
    x 2 seeds)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe_class = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = pipe_class.from_pretrained(str(tb.testbed_path(kind)))
    assert model_kind(str(tb.testbed_path(kind))) == kind
    pipe.set_progress_bar_config(disable=True)
    _, held = tb.split_prompts()
    images = torch.cat([pipe(held, generator=torch.Generator().manual_seed(s), output_type="pt", **tb.SAMPLING.pipeline_kwargs()).images
                        for s in range(2)])
    assert images.shape == (32, 3, 32, 32)
    acc = tb.prompt_following(images, held * 2)
    assert acc["shape_colour"] >= 0.6 and acc["background"] >= 0.6, acc


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_demo_quick(kind, tmp_path, capsys):
    import json

    from diffalign.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--testbed", kind]) == 0
    printed = capsys.readouterr().out
    assert "reward win rate" in printed and "before_after.png" in printed and f"the {kind.upper()} testbed" in printed
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["win_rate"]["n"] == 4 * 2 and 0 <= report["win_rate"]["rate"] <= 1
    assert set(report["prompt_following"]) == {"base", "aligned"}
    assert report["pair_accuracy"]["pairs"] == 4 and report["testbed"] == kind
    adapter_config = (out / "adapter" / "config.yaml").read_text()
    assert str(tb.testbed_path(kind)) in adapter_config
    from diffalign.config import load_config
    from diffalign.demo import testbed_recipe

    trained = load_config(out / "adapter" / "config.yaml")  # the testbed's own recipe (the SDXL twin has one)
    recipe = load_config(testbed_recipe("dpo", kind))
    assert (trained.optim.lr, trained.objective.beta) == (recipe.optim.lr, recipe.objective.beta)
    from PIL import Image

    grid = Image.open(out / "before_after.png")  # 4 held-out prompts, base over aligned, 32 px enlarged 4x, labelled
    assert grid.width > 4 * 128 and grid.height == 2 * 128 + 3 * 4
    cell = grid.crop((grid.width - 4 - 128, 4, grid.width - 4, 4 + 128))  # the last base image, enlarged, pixels kept
    assert cell.resize((32, 32), Image.NEAREST).resize((128, 128), Image.NEAREST).tobytes() == cell.tobytes()
    label = grid.crop((0, 0, grid.width - 4 * 132, grid.height)).convert("L")
    assert min(label.getdata()) < 100  # the row labels are written
    assert f"all {report['seconds']:.0f} s" in printed and report["seconds"] >= report["pair_seconds"]
    rows = [json.loads(line) for line in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert all(r["chosen_shape_size"] >= r["rejected_shape_size"] for r in rows)
    # per prompt, best vs worst of its images, then of the variants of its best image (none where the two tie)
    variant = [("_r" in r["chosen"], "_r" in r["rejected"]) for r in rows]
    assert variant.count((False, False)) == 12 and 1 <= variant.count((True, True)) <= 12
    assert len(rows) == 12 + variant.count((True, True))


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shape_shift_script_measures_known_moves(tmp_path):
    """scripts/shape_shift.py on an eval folder of hand-made scenes: two shapes moved 4 px towards the centre (from
    8 and 6 px away), one 4 px away from it (from 4 px)."""
    from PIL import Image

    shape_shift = load_script("shape_shift")
    moves = [((8, 16), (12, 16)), ((16, 22), (16, 18)), ((20, 16), (24, 16))]
    for folder, index in (("base", 0), ("adapter", 1)):
        (tmp_path / "images" / folder).mkdir(parents=True)
        for k, move in enumerate(moves):
            cx, cy = move[index]
            tb.render(tb.Scene("square", "red", "gray", 3, cx=cx, cy=cy)).save(tmp_path / "images" / folder / f"p{k}.png")
    line = shape_shift.summary(tmp_path)
    assert "moved 4.00 px" in line and "mean shift +2.67, -1.33;" in line, line
    # x offsets -8, 0, +4 px with shifts +4, 0, +4: slope -4/56 (by hand); y offsets 0, +6, 0 with 0, -4, 0: -2/3
    assert "contraction x -0.07, y -0.67)" in line, line
    assert "cosine with the way to the centre +0.33" in line and "6.00 -> 4.67 px" in line, line
    assert "nearer the centre 0.667 (base far from it: 1.000, near it: 0.500" in line, line
    # each base offset moved by the mean shift (+8/3, -4/3) px: (-16/3, -4/3) and (8/3, 14/3) come nearer, (20/3, -4/3)
    # does not
    assert "by the mean shift alone: 0.667;" in line, line
    tb.render(tb.Scene("square", "red", "gray", 3, cx=8, cy=8)).save(tmp_path / "images" / "base" / "p3.png")
    Image.new("RGB", (32, 32), "gray").save(tmp_path / "images" / "adapter" / "p3.png")  # no shape drawn: no centre
    line = shape_shift.summary(tmp_path)
    assert "moved 4.00 px" in line and "3 images of 32 px with a shape in both, 1 left out" in line, line
    (tmp_path / "images" / "adapter" / "p2.png").unlink()
    with pytest.raises(SystemExit, match="1 without an adapter image"):
        shape_shift.summary(tmp_path)


def test_position_probe_scores_a_linear_code_and_noise():
    """scripts/position_probe.py's held-out R²: features that hold the targets linearly (plus a little noise) score
    about 1 per target column, features unrelated to them about 0 or below."""
    import numpy as np

    probe = load_script("position_probe")
    rng = np.random.default_rng(0)
    targets = rng.uniform(0, 7, size=(400, 2))
    mixing = rng.standard_normal((2, 16))
    features = targets @ mixing + 0.01 * rng.standard_normal((400, 16))
    assert np.all(probe.ridge_r2(features, targets, 200) > 0.99)
    assert np.all(probe.ridge_r2(rng.standard_normal((400, 16)), targets, 200) < 0.1)
