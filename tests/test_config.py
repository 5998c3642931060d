import re
from pathlib import Path

import pytest

from diffalign.config import Config, ConfigError, load_config
from diffalign.resources import resource_dir

RECIPES = sorted(resource_dir("recipes").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.objective.beta == 5000.0 and cfg.lora.rank == 8  # DPO's own default β


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 7\n  batch_size: 3\noptim:\n  lr: 1e-4\n")
    cfg = load_config(recipe, ["train.max_steps=9", "lora.targets=[to_q, to_v]", "model.vae=null"])
    assert (cfg.train.max_steps, cfg.train.batch_size) == (9, 3)
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.lora.targets == ["to_q", "to_v"] and cfg.model.vae is None


def test_unknown_key_suggests_the_near_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*train.max_steps"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.max_steps=3"])


def test_unknown_key_in_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("objective:\n  betta: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*objective.betta.*objective.beta"):
        load_config(recipe)


def test_wrong_type_and_bad_choice_name_the_key():
    with pytest.raises(ConfigError, match=r"train.max_steps='abc'.*expected int"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"train.gradient_checkpointing=3.*expected bool"):
        load_config(None, ["train.gradient_checkpointing=3"])
    with pytest.raises(ConfigError, match=r"objective.loss_type='square'.*sigmoid, hinge, ipo"):
        load_config(None, ["objective.loss_type=square"])
    with pytest.raises(ConfigError, match=r"data.caption_dropout=1.5"):
        load_config(None, ["data.caption_dropout=1.5"])
    with pytest.raises(ConfigError, match=r"train.error_space='noise'.*prediction, epsilon"):
        load_config(None, ["train.error_space=noise"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.max_steps"])


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/recipe.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    from diffalign.registry import BUILTIN_OBJECTIVES

    cfg = load_config(recipe)
    assert cfg.objective.name in BUILTIN_OBJECTIVES and cfg.objective.name.replace("_", "-") in recipe.name


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=11", "lora.alpha=16"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_readme_documents_every_key():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    from diffalign.config import valid_keys

    missing = [k for k in valid_keys() if f"`{k}`" not in readme]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_a_bad_override_is_blamed_on_the_override_not_the_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 1e-4\ntrain:\n  max_steps: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["optim.lr=abc", "train.max_steps=5"])
    assert str(info.value).startswith("--set optim.lr=abc: optim.lr='abc' has the wrong type"), info.value
    assert "recipe.yaml" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^--set train.lerning=3: unknown config key 'train.lerning'"):
        load_config(recipe, ["train.lerning=3"])
    with pytest.raises(ConfigError, match=r"^--set optim.lr=-1: optim.lr=-1.0 must be > 0"):
        load_config(None, ["optim.lr=-1"])
    # the recipe's own bad value names the recipe, once
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    assert str(info.value) == f"{recipe}: train.max_steps=0 must be > 0"
    # ... unless an override fixes it
    assert load_config(recipe, ["train.max_steps=5"]).train.max_steps == 5


def test_a_cross_key_error_names_every_source(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("objective:\n  name: inpo\n  inversion_cache: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["objective.inversion_model=policy"])
    assert str(info.value).startswith(f"{recipe} and --set objective.inversion_model=policy: "), info.value


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: [1\n", r"line 3, column 1: not valid YAML: expected ',' or ']'"),
    ("- a\n- b\n", "expected a mapping of sections, got list"),
    ("optim: 3\n", "section 'optim' must be a mapping, got 3"),
])
def test_a_bad_recipe_names_its_path_once_on_one_line(tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    msg = str(info.value)
    assert msg.count(str(recipe)) == 1 and msg.startswith(str(recipe)) and "\n" not in msg, msg
    assert re.search(message, msg), msg
    assert "<unicode string>" not in msg


def test_a_shipped_recipe_by_name():
    assert load_config("sdxl-dpo") == load_config(resource_dir("recipes") / "sdxl-dpo.yaml")


def test_objective_help_names_every_builtin_and_loss_types_are_defined_once():
    import dataclasses

    from diffalign import config
    from diffalign.objectives import dpo
    from diffalign.registry import BUILTIN_OBJECTIVES

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(config.ObjectiveConfig)}
    assert all(name in helps["name"] for name in BUILTIN_OBJECTIVES), helps["name"]
    assert not hasattr(config, "LOSS_TYPES")  # DPO's own option, defined with it
    loss_help = next(f.metadata["help"] for f in dataclasses.fields(dpo.DPOOptions) if f.name == "loss_type")
    assert all(t in loss_help for t in dpo.LOSS_TYPES)
