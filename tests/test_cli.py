"""CLI smoke tests and the bad-input matrix: one clear message, exit code 2, nothing half-written."""

import re

import pytest

from diffalign.cli import main
from diffalign.resources import recipe_path, resource_dir

RECIPE = recipe_path("tiny-sd15-dpo")


def _train(tmp_path, model, data, *extra):
    return main(["train", "--config", str(RECIPE), "--set", f"model.pretrained={model}", "--set",
                 f"data.dataset={data}", "--set", f"train.output_dir={tmp_path / 'out'}", "--set",
                 f"cache.dir={tmp_path / 'cache'}", "--set", "train.max_steps=2", "--set", "log.to=none",
                 "--set", "train.validation_prompts=[]", *[a for kv in extra for a in ("--set", kv)]])


def test_train_then_generate(tmp_path, tiny_sd15, pickapic, capsys):
    assert _train(tmp_path, tiny_sd15, pickapic) == 0
    assert "adapter:" in capsys.readouterr().out
    code = main(["generate", "--base", str(tiny_sd15), "--adapter", str(tmp_path / "out"), "--scale", "0.8",
                 "--prompt", "a red square", "--prompt", "a blue square", "--steps", "2", "--height", "32",
                 "--width", "32", "--out", str(tmp_path / "gen")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["000.png", "001.png", "grid.png"]


def _bad_parquet(tmp_path, **kw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.testing import make_pickapic_rows

    rows = make_pickapic_rows(4, 40, ties=kw.get("ties", 0))
    if kw.get("broken"):
        for r in rows:
            r["jpg_0"] = b"garbage"
    cols = {k: [r[k] for r in rows] for k in rows[0] if k not in kw.get("drop", ())}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(cols), path)
    return path


CASES = {
    "missing column": (lambda t: {"data": _bad_parquet(t, drop=("caption",))}, r"missing column\(s\) caption"),
    "all ties": (lambda t: {"data": _bad_parquet(t, ties=4)}, r"no usable preference pairs \(4 ties dropped"),
    "undecodable, stop": (lambda t: {"data": _bad_parquet(t, broken=True), "extra": ["data.on_bad_image=error"]},
                          r"bad.parquet, row 0 \(\w+ image\): cannot decode"),
    "undecodable, all skipped": (lambda t: {"data": _bad_parquet(t, broken=True)}, "every pair has an undecodable image"),
    "empty dataset": (lambda t: {"data": (t / "e.jsonl", (t / "e.jsonl").write_text(""))[0]}, "no usable preference pairs"),
    "missing dataset": (lambda t: {"data": t / "nope.parquet"}, "no such file or folder"),
    "unknown key": (lambda t: {"extra": ["train.learning_rate=1"]}, "unknown config key 'train.learning_rate'"),
    "wrong type": (lambda t: {"extra": ["train.batch_size=two"]}, r"train.batch_size='two' has the wrong type"),
    "no such model": (lambda t: {"model": t / "no-model"}, r"no-model.*no such folder"),
    "not a model folder": (lambda t: {"model": t}, "no model_index.json"),
    "unwritable output": (lambda t: {"extra": [f"train.output_dir={(t / 'f', (t / 'f').write_text(''))[0] / 'sub'}"]},
                          "is not writable"),
    "unknown objective": (lambda t: {"extra": ["objective.name=ppo"]}, "unknown objective 'ppo'"),
    "soft labels without scores": (lambda t: {"extra": ["objective.name=smpo"]},
                                   r"row \d+: no reward scores; soft-label objectives"),
    "inversion cache with the policy": (lambda t: {"extra": ["objective.name=inpo", "objective.inversion_cache=true"]},
                                        "inversion_cache=true needs objective.inversion_model='reference'"),
    "d3po without prompts": (lambda t: {"extra": ["objective.name=d3po"]}, "needs data.prompts .* or data.labels"),
    "d3po prompts file missing": (lambda t: {"extra": ["objective.name=d3po", f"data.prompts={t / 'p.txt'}",
                                                       "objective.reward=[brightness]"]}, "p.txt' does not exist"),
    "unknown reward": (lambda t: {"extra": ["objective.name=d3po", f"data.prompts={_prompts(t)}",
                                            "objective.reward=[aesthetics]"]},
                       "unknown reward 'aesthetics'; choose one of aesthetic, brightness"),
    "malformed reward option": (lambda t: {"extra": ["objective.name=d3po", f"data.prompts={_prompts(t)}",
                                                     "objective.reward=[brightness]", "objective.reward_options=[gain]"]},
                                "reward option 'gain': expected HEAD.KEY=VALUE"),
    "label file missing": (lambda t: {"extra": ["objective.name=d3po", f"data.labels={t / 'l.jsonl'}"]},
                           "no manifest.json"),
}


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n")
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, tiny_sd15, pickapic, capsys):
    build, message = CASES[case]
    spec = build(tmp_path)
    code = _train(tmp_path, spec.get("model", tiny_sd15), spec.get("data", pickapic), *spec.get("extra", []))
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    assert re.search(message, last), err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("args, message", [
    (["--adapter", "{tmp}"], r"adapter '.*': no pytorch_lora_weights.safetensors there"),
    (["--adapter", "{tmp}", "--scale", "0.5", "--scale", "1"], "1 --adapter but 2 --scale"),
])
def test_generate_bad_adapter(args, message, tmp_path, tiny_sd15, capsys):
    args = [a.replace("{tmp}", str(tmp_path / "empty")) for a in args]
    (tmp_path / "empty").mkdir()
    code = main(["generate", "--base", str(tiny_sd15), "--prompt", "a cat", "--out", str(tmp_path / "gen"), *args])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and re.search(message, last), last
    assert not (tmp_path / "gen").exists()


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed-zero2", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(resource_dir("accelerate") / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.mixed_precision == "bf16"


def _help(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_train_help_names_the_key_reference_and_the_shipped_recipes(capsys):
    from diffalign.resources import builtin_recipes

    text = _help(capsys, "train")
    assert "README.md" in text and "Configuration reference" in text
    assert all(name in text for name in builtin_recipes())


@pytest.mark.parametrize("command, shown", [
    ("generate", ["denoising steps (default: 30)", "(default: generated)", "(default: 0)"]),
    ("make-pairs", ["(default: 4)", "(default: best-worst)"]),
    ("sample", ["(default: 7)", "DDIM steps (default: 20)"]),
    ("eval", ["(default: 4)"]),
    ("score", ["(default: 8)"]),
    ("export", ["(default: 1.0)"]),
    ("demo", ["(default: runs/demo)", "(default: shape_size)"]),
])
def test_every_help_shows_defaults(command, shown, capsys):
    text = _help(capsys, command)
    assert all(s in text for s in shown), text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_train_accepts_a_shipped_recipe_name(tmp_path, capsys):
    # the recipe is found by name: the error is about the key, not a missing file
    assert main(["train", "--config", "sdxl-dpo", "--set", "train.lerning=1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --set train.lerning=1: unknown config key 'train.lerning'"), last
