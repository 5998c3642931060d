"""Export: kohya keys read back by diffusers give the same images as our file (alpha ≠ rank); a fused pipeline
equals the adapter at the same scale."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffalign.cli import main
from diffalign.pipelines import load_aligned_pipeline, stock_pipeline
from diffalign.pipelines.export import read_adapter, to_kohya
from diffalign.training.trainer import train


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_sd15, tiny_sdxl, pickapic):
    from diffalign.config import load_config

    out = {}
    root = tmp_path_factory.mktemp("adapters")
    for kind, model in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl)):
        cfg = load_config(None, [f"model.pretrained={model}", f"data.dataset={pickapic}", "data.resolution=32",
                                 "train.batch_size=2", "train.max_steps=2", f"train.output_dir={root / kind}",
                                 f"cache.dir={root / 'cache'}", "log.to=none", "optim.lr=1e-2", "lora.rank=4",
                                 "lora.alpha=8", "train.checkpoint_every=0"])
        out[kind] = (model, train(cfg).output_dir)
    return out


def _images(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red square", num_inference_steps=3, guidance_scale=3.0, height=32, width=32, generator=g,
                output_type="np").images


def test_kohya_keys_and_alpha(adapters):
    tensors, config = read_adapter(adapters["sd15"][1])
    kohya = to_kohya(tensors, config)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert kohya[f"{name}.alpha"].item() == 8.0 and kohya[f"{name}.alpha"].dim() == 0
    assert kohya[f"{name}.lora_down.weight"].shape[0] == 4 and kohya[f"{name}.lora_up.weight"].shape[1] == 4
    assert len(kohya) == len(tensors) // 2 * 3


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_reads_the_kohya_file_and_draws_the_same(kind, adapters, tmp_path):
    base, adapter = adapters[kind]
    out = tmp_path / "lora_kohya.safetensors"
    assert main(["export", str(adapter), "--format", "kohya", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == ("sdxl_base_v1-0" if kind == "sdxl" else "sd_v1")
    ours = _images(load_aligned_pipeline(str(base), adapter))
    pipe = stock_pipeline(str(base))
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    theirs = _images(pipe)
    base_only = _images(stock_pipeline(str(base)))
    assert np.abs(ours - base_only).max() > 1e-3  # the adapter does something
    assert np.allclose(ours, theirs, atol=1e-5)


def test_fused_pipeline_equals_the_adapter_at_scale(adapters, tmp_path):
    from diffusers import DiffusionPipeline

    base, adapter = adapters["sd15"]
    out = tmp_path / "fused"
    assert main(["export", str(adapter), "--fuse", "--scale", "0.7", "--out", str(out)]) == 0
    fused = DiffusionPipeline.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())
    assert np.allclose(_images(fused), _images(load_aligned_pipeline(str(base), adapter, 0.7)), atol=1e-4)
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("args, message", [
    (["--format", "kohya", "--out", "x.bin"], "a kohya LoRA is a .safetensors file"),
    (["--out", "x.safetensors"], "give either --format kohya"),
])
def test_export_bad_input(args, message, adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(adapters["sd15"][1]), *args]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
