"""`diffalign eval`: win-rate arithmetic by hand, the report end to end on tiny models, resume, the model card, and
the HTML page rendered in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest

from diffalign.cli import main
from diffalign.evaluation.evaluate import reuse_images, shared_base_images
from diffalign.evaluation.metrics import (
    outcomes,
    paired_difference,
    prompt_interval,
    stratified_standard_error,
    wilson_interval,
    win_rate,
)
from diffalign.evaluation.report import comparisons
from diffalign.sampling.settings import Sampling


def test_wilson_interval_matches_published_values():
    assert wilson_interval(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(0.8, 100) == pytest.approx((0.7112, 0.8666), abs=1e-4)
    for n in range(1, 300):  # an all-win or all-loss run: the interval still holds the rate (the plot's error bars)
        for p in (0.0, 1.0):
            low, high = wilson_interval(p, n)
            assert low <= p <= high


def test_win_rate_counts_ties_as_half_and_respects_direction():
    w = win_rate([3, 2, 1, 5], [1, 2, 4, 4])
    assert (w.wins, w.ties, w.n) == (2, 1, 4) and w.rate == 0.625
    assert (w.low, w.high) == pytest.approx(wilson_interval(0.625, 4))
    lower = win_rate([3, 2, 1, 5], [1, 2, 4, 4], higher_is_better=False)
    assert (lower.wins, lower.rate) == (1, 0.375)
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1.0], [1.0, 2.0])
    assert lower.prompt_low is None and lower.prompts is None  # no prompt groups given, no interval over prompts


def test_interval_over_prompts_by_hand():
    # 3 prompts x 3 seeds winning 3, 2 and 1 times: p = 6/9; Σ (s_i - p·n_i)² = 1 + 0 + 1 = 2;
    # SE² = 3/2 · 2 / 9² = 1/27; p ± 1.959964 · 0.19245 = [0.2895, 1.0439] -> [0.2895, 1]
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    w = win_rate([1, 1, 1, 1, 1, 0, 1, 0, 0], [0.5] * 9, groups=groups)
    assert w.rate == pytest.approx(2 / 3) and w.prompts == 3
    assert (w.prompt_low, w.prompt_high) == pytest.approx((2 / 3 - 1.959964 * (1 / 27) ** 0.5, 1.0), abs=1e-6)
    assert w.prompt_low < w.low  # prompts that disagree widen the interval beyond Wilson's
    # a tie is half a win in the prompt's sum too: 2.5 wins of 3 on prompt 0
    tied = win_rate([1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1], groups=[0, 0, 0, 1, 1, 1])
    assert tied.ties == 1 and tied.rate == pytest.approx(1.5 / 6)
    se = (2 / 1 * ((1.5 - 0.25 * 3) ** 2 + (0 - 0.25 * 3) ** 2)) ** 0.5 / 6
    assert tied.prompt_high == pytest.approx(0.25 + 1.959964 * se)
    with pytest.raises(ValueError, match="2 prompt groups"):
        win_rate([1, 0, 1], [0, 0, 0], groups=[0, 1])


def test_interval_over_prompts_is_never_narrower_than_wilson():
    # every prompt wins the same share: the sandwich estimate is 0, so Wilson's interval stands
    same = prompt_interval([1, 0, 1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 2, 2, 3, 3])
    assert same == pytest.approx(wilson_interval(0.5, 8))
    assert prompt_interval([1, 1, 0], [0, 0, 0]) == pytest.approx(wilson_interval(2 / 3, 3))  # one prompt


def test_paired_difference_by_hand():
    # two adapters' outcomes against one base on 2 prompts x 3 seeds: differences [0, 1, 1 | 0, 0, 0.5], mean 5/12;
    # per-prompt sums 2 and 0.5 against 5/12 · 3 = 1.25: Σ (s_i - mean·n_i)² = 2 · 0.75² = 1.125;
    # SE² = 2/1 · 1.125 / 6² = 1/16
    a, b, groups = [1, 1, 1, 1, 0, 0.5], [1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1]
    assert paired_difference(a, b, groups) == pytest.approx((5 / 12, 5 / 12 - 1.959964 / 4, 5 / 12 + 1.959964 / 4))
    assert paired_difference(b, b, groups) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="got 6, 6 and 5"):
        paired_difference(a, b, groups[:5])


def test_paired_difference_on_these_prompts_by_hand():
    # the same differences [0, 1, 1 | 0, 0, 0.5], now for these 2 prompts (other seeds): within-prompt sample
    # variances 1/3 and 1/12; Var(mean) = Σ n_i · s_i² / N² = 3 · (1/3 + 1/12) / 36 = 5/144
    a, b, groups = [1, 1, 1, 1, 0, 0.5], [1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1]
    half = 1.959964 * (5 / 144) ** 0.5
    assert paired_difference(a, b, groups, over="seeds") == pytest.approx((5 / 12, 5 / 12 - half, 5 / 12 + half))
    # a prompt with one comparison has no spread of its own to measure: it adds nothing
    assert stratified_standard_error([1.0, 0.0, 1.0], [0, 0, 1]) == pytest.approx((2 * 0.5 / 9) ** 0.5)
    with pytest.raises(ValueError, match="over='everything'"):
        paired_difference(a, b, groups, over="everything")


def test_pairing_takes_out_which_prompts_are_easy():
    # both adapters win every seed of the even prompts and lose the odd ones; a also wins one more seed of each odd
    # prompt. Each win rate alone is uncertain across prompts; their difference (+1/4 on every odd prompt, 0 on the
    # even ones: 1/8) is known far better
    groups = [g for g in range(8) for _ in range(4)]
    b = [1.0 if g % 2 == 0 else 0.0 for g in groups]
    a = [1.0 if g % 2 == 0 or i % 4 == 0 else 0.0 for i, g in enumerate(groups)]
    diff, low, high = paired_difference(a, b, groups)
    alone_low, alone_high = prompt_interval(a, groups)
    assert diff == pytest.approx(1 / 8) and low > 0
    assert high - low < (alone_high - alone_low) / 2
    assert outcomes([3, 2, 1], [1, 2, 4]) == [1.0, 0.5, 0.0] and outcomes([3], [1], higher_is_better=False) == [0.0]


def test_base_images_are_drawn_once_and_earlier_seeds_reused(tmp_path):
    cache, first, second = tmp_path / "cache", tmp_path / "first", tmp_path / "second"
    with shared_base_images(cache, first):  # no cache yet: the evaluation draws them
        assert not (first / "images" / "base").exists()
        (first / "images" / "base").mkdir(parents=True)
        (first / "images" / "base" / "p0000_s0.png").write_bytes(b"drawn")
    assert (cache / "p0000_s0.png").read_bytes() == b"drawn"
    with shared_base_images(cache, second):  # the next one finds them before it draws
        assert (second / "images" / "base" / "p0000_s0.png").read_bytes() == b"drawn"
    more = tmp_path / "more_seeds"
    reuse_images(first, more)
    assert (more / "images" / "base" / "p0000_s0.png").read_bytes() == b"drawn"
    (first / "images" / "base" / "p0000_s1.png").write_bytes(b"later")
    reuse_images(first, more)  # an evaluation already started there is left as it is
    assert not (more / "images" / "base" / "p0000_s1.png").exists()
    wider = tmp_path / "more_prompts"  # the earlier evaluation's prompt 0 is prompt 2 here; its prompt 1 is not here
    (first / "images" / "run").mkdir()
    (first / "images" / "run" / "p0001_s0.png").write_bytes(b"not here")
    reuse_images(first, wider, {0: 2})
    assert (wider / "images" / "base" / "p0002_s1.png").read_bytes() == b"later"
    assert sorted(p.name for p in wider.rglob("*.png")) == ["p0002_s0.png", "p0002_s1.png"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_sd15, pickapic):
    from diffalign.config import load_config
    from diffalign.training.trainer import train

    root = tmp_path_factory.mktemp("eval-adapter")
    cfg = load_config(None, [f"model.pretrained={tiny_sd15}", f"data.dataset={pickapic}", "data.resolution=32",
                             "train.batch_size=2", "train.max_steps=2", f"train.output_dir={root / 'aligned'}",
                             f"cache.dir={root / 'cache'}", "log.to=none", "optim.lr=1e-2", "lora.rank=4",
                             "train.checkpoint_every=0"])
    return train(cfg).output_dir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_sd15, adapter, pickapic):
    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text("a red square\na blue circle\n")
    args = ["eval", "--base", str(tiny_sd15), "--adapter", str(adapter), "--prompts", str(root / "prompts.txt"),
            "--reward", "brightness,jpeg_compressibility", "--seeds", "2", "--steps", "2", "--height", "32",
            "--width", "32", "--pairs", str(pickapic), "--out", str(root / "out")]
    assert main(args) == 0
    return root / "out", args


def test_report_json(evaluated, adapter):
    out, _ = evaluated
    report = json.loads((out / "report.json").read_text())
    assert list(report["mean_scores"]) == ["base", "aligned"]
    assert len(report["scores"]["aligned"]["brightness"]) == 4 == len(report["images"]["base"])
    w = report["win_rates"]["aligned"]["brightness"]
    assert 0 <= w["low"] <= w["rate"] <= w["high"] <= 1 and w["n"] == 4
    assert w["prompt_low"] <= w["low"] and w["high"] <= w["prompt_high"] and w["prompts"] == len(report["prompts"])
    acc = report["pair_accuracy"]["aligned"]
    assert acc["pairs"] == 10 and 0 <= acc["ranking_accuracy"] <= 1 and 0 <= acc["implicit_accuracy"] <= 1
    card = (adapter / "README.md").read_text()
    assert "## Evaluation" in card and "| brightness |" in card and "eval_samples.png" in card
    assert "Held-out pairs (10)" in card and (adapter / "eval_samples.png").is_file()
    assert card.startswith("---\nbase_model:")


def test_eval_resumes_without_regenerating(evaluated, monkeypatch):
    out, args = evaluated
    monkeypatch.setattr("diffalign.pipelines.load_aligned_pipeline", lambda *a, **k: pytest.fail("regenerated"))
    before = json.loads((out / "report.json").read_text())["scores"]
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["scores"] == before


def test_eval_prints_the_numbers_then_the_paths(evaluated, capsys):
    out, args = evaluated
    capsys.readouterr()
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads((out / "report.json").read_text())
    assert lines[-2:] == [str(out / "report.json"), str(out / "report.html")]
    text = "\n".join(lines)
    assert "win rate" in text and "95% CI" in text and "base mean" in text and "aligned mean" in text
    for head in ("brightness", "jpeg_compressibility"):
        w = report["win_rates"]["aligned"][head]
        row = next(line for line in lines if line.split()[:2] == ["aligned", head])
        assert f"{w['rate']:.3f}" in row and f"[{w['low']:.3f}, {w['high']:.3f}]" in row, row
        assert f"[{w['prompt_low']:.3f}, {w['prompt_high']:.3f}]" in row, row
        assert f"{report['mean_scores']['base'][head]:.4g}" in row and f"{report['mean_scores']['aligned'][head]:.4g}" in row
    acc = report["pair_accuracy"]["aligned"]
    row = next(line for line in lines if line.split()[:1] == ["aligned"] and len(line.split()) == 4)
    assert row.split()[1:] == [f"{acc['implicit_accuracy']:.3f}", f"{acc['ranking_accuracy']:.3f}", "10"], row
    assert any("held-out pairs" in line for line in lines)


def test_two_adapters_are_compared_on_the_same_comparisons(tiny_sd15, adapter, tmp_path, capsys):
    """The second adapter at scale 0 draws the base's images (every comparison a tie), so the first's lead over it
    is exactly its win rate minus 1/2, and the interval is the paired one over the report's own outcomes."""
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green triangle\n")
    a, b = shutil.copytree(adapter, tmp_path / "a"), shutil.copytree(adapter, tmp_path / "b")
    out = tmp_path / "out"
    assert main(["eval", "--base", str(tiny_sd15), "--adapter", str(a), "--adapter", str(b), "--scale", "1",
                 "--scale", "0", "--prompts", str(tmp_path / "prompts.txt"), "--reward", "brightness", "--seeds", "3",
                 "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    [d] = report["differences"]
    assert (d["a"], d["b"], d["head"]) == ("a", "b", "brightness")
    assert report["win_rates"]["b"]["brightness"]["rate"] == 0.5  # scale 0: the base's images
    assert d["difference"] == pytest.approx(report["win_rates"]["a"]["brightness"]["rate"] - 0.5)
    points = outcomes(report["scores"]["a"]["brightness"], report["scores"]["base"]["brightness"])
    assert comparisons(report, "brightness", model="a") == (points, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\]: name the model"):
        comparisons(report, "brightness")  # two adapters: which one is not guessed
    assert (d["difference"], d["low"], d["high"]) == pytest.approx(
        paired_difference(points, [0.5] * 9, [0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert (d["difference"], d["seed_low"], d["seed_high"]) == pytest.approx(
        paired_difference(points, [0.5] * 9, [0, 0, 0, 1, 1, 1, 2, 2, 2], over="seeds"))
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.split()[:3] == ["a", "b", "brightness"])
    assert f"{d['difference']:+.3f}" in row and f"[{d['low']:+.3f}, {d['high']:+.3f}]" in row
    assert f"[{d['seed_low']:+.3f}, {d['seed_high']:+.3f}]" in row
    assert "Adapter vs adapter" in (out / "report.html").read_text()


def test_a_seed_drawn_alone_equals_the_same_seed_drawn_with_others(evaluated, tiny_sd15, tmp_path):
    """eval draws all seeds of a prompt in one call; a regenerated single image must be the same picture."""
    import numpy as np
    from PIL import Image

    from diffalign.evaluation.evaluate import generate

    out, _ = evaluated
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "p0000_s0.png").write_bytes((out / "images" / "base" / "p0000_s0.png").read_bytes())  # only seed 1 missing
    generate(str(tiny_sd15), None, 1.0, ["a red square"], 2, folder,
             Sampling(steps=2, height=32, width=32, seed_policy="shared"), "cpu")
    alone = np.asarray(Image.open(folder / "p0000_s1.png"), dtype=np.int16)
    together = np.asarray(Image.open(out / "images" / "base" / "p0000_s1.png"), dtype=np.int16)
    assert np.abs(alone - together).max() <= 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_a_browser(evaluated):
    out, _ = evaluated
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=10000", "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    ok = re.search(r'data-images-ok="(\d+)"', dom)
    assert total and ok, dom[:2000]
    # 8 samples, the base-vs-aligned grid, 2 score plots, win rates
    assert int(total.group(1)) == 8 + 1 + 2 + 1 and ok.group(1) == total.group(1)
    assert "Base vs aligned" in dom
    assert "<table" in dom and "Win rate vs base" in dom and "aligned" in dom
