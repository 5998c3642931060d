"""diffalign sweep: the grid, the picks, a rigged grid on the testbed whose best setting is obvious, resume, and the
command's errors."""

import json

import pytest

from diffalign import testbed as tb
from diffalign.cli import main
from diffalign.config import ConfigError
from diffalign.sweep import Trial, choose, grid, run_sweep, spearman, sweep_table


def test_grid_and_rank_correlation():
    assert grid({"optim.lr": [1, 2], "objective.beta": [3]}) == [{"optim.lr": 1, "objective.beta": 3},
                                                                 {"optim.lr": 2, "objective.beta": 3}]
    with pytest.raises(ConfigError, match="sweep axis optim.lr: no values"):
        grid({"optim.lr": []})
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # ties share their mean rank


def test_each_pick_maximises_its_signal():
    def trial(i, loss, acc, margin, winner, drift, win=None):
        return Trial(i, {"optim.lr": i}, {"heldout_loss": loss, "heldout_implicit_acc": acc, "heldout_margin": margin,
                                          "heldout_winner_gain": winner, "heldout_drift": drift}, win)

    trials = [trial(0, 0.69, 1.00, 0.001, 0.0005, 1e-8, 0.5), trial(1, 0.40, 0.80, 2.0, 0.5, 1.0, 0.9),
              trial(2, 0.90, 0.80, 5.0, -1.0, 100.0, 0.7)]
    assert choose(trials, False, "loss").index == 1
    assert choose(trials, False, "implicit_acc").index == 0  # accuracy counts signs: the tiny move wins it
    assert choose(trials, False, "margin").index == 2
    assert choose(trials, False, "winner_gain").index == 1 == choose(trials, False).index  # the default
    # margin / sqrt(drift): 0.001 / 1e-4 = 10 beats 2 / 1 and 5 / 10: the direction, not the size
    assert choose(trials, False, "margin_per_drift").index == 0
    assert choose(trials, False, "guarded_margin").index == 1  # trial 2's winners got worse
    assert choose([trials[2]], False, "guarded_margin").index == 2  # none guarded: the best winner gain
    assert choose(trials, True).index == 1  # with a reward: the win rate
    assert choose(trials[1:], False, "implicit_acc").index == 2  # tied accuracy: the larger margin
    with pytest.raises(ConfigError, match="--pick 'wins': choose one of loss, margin, implicit_acc, winner_gain"):
        choose(trials, False, "wins")
    table = sweep_table(trials, trials[1])
    assert "| 0.001 |" not in table and "**chosen**" in table and "held-out guarded_margin: Spearman" in table
    assert "| -1.000 |" in table  # the winner gain column


@pytest.fixture(scope="module")
def testbed_pairs(tmp_path_factory):
    """Shape_size pairs on the testbed (16 training and 8 held-out prompts, best vs worst of 4) and the training
    pairs with winner and loser swapped."""
    from diffalign.rewards import load_reward
    from diffalign.sampling.make_pairs import make_pairs
    from diffalign.sampling.settings import Sampling

    out = tmp_path_factory.mktemp("sweep")
    train, held = tb.split_prompts()
    (out / "train.txt").write_text("\n".join(train[:16]) + "\n")
    (out / "held.txt").write_text("\n".join(held[:8]) + "\n")
    heads = {"shape_size": load_reward("shape_size")}
    good = make_pairs(str(tb.testbed_path()), out / "train.txt", heads, out / "train", per_prompt=4,
                      sampling=Sampling(steps=8, guidance=5.0))
    held_out = make_pairs(str(tb.testbed_path()), out / "held.txt", heads, out / "held", per_prompt=4,
                          sampling=Sampling(steps=8, guidance=5.0, seed=999))
    rows = [json.loads(line) for line in good.read_text().splitlines()]
    flipped = good.with_name("flipped.jsonl")
    flipped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    return good, flipped, held_out, out


def _common(out):
    return [f"model.pretrained={tb.testbed_path()}", "data.resolution=32", "train.batch_size=8", "train.max_steps=20",
            "lora.rank=4", "log.to=none", "train.checkpoint_every=0", f"cache.dir={out / 'cache'}", "optim.lr=1e-3",
            "optim.warmup_steps=0", "data.caption_dropout=0",
            # the sweep's mechanics, not the recipe's current tuning: v errors at the DPO paper's β
            "train.error_space=prediction", "objective.beta=5000"]


def test_a_rigged_grid_picks_the_right_labels_and_resumes(testbed_pairs, monkeypatch):
    good, flipped, held_out, out = testbed_pairs
    # the rig: one trial learns the held-out pairs' preference (bigger shapes), the other its opposite
    axes = {"data.dataset": [str(flipped), str(good)]}
    trials, best = run_sweep("testbed-dpo", axes, str(held_out), out / "s", _common(out))
    by_name = {t.values["data.dataset"]: t for t in trials}
    assert best.values["data.dataset"] == str(good), sweep_table(trials, best)
    assert by_name[str(good)].heldout["heldout_implicit_acc"] > 0.5 > by_name[str(flipped)].heldout["heldout_implicit_acc"]
    assert (out / "s" / "best.yaml").is_file() and (out / "s" / "trial-01" / "trial.json").is_file()
    saved = json.loads((out / "s" / "sweep.json").read_text())
    assert saved["best"] == "trial-01" and len(saved["trials"]) == 2

    import diffalign.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "train", lambda cfg: pytest.fail("a finished trial was trained again"))
    again, best_again = run_sweep("testbed-dpo", axes, str(held_out), out / "s", _common(out))
    assert best_again.name == best.name and [t.heldout for t in again] == [t.heldout for t in trials]
    with pytest.raises(ConfigError, match=r"trial.json: made for .* not .*; use a new --out for another grid"):
        run_sweep("testbed-dpo", {"data.dataset": [str(good), str(flipped)]}, str(held_out), out / "s", _common(out))


def test_with_a_reward_the_rigged_grid_is_picked_by_its_win_rate_on_validation_prompts(testbed_pairs, caplog):
    good, flipped, held_out, out = testbed_pairs
    from diffalign.sampling.settings import Sampling

    axes = {"data.dataset": [str(flipped), str(good)]}
    with caplog.at_level("WARNING", logger="diffalign.sweep"):
        trials, best = run_sweep("testbed-dpo", axes, str(held_out), out / "r", _common(out), reward="shape_size",
                                 prompts=str(out / "train.txt"), seeds=2,
                                 sampling=Sampling(steps=8, guidance=5.0, seed=123, seed_policy="shared"))
    assert "16 validation prompts" in caplog.text and "give 32 or more" in caplog.text  # too few to pick by
    by_name = {t.values["data.dataset"]: t for t in trials}
    assert best.values["data.dataset"] == str(good), sweep_table(trials, best)
    assert by_name[str(good)].win_rate > by_name[str(flipped)].win_rate
    # each trial against the chosen one on the same validation comparisons: the chosen itself 0, the other its
    # win rate's difference, with the paired interval of the two evaluations' outcomes
    from diffalign.evaluation.metrics import outcomes, paired_difference, prompt_groups

    assert best.vs_chosen == [0.0, 0.0, 0.0]
    other = by_name[str(flipped)]
    scores = [json.loads((out / "r" / t.name / "eval" / "report.json").read_text())["scores"] for t in (other, best)]
    [a, b] = [outcomes(next(v for k, v in sc.items() if k != "base")["shape_size"], sc["base"]["shape_size"])
              for sc in scores]
    assert other.vs_chosen == pytest.approx(list(paired_difference(a, b, prompt_groups(16, 2))))
    assert other.vs_chosen[0] == pytest.approx(other.win_rate - best.win_rate)
    table = sweep_table(trials, best)
    assert "vs chosen [95%]" in table and "of the 1 other trials are not measurably worse" in table
    saved = json.loads((out / "r" / "sweep.json").read_text())["trials"]
    assert [t["vs_chosen"] for t in saved] == [t.vs_chosen for t in trials]
    # the base's images are drawn once and shared: both trials compare against the very same files
    base = sorted(p.name for p in (out / "r" / "base_images").iterdir())
    assert len(base) == 16 * 2
    for t in trials:
        assert sorted(p.name for p in (out / "r" / t.name / "eval" / "images" / "base").iterdir()) == base


def test_hold_out_prompts_keeps_the_validation_prompts_out_of_every_trial(testbed_pairs):
    good, flipped, held_out, out = testbed_pairs
    from diffalign.config import load_config
    from diffalign.sampling.settings import Sampling

    train = (out / "train.txt").read_text().splitlines()
    validation = out / "validation.txt"  # half the training prompts: the trials train on the other half's pairs
    validation.write_text("\n".join(train[::2]) + "\n")
    kwargs = dict(reward="shape_size", prompts=str(validation), seeds=1,
                  sampling=Sampling(steps=4, guidance=5.0, seed=7, seed_policy="shared"), hold_out_prompts=True)
    axes = {"data.dataset": [str(good), str(flipped)]}
    trials, best = run_sweep("testbed-dpo", axes, str(held_out), out / "h", _common(out), **kwargs)
    assert best.values["data.dataset"] == str(good) and all(t.held_out == str(validation) for t in trials)
    run = load_config(out / "h" / best.name / "run" / "config.yaml")
    assert run.data.exclude_prompts == str(validation)
    from diffalign.data.readers import load_pairs

    rows = [json.loads(line) for line in good.read_text().splitlines()]
    assert len(load_pairs(run.data)) == sum(r["prompt"] not in train[::2] for r in rows) < len(rows)
    assert load_config(out / "h" / "best.yaml").data.exclude_prompts == ""  # the chosen setting trains on every pair
    with pytest.raises(ConfigError, match=r"trial.json: trained without the pairs of .*validation.txt; use a new "
                                          r"--out to train on every pair"):
        run_sweep("testbed-dpo", axes, str(held_out), out / "h", _common(out), **{**kwargs, "hold_out_prompts": False})
    with pytest.raises(ConfigError, match="--hold-out-prompts leaves the validation prompts' pairs out of training; "
                                          "it needs --reward and --prompts"):
        run_sweep("testbed-dpo", axes, str(held_out), out / "x", _common(out), hold_out_prompts=True)
    with pytest.raises(ConfigError, match="drop the --set data.exclude_prompts"):
        run_sweep("testbed-dpo", axes, str(held_out), out / "x", [*_common(out), f"data.exclude_prompts={validation}"],
                  **kwargs)


def test_the_command_refuses_what_it_cannot_sweep(testbed_pairs, tmp_path, capsys):
    good, _, held_out, out = testbed_pairs
    base = ["sweep", "-c", "testbed-dpo", "--out", str(tmp_path / "o"), *sum((["--set", s] for s in _common(out)), [])]
    assert main([*base, "--eval-pairs", str(held_out)]) == 2
    assert "give at least one axis" in capsys.readouterr().err
    assert main([*base, "--eval-pairs", str(held_out), "--grid", "train.error_space=prediction,epsilon"]) == 2
    assert "a grid over train.error_space needs --reward" in capsys.readouterr().err
    assert main([*base, "--eval-pairs", str(tmp_path / "none.jsonl"), "--lr", "1e-3"]) == 2
    assert "--eval-pairs" in capsys.readouterr().err
    assert main([*base, "--set", f"data.dataset={good}", "--eval-pairs", str(good), "--lr", "1e-3"]) == 2
    assert "is the training data; hold out pairs" in capsys.readouterr().err
    assert main([*base, "--eval-pairs", str(held_out), "--lr", "1e-3", "--reward", "shape_size"]) == 2
    assert "--reward and --prompts go together" in capsys.readouterr().err
    assert main([*base, "--eval-pairs", str(held_out), "--lr", "1e-3", "--hold-out-prompts"]) == 2
    assert "--hold-out-prompts leaves the validation prompts' pairs out of training" in capsys.readouterr().err
