"""What the CLI prints when things go wrong: one `error:` line for our own error types (exit 2), a full traceback
for a bug in our code, the user's own traceback under a line naming the head for a reward that raises, plug-ins
found in the working folder, refused sampling arguments, nothing partial after a failed make-pairs, and no
library noise."""

import logging
import re
import sys
import textwrap

import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.config import ConfigError, ObjectiveConfig
from diffalign.registry import objective_class
from diffalign.rewards import RewardError, load_reward


def _last_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    (tmp_path / "p.txt").write_text("a cat\n")
    return ["--images", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s.jsonl")]


@pytest.fixture
def clean_modules():
    """Forget the test's plug-in modules afterwards (and the sys.path entries an import may have added)."""
    path, names = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - names:
        if name.startswith("cwd_") or name.startswith("plug_"):
            sys.modules.pop(name, None)


# --- 1. our error types are one line; a bug keeps its traceback -------------------------------------------------

@pytest.mark.parametrize("exc", [KeyError("internal"), ImportError("internal import")])
def test_a_keyerror_or_importerror_inside_our_code_keeps_its_traceback(exc, images, monkeypatch):
    def broken(*a, **k):
        raise exc

    monkeypatch.setattr("diffalign.evaluation.scoring.score_folder", broken)
    with pytest.raises(type(exc)):
        main(["score", "--reward", "brightness", *images])


def test_an_unimportable_plugin_is_one_of_our_errors_and_one_line(tmp_path, images, capsys, monkeypatch,
                                                                 clean_modules):
    with pytest.raises(RewardError, match=r"reward 'no_such_module_xyz:fn' cannot be imported: "
                                          r"No module named 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match=r"objective 'no_such_module_xyz:Obj' cannot be imported"):
        objective_class(ObjectiveConfig(name="no_such_module_xyz:Obj"))
    with pytest.raises(ConfigError, match="unknown objective 'ppo'"):
        objective_class(ObjectiveConfig(name="ppo"))
    # a plug-in whose own import fails: the missing package is named
    (tmp_path / "plug_needs_dep.py").write_text("import missing_dependency_xyz\n\ndef fn(images, prompts):\n"
                                                "    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["score", "--reward", "plug_needs_dep:fn", *images]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = _last_error(err)
    assert last.startswith("error: reward 'plug_needs_dep:fn' cannot be imported") and \
        "No module named 'missing_dependency_xyz'" in last, last
    # an attribute the module lacks
    (tmp_path / "plug_empty.py").write_text("x = 1\n")
    assert main(["score", "--reward", "plug_empty:fn", *images]) == 2
    assert "has no attribute 'fn'" in _last_error(capsys.readouterr().err)


# --- 2. plug-ins in the working folder, as `python -m` finds them ------------------------------------------------

def _without_cwd(monkeypatch, folder):
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(folder))])


def test_a_reward_module_in_the_working_folder_is_found(tmp_path, images, monkeypatch, capsys, clean_modules):
    work = tmp_path / "work"
    work.mkdir()
    (work / "cwd_rewards.py").write_text("def redness(images, prompts):\n    return images[:, 0].mean(dim=(1, 2))\n")
    _without_cwd(monkeypatch, work)
    assert main(["score", "--reward", "cwd_rewards:redness", *images]) == 0, capsys.readouterr().err
    assert '"cwd_rewards:redness": 1.0' in (tmp_path / "s.jsonl").read_text()


def test_an_objective_module_in_the_working_folder_is_found(tmp_path, monkeypatch, clean_modules):
    (tmp_path / "cwd_objectives.py").write_text("class Mine:\n    noising = 'forward'\n")
    _without_cwd(monkeypatch, tmp_path)
    cls = objective_class("cwd_objectives:Mine")
    assert cls.__name__ == "Mine" and cls.noising == "forward"


def test_a_missing_module_says_where_it_was_looked_for(tmp_path, monkeypatch, clean_modules):
    _without_cwd(monkeypatch, tmp_path)
    with pytest.raises(RewardError, match=r"No module named 'cwd_nowhere'.*working folder.*PYTHONPATH"):
        load_reward("cwd_nowhere:fn")
    assert str(tmp_path) not in sys.path  # a failed search leaves sys.path as it was


# --- 7. a reward that raises: a line naming the head and prompt, then the user's own traceback -------------------

def test_a_user_reward_that_raises_names_head_and_prompt_above_its_traceback(tmp_path, images, capsys, monkeypatch,
                                                                          clean_modules):
    (tmp_path / "plug_boom.py").write_text(textwrap.dedent("""
        def explode(images, prompts):
            return helper(images)

        def helper(images):
            raise ValueError("boom in user code")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["score", "--reward", "plug_boom:explode", *images]) == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("error: reward head 'plug_boom:explode' failed on prompt 'a cat'"), err
    assert "ValueError: boom in user code" in first
    tb = err[err.index("Traceback"):]
    assert "plug_boom.py" in tb and "in helper" in tb and tb.strip().endswith("ValueError: boom in user code")
    assert not (tmp_path / "s.jsonl").exists()


def test_reward_failure_is_a_reward_error_chained_to_the_users_exception():
    from diffalign.rewards import score

    def broken(images, prompts):
        raise ZeroDivisionError("x")

    with pytest.raises(RewardError, match=r"reward head 'broken' failed on prompts 'a', 'b'") as info:
        score(broken, torch.rand(2, 3, 4, 4), ["a", "b"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# --- 7. sampling arguments refused before anything loads ---------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], r"--steps 0: must be at least 1"),
    (["--scale", "nan"], r"--scale nan: must be a finite number"),
    (["--guidance", "inf"], r"--guidance inf: must be a finite number"),
    (["--height", "30"], r"--height 30: must be a positive multiple of 8"),
    (["--width", "-8"], r"--width -8: must be a positive multiple of 8"),
])
def test_generate_refuses_bad_sampling_arguments(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffalign.pipelines.load_aligned_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    extra = ["--adapter", str(tmp_path)] if "--scale" in args else []
    code = main(["generate", "--base", str(tmp_path / "model"), "--prompt", "a cat", "--out", str(tmp_path / "gen"),
                 *extra, *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(r"error: " + message + ".*", _last_error(err)), err
    assert not (tmp_path / "gen").exists()


@pytest.mark.parametrize("command", ["make-pairs", "eval", "sample"])
def test_other_sampling_commands_refuse_zero_steps(command, tmp_path, capsys):
    extra = {"make-pairs": ["--reward", "brightness", "--out", str(tmp_path / "o")],
             "eval": ["--reward", "brightness", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")],
             "sample": ["--out", str(tmp_path / "o")]}[command]
    code = main([command, "--base", str(tmp_path / "model"), "--prompts", str(tmp_path / "p.txt"), "--steps", "0",
                 *extra])
    assert code == 2 and _last_error(capsys.readouterr().err).startswith("error: --steps 0: must be at least 1")


# --- 7. a corrupt adapter file ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_sd15(tmp_path_factory, tiny_sd15):
    from diffalign.config import LoraConfig
    from diffalign.lora import add_lora, save_lora
    from diffalign.models import Backbone

    backbone = Backbone.load(str(tiny_sd15))
    add_lora(backbone.unet, LoraConfig(rank=4))
    folder = tmp_path_factory.mktemp("adapter") / "aligned"
    save_lora(backbone.unet, folder, backbone.pipeline_class)
    return folder


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_adapter_file_is_one_line_naming_it(damage, tmp_path, tiny_sd15, adapter_sd15, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (adapter_sd15 / "pytorch_lora_weights.safetensors").read_bytes()
    data = b"not a safetensors file at all" if damage == "garbage" else good[:-64]
    (bad / "pytorch_lora_weights.safetensors").write_bytes(data)
    code = main(["generate", "--base", str(tiny_sd15), "--adapter", str(bad), "--prompt", "a cat", "--steps", "1",
                 "--out", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = _last_error(err)
    assert last.startswith("error: adapter ") and "bad/pytorch_lora_weights.safetensors" in last, last
    assert "not a readable safetensors file" in last
    assert not (tmp_path / "gen").exists()


# --- 9. no library noise ----------------------------------------------------------------------------------------

def test_generate_with_an_adapter_prints_no_library_noise(tmp_path, tiny_sd15, adapter_sd15, capfd):
    code = main(["generate", "--base", str(tiny_sd15), "--adapter", str(adapter_sd15), "--prompt", "a cat",
                 "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "gen")])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "No LoRA keys" not in err and "Loading weights" not in err and "Loading pipeline components" not in err
    assert out.strip().splitlines() == [str(tmp_path / "gen" / "000.png")]
    # our own warnings still show
    assert logging.getLogger("diffalign.anything").isEnabledFor(logging.WARNING)


# --- 7. make-pairs leaves nothing partial ----------------------------------------------------------------------

def _make_pairs_args(tmp_path, tiny_sd15, reward):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    return ["make-pairs", "--base", str(tiny_sd15), "--prompts", str(prompts), "--per-prompt", "2", "--reward",
            reward, "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "pairs")]


def test_make_pairs_failing_on_a_prompt_leaves_only_finished_prompts(tmp_path, tiny_sd15, capsys, monkeypatch,
                                                                   clean_modules):
    (tmp_path / "plug_second.py").write_text(textwrap.dedent("""
        def picky(images, prompts):
            if prompts[0] == "a blue circle":
                raise RuntimeError("cannot score blue")
            return images.mean(dim=(1, 2, 3))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(_make_pairs_args(tmp_path, tiny_sd15, "plug_second:picky")) == 2
    assert "failed on prompt 'a blue circle'" in capsys.readouterr().err
    files = sorted(p.name for p in (tmp_path / "pairs" / "images").iterdir())
    assert files == ["p00000_0.png", "p00000_1.png"]  # nothing of the prompt that failed, no temporary files


def test_make_pairs_interrupted_while_saving_leaves_nothing_partial_and_resumes(tmp_path, tiny_sd15, monkeypatch):
    from diffalign.sampling import make_pairs as module

    args = _make_pairs_args(tmp_path, tiny_sd15, "brightness")
    real, calls = module.atomic_save_image, []

    def save(path, image):
        calls.append(path)
        if len(calls) == 4:  # the second image of the second prompt
            raise KeyboardInterrupt
        return real(path, image)

    monkeypatch.setattr(module, "atomic_save_image", save)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    images = tmp_path / "pairs" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["p00000_0.png", "p00000_1.png"]
    # a temporary file left by a hard kill is cleared on resume
    (images / ".p00001_0.png.abc.partial").write_bytes(b"half")
    monkeypatch.setattr(module, "atomic_save_image", real)
    assert main(args) == 0
    assert sorted(p.name for p in images.iterdir()) == ["p00000_0.png", "p00000_1.png", "p00001_0.png",
                                                         "p00001_1.png"]
