import os

# Any accidental download must fail loudly; caches stay out of the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from diffalign.config import load_config  # noqa: E402
from diffalign.testing import save_tiny_pipeline, write_pickapic_parquet  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
    os.environ["DIFFALIGN_CACHE"] = str(root / "diffalign")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd15", "sd15")


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory):
    """12 Pick-a-Pic-format rows, the last 2 of them ties."""
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "pickapic.parquet", n=12, size=40, ties=2)


@pytest.fixture(scope="session")
def scored_pickapic(tmp_path_factory):
    """12 rows with reward scores (score_0/score_1), the reward disagreeing with the label on rows 4 and 9."""
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "scored.parquet", n=12, size=40, scores=True)


@pytest.fixture
def make_config(tmp_path, pickapic):
    """A tiny, fast training config; keyword ``overrides`` are ``section.key=value`` strings."""

    def make(model, *overrides, out="run"):
        base = [f"model.pretrained={model}", f"data.dataset={pickapic}", "data.resolution=32",
                "train.batch_size=2", "train.max_steps=3", f"train.output_dir={tmp_path / out}",
                f"cache.dir={tmp_path / 'cache'}", "log.to=none", "optim.lr=1e-3", "lora.rank=4",
                "train.checkpoint_every=0"]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture
def online_config(tmp_path):
    """A tiny online run (D3PO, DDPO, GRPO, reward backprop) on three prompts scored by brightness:
    ``make(model, name, *overrides, out="run")``."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green triangle\n")

    def make(model, name, *overrides, out="run"):
        base = [f"model.pretrained={model}", f"objective.name={name}", f"data.prompts={prompts}",
                f"data.eval_prompts={prompts}", "objective.reward=[brightness]", "sampling.steps=3",
                "sampling.guidance=3.0", "data.resolution=32", f"train.output_dir={tmp_path / out}", "log.to=none",
                "lora.rank=4", "train.checkpoint_every=0", "objective.eval_every=1"]
        return load_config(None, base + list(overrides))

    return make
