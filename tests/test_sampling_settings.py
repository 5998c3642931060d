"""The one Sampling block: its checks, seed policies, the flags mapped onto it, old keys, and every use."""

import dataclasses
import json

import pytest
import torch

from diffalign.cli import build_parser, main
from diffalign.config import ConfigError, load_config
from diffalign.sampling.settings import FLAGS, Sampling


def _last_error(err: str) -> str:
    return [line for line in err.splitlines() if line.startswith("error:")][-1]


def test_every_field_has_one_flag_and_every_sampling_command_takes_them():
    assert set(FLAGS) == {f.name for f in dataclasses.fields(Sampling)}
    for command, skipped in (("generate", set()), ("make-pairs", set()), ("eval", set()), ("sample", {"seed_policy"})):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        flags = {o for a in sub._actions for o in a.option_strings}
        assert {FLAGS[n][0] for n in FLAGS if n not in skipped} <= flags, command


@pytest.mark.parametrize("key, value, message", [
    ("steps", 0, r"sampling.steps=0: must be at least 1"),
    ("guidance", float("nan"), r"sampling.guidance=nan: must be a finite number >= 0"),
    ("guidance", -1.0, r"sampling.guidance=-1.0: must be a finite number >= 0"),
    ("eta", -0.5, r"sampling.eta=-0.5: must be a finite number >= 0"),
    ("height", 30, r"sampling.height=30: must be a positive multiple of 8"),
    ("seed_policy", "random", r"sampling.seed_policy='random' is not valid; choose one of per_image, shared"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Sampling(**{key: value})


def test_seed_policies():
    per_image, shared = Sampling(seed=10), Sampling(seed=10, seed_policy="shared")
    assert [per_image.seed_of(i, k, 3) for i in range(2) for k in range(3)] == [10, 11, 12, 13, 14, 15]
    assert [shared.seed_of(i, k, 3) for i in range(2) for k in range(3)] == [10, 11, 12, 10, 11, 12]
    a, b = (g.initial_seed() for g in per_image.generators(1, [0, 2], 3))
    assert (a, b) == (13, 15)


def test_pipeline_kwargs_pass_only_what_is_set():
    assert Sampling().pipeline_kwargs() == {"num_inference_steps": 30, "guidance_scale": 5.0}
    kw = Sampling(steps=4, guidance=2.0, eta=0.3, negative_prompt="blurry", height=48).pipeline_kwargs()
    assert kw == {"num_inference_steps": 4, "guidance_scale": 2.0, "negative_prompt": "blurry", "eta": 0.3,
                  "height": 48, "width": 48}
    assert Sampling().pipeline_kwargs(default_size=32)["height"] == 32


def test_trajectories_need_eta_above_zero():
    assert Sampling().trajectory_eta() == 1.0 and Sampling(eta=0.5).trajectory_eta() == 0.5
    with pytest.raises(ConfigError, match=r"sampling.eta=0.0: trajectories with step log-probabilities need η > 0"):
        Sampling(eta=0.0).trajectory_eta()


def test_config_has_one_sampling_section_and_old_keys_name_their_new_place():
    cfg = load_config(None, ["sampling.steps=7", "sampling.negative_prompt=blurry", "sampling.eta=0.5"])
    assert (cfg.sampling.steps, cfg.sampling.negative_prompt, cfg.sampling.eta) == (7, "blurry", 0.5)
    assert "sampling" in cfg.to_dict() and load_config(None, []).sampling == Sampling()
    for old, new in (("objective.sample_steps=20", "sampling.steps"), ("objective.guidance=3", "sampling.guidance"),
                     ("objective.eta=1", "sampling.eta"), ("train.validation_steps=4", "sampling.steps"),
                     ("train.validation_guidance=4", "sampling.guidance")):
        key = old.split("=")[0]
        with pytest.raises(ConfigError, match=rf"--set {old}: {key} has moved to {new}"):
            load_config(None, ["objective.name=d3po", old])
    with pytest.raises(ConfigError, match=r"sampling.steps=0: must be at least 1"):
        load_config(None, ["sampling.steps=0"])


def test_a_plugin_objective_may_still_own_an_option_called_guidance(tmp_path, monkeypatch):
    (tmp_path / "guided_obj.py").write_text(
        "from dataclasses import dataclass\n"
        "from diffalign.objectives.dpo import DPO\n"
        "@dataclass\nclass Options:\n    beta: float = 5000.0\n    guidance: float = 0.0\n"
        "class Guided(DPO):\n    Options = Options\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["objective.name=guided_obj:Guided", "objective.guidance=2.5"])
    assert cfg.objective.guidance == 2.5


def test_recipes_use_the_sampling_section():
    from diffalign.resources import builtin_recipes, recipe_path

    for name in builtin_recipes():
        cfg = load_config(recipe_path(name))  # no recipe holds an old key
        if cfg.objective.name == "d3po" and "human" not in name and "tiny" not in name:
            assert cfg.sampling.steps == 20, name  # the D3PO paper's trajectories


def test_guidance_at_most_one_is_the_conditional_branch_as_in_diffusers(tiny_sd15):
    from diffalign.models import Backbone
    from diffalign.sampling.trajectories import guided_prediction

    b = Backbone.load(str(tiny_sd15))
    cond, negative = b.encode_prompt(["a red square"]), b.encode_prompt([""])
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([500])
    with torch.no_grad():
        alone = b.predict(x, t, cond)
        for w in (0.0, 0.5, 1.0):
            assert torch.equal(guided_prediction(b, b.unet, x, t, cond, negative, w), alone)
        assert not torch.allclose(guided_prediction(b, b.unet, x, t, cond, negative, 3.0), alone)


def test_sample_refuses_eta_zero_and_names_the_flag(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    code = main(["sample", "--base", str(tmp_path / "model"), "--prompts", str(tmp_path / "p.txt"), "--eta", "0",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and _last_error(capsys.readouterr().err).startswith(
        "error: --eta 0.0: trajectories with step log-probabilities need η > 0")


def test_online_rollouts_refuse_a_sampling_size_other_than_the_training_resolution(tiny_sd15, tmp_path):
    from diffalign.training.trainer import Trainer

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    cfg = load_config(None, [f"model.pretrained={tiny_sd15}", "objective.name=d3po", f"data.prompts={prompts}",
                             "objective.reward=[brightness]", "data.resolution=32", "sampling.height=48",
                             f"train.output_dir={tmp_path / 'run'}", "log.to=none"])
    with pytest.raises(ConfigError, match=r"online rollouts are drawn square at the training resolution \(32\)"):
        Trainer(cfg)


def test_flags_reach_the_stock_pipeline_and_eval_refuses_other_settings_on_resume(tiny_sd15, tmp_path, capsys,
                                                                                 monkeypatch):
    """Every sampling flag arrives in the stock pipeline call, with the seed policy's generators; an eval folder
    drawn with other settings is refused rather than silently mixed."""
    from PIL import Image

    calls = []

    class Recorder:
        def __call__(self, prompt, generator, **kw):
            calls.append({"prompt": prompt, "seed": generator.initial_seed(), **kw})
            return type("Out", (), {"images": [Image.new("RGB", (8, 8))]})()

    monkeypatch.setattr("diffalign.pipelines.load_aligned_pipeline", lambda *a, **k: Recorder())
    assert main(["generate", "--base", "m", "--prompt", "a", "--prompt", "b", "--steps", "3", "--guidance", "2",
                 "--eta", "0.5", "--negative", "blurry", "--seed", "7", "--height", "48", "--width", "64",
                 "--out", str(tmp_path / "gen")]) == 0
    assert calls == [{"prompt": p, "seed": s, "num_inference_steps": 3, "guidance_scale": 2.0, "eta": 0.5,
                      "negative_prompt": "blurry", "height": 48, "width": 64} for p, s in (("a", 7), ("b", 8))]
    calls.clear()
    assert main(["generate", "--base", "m", "--prompt", "a", "--prompt", "b", "--seed-policy", "shared",
                 "--out", str(tmp_path / "gen2")]) == 0
    assert [c["seed"] for c in calls] == [0, 0] and "eta" not in calls[0] and "height" not in calls[0]

    (tmp_path / "p.txt").write_text("a red square\n")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"steps": 2, "guidance": 5.0}))  # an older report: the rest default
    args = ["eval", "--base", str(tiny_sd15), "--adapter", str(tmp_path), "--prompts", str(tmp_path / "p.txt"),
            "--reward", "brightness", "--height", "32", "--width", "32", "--out", str(out)]
    assert main([*args, "--steps", "3"]) == 2
    assert _last_error(capsys.readouterr().err) == (
        f"error: {out} holds images drawn with other sampling settings (height, steps, width differ); use a new "
        "--out or the same settings to resume")
