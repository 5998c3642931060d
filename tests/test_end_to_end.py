"""Train -> save -> a fresh stock diffusers pipeline loads the file -> it generates what we trained."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffalign.pipelines import load_aligned_pipeline
from diffalign.training.trainer import Trainer


def _image(pipe, seed=0):
    return pipe("a red square on a blue background", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def _unet_inputs(pipe, kind):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    hidden = torch.randn(1, 77, 64 if kind == "sdxl" else 32)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]])}} \
        if kind == "sdxl" else {}
    return x, torch.tensor([400]), hidden, kw


@pytest.mark.parametrize("kind, lora", [("sdxl", ["lora.rank=4", "lora.alpha=8"]), ("sd15", [])])
def test_stock_pipeline_loads_our_adapter(kind, lora, request, make_config):
    base = str(request.getfixturevalue(f"tiny_{kind}"))
    trainer = Trainer(make_config(base, "optim.lr=1e-2", "train.max_steps=3", *lora))
    result = trainer.train()
    trained_unet = trainer.accelerator.unwrap_model(trainer.unet).eval()

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    base_image = _image(pipe)
    pipe.load_lora_weights(str(result.output_dir))  # stock diffusers, our file, nothing else
    x, t, hidden, kw = _unet_inputs(pipe, kind)
    with torch.no_grad():
        # the file holds exactly the trained adapter, alpha/rank scaling included
        assert torch.allclose(pipe.unet(x, t, hidden, **kw).sample, trained_unet(x, t, hidden, **kw).sample, atol=1e-5)
    assert np.abs(_image(pipe) - base_image).max() > 1e-3

    aligned = load_aligned_pipeline(base, result.output_dir, scales=0.0)
    assert type(aligned).__name__ == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    assert np.array_equal(_image(aligned), base_image)  # scale 0 is the base model exactly
    aligned.set_adapters(["aligned_0"], adapter_weights=[1.0])
    assert np.abs(_image(aligned) - base_image).max() > 1e-3


def test_outputs_of_a_run(tiny_sdxl, make_config, tmp_path):
    cfg = make_config(tiny_sdxl, "train.validation_prompts=[a red square]", "sampling.steps=2",
                      "log.to=tensorboard")
    result = Trainer(cfg).train()
    out = tmp_path / "run"
    assert result.adapter == out / "pytorch_lora_weights.safetensors" and result.adapter.is_file()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "diffalign-dpo" in card and "implicit_acc" in card
    assert (out / "config.yaml").is_file() and (out / "metrics.json").is_file()
    assert (out / "validation" / "step-000003.png").is_file()
    assert any((out / "logs").rglob("events.out.tfevents*"))
    assert not [p for p in out.rglob(".*tmp*")]  # no temporary leftovers


def test_several_adapters_with_scales(tiny_sd15, make_config):
    a = Trainer(make_config(tiny_sd15, "optim.lr=1e-2", out="a")).train().output_dir
    b = Trainer(make_config(tiny_sd15, "optim.lr=1e-2", "train.seed=1", out="b")).train().output_dir
    base = _image(load_aligned_pipeline(str(tiny_sd15)))
    both = load_aligned_pipeline(str(tiny_sd15), [a, b], [0.0, 0.0])
    assert np.array_equal(_image(both), base)
    both.set_adapters(["aligned_0", "aligned_1"], adapter_weights=[0.5, 1.0])
    assert np.abs(_image(both) - base).max() > 1e-3
    with pytest.raises(ValueError, match="2 adapter"):
        load_aligned_pipeline(str(tiny_sd15), [a, b], [1.0])
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        load_aligned_pipeline(str(tiny_sd15), tiny_sd15)
