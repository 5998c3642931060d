"""The plug-in objective contract: a user's objective, named by import path, declares its options as a dataclass;
they are validated like a built-in's, reach the objective, and a short run trains every LoRA tensor."""

import dataclasses
import json
import sys
import textwrap

import pytest

from diffalign.config import ConfigError, ObjectiveConfig, load_config
from diffalign.training.trainer import train

MODULE = '''
from dataclasses import dataclass

import torch.nn.functional as F

from diffalign.objectives import PairErrors


@dataclass
class MarginOptions:
    beta: float = 5000.0          # every objective's options carry beta
    margin: float = 0.0           # this objective's own option


class MarginDPO:
    Options = MarginOptions
    needs_reference = True
    noising = "forward"
    data = "pairs"
    built_with = []

    def __init__(self, options: MarginOptions, num_timesteps: int = 1000):
        self.options, self.beta = options, options.beta
        MarginDPO.built_with.append(options)

    def __call__(self, errors: PairErrors):
        h = (errors.ref_w - errors.ref_l) - (errors.model_w - errors.model_l)
        loss = -F.logsigmoid(0.5 * self.beta * h - self.options.margin).mean()
        return loss, {"loss": loss.item(), "margin_used": self.options.margin, "implicit_acc": (h > 0).float().mean().item()}
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "margin_plugin.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "margin_plugin:MarginDPO"
    sys.modules.pop("margin_plugin", None)


def test_the_option_reaches_the_objective_and_training_moves_every_lora_tensor(plugin, tiny_sd15, make_config):
    cfg = make_config(tiny_sd15, f"objective.name={plugin}", "objective.margin=0.5", "train.max_steps=3",
                      "optim.lr=1e-2")
    assert type(cfg.objective.options).__name__ == "MarginOptions" and cfg.objective.margin == 0.5
    module = sys.modules["margin_plugin"]
    result = train(cfg)
    assert module.MarginDPO.built_with[-1] == module.MarginOptions(beta=5000.0, margin=0.5)
    saved = json.loads((result.output_dir / "metrics.json").read_text())
    assert [h["margin_used"] for h in saved] == [0.5, 0.5, 0.5]  # its own metrics are logged like the built-ins'
    from safetensors.torch import load_file

    weights = load_file(result.adapter)
    ups = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # B starts at zero: every one moved
    # the written config repeats the run
    again = load_config(result.output_dir / "config.yaml")
    assert again.objective.name == plugin and again.objective.options == cfg.objective.options


def test_an_unknown_key_names_the_objectives_own_keys(plugin):
    with pytest.raises(ConfigError, match=r"--set objective.margn=0.5: objective.margn: not an option of objective "
                                          r"'margin_plugin:MarginDPO' \(did you mean objective.margin\?\); its options are "
                                          r"beta, margin$") as info:
        load_config(None, [f"objective.name={plugin}", "objective.margn=0.5"])
    assert "\n" not in str(info.value)


def test_a_wrong_type_is_one_line_naming_the_key(plugin):
    with pytest.raises(ConfigError, match=r"objective.margin='wide' has the wrong type; expected float"):
        load_config(None, [f"objective.name={plugin}", "objective.margin=wide"])


def test_builtins_follow_the_same_contract():
    from diffalign.registry import BUILTIN_OBJECTIVES, build_objective, objective_class

    for name in BUILTIN_OBJECTIVES:
        cls = objective_class(name)
        assert dataclasses.is_dataclass(cls.Options), name
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls.Options)), name  # help on every field
        if cls.data in ("pairs", "soft_pairs", "unpaired", "rollouts"):  # every preference objective's carry beta
            assert "beta" in {f.name for f in dataclasses.fields(cls.Options)}, name
            assert build_objective(ObjectiveConfig(name)).beta == cls.Options().beta
        else:  # policy gradient and reward backprop have no β (GRPO's KL weight is kl_beta, as the spec names it)
            assert "beta" not in {f.name for f in dataclasses.fields(cls.Options)}, name
            assert build_objective(ObjectiveConfig(name)).options == cls.Options()
    with pytest.raises(ConfigError, match=r"objective.gamma: not an option of objective 'dpo' \(gamma is an option "
                                          r"of smpo\); its options are beta, loss_type"):
        load_config(None, ["objective.gamma=3"])
    with pytest.raises(ConfigError, match=r"objective.loss_type='hing' is not valid; choose one of sigmoid"):
        load_config(None, ["objective.loss_type=hing"])
    assert load_config(None, ["objective.beta=null"]).objective.beta == 5000.0  # older recipes: the default
