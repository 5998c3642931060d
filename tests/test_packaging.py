"""A regular (non-editable) install carries what the package needs at run time: the demo runs from any folder."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("diffalign-*.whl")
    return path


def test_wheel_ships_runtime_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("diffalign/py.typed", "diffalign/resources/recipes/sdxl-dpo.yaml",
                   "diffalign/resources/recipes/testbed-dpo.yaml", "diffalign/resources/prompts/animals.txt",
                   "diffalign/resources/accelerate/ddp.yaml", "diffalign/resources/testbed/model_index.json",
                   "diffalign/resources/labelling/index.html", "diffalign/resources/labelling/label.js",
                   "diffalign/resources/testbed/unet/diffusion_pytorch_model.safetensors",
                   "diffalign/resources/testbed_sdxl/model_index.json",
                   "diffalign/resources/testbed_sdxl/text_encoder_2/model.safetensors"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "scripts/", "assets/")) for n in names)


def test_installed_wheel_runs_demo_from_another_folder(wheel, tmp_path):
    site, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import diffalign; print(diffalign.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the source tree
    run = subprocess.run([sys.executable, "-m", "diffalign", "demo", "--quick", "--out", "demo"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "demo" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (work / "demo" / "report.md").is_file()


def test_every_shipped_recipe_names_its_output_folder():
    from diffalign.config import TrainConfig, load_config
    from diffalign.resources import builtin_recipes

    default = TrainConfig().output_dir
    for name in builtin_recipes():
        assert load_config(name).train.output_dir not in ("", default), name
