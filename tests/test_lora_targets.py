"""LoRA on other modules than attention (resnet convs, feed-forward, projections): the file we write loads in full
into a stock pipeline, into ours and through the kohya export, on SD1.5 and SDXL. Before, the attention keys were
written in diffusers' old naming and the others in peft's, and diffusers, which picks one naming from the first
key, silently dropped the attention half."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from diffalign.config import LoraConfig
from diffalign.lora import WEIGHT_NAME, add_lora, save_lora
from diffalign.models import pipeline_class
from diffalign.pipelines import AdapterError, load_aligned_pipeline, stock_pipeline
from diffalign.pipelines.export import export_kohya

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.0.proj"]


def _lora_modules(unet: torch.nn.Module) -> set[str]:
    return {name for name, module in unet.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}


def _unet_out(unet: UNet2DConditionModel, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = unet.config
    sample = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
    text = torch.randn(1, 5, c.cross_attention_dim, generator=g)
    extra = {}
    if kind == "sdxl":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=text, **extra).sample


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def conv_adapter(request, tiny_sd15, tiny_sdxl, tmp_path_factory):
    """An adapter on attention, resnet convs, proj_in and the feed-forward, every weight non-zero."""
    kind = request.param
    base = tiny_sdxl if kind == "sdxl" else tiny_sd15
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    add_lora(unet, LoraConfig(rank=4, alpha=8, targets=TARGETS))
    torch.manual_seed(1)
    for p in (p for n, p in unet.named_parameters() if "lora_" in n):
        p.data = torch.randn_like(p) * 0.2
    out = tmp_path_factory.mktemp(f"conv-{kind}")
    save_lora(unet, out, pipeline_class(kind))
    return kind, base, out, _lora_modules(unet), _unet_out(unet, kind)


def test_the_file_uses_one_key_naming(conv_adapter):
    _, _, out, modules, _ = conv_adapter
    keys = load_file(str(out / WEIGHT_NAME)).keys()
    assert any(".conv1." in k for k in keys) and any(".to_q." in k for k in keys)
    assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys), sorted(keys)[:4]
    assert len(keys) == 2 * len(modules)


def test_stock_diffusers_loads_every_module(conv_adapter):
    kind, base, out, modules, expected = conv_adapter
    pipe = stock_pipeline(str(base))
    pipe.load_lora_weights(str(out))
    assert _lora_modules(pipe.unet) == modules
    assert torch.allclose(_unet_out(pipe.unet, kind), expected, atol=1e-5)


def test_our_loader_and_the_kohya_export_load_every_module(conv_adapter, tmp_path):
    kind, base, out, modules, expected = conv_adapter
    ours = load_aligned_pipeline(str(base), out)
    assert _lora_modules(ours.unet) == modules
    assert torch.allclose(_unet_out(ours.unet, kind), expected, atol=1e-5)
    kohya = export_kohya(out, tmp_path / "kohya.safetensors")
    pipe = stock_pipeline(str(base))
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    assert torch.allclose(_unet_out(pipe.unet, kind), expected, atol=1e-5)


def _rewritten(out, folder, change):
    """A copy of the adapter in ``out`` with ``change`` applied to its tensors (the metadata kept) in ``folder``."""
    from safetensors import safe_open

    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        metadata = f.metadata()
    folder.mkdir()
    save_file(change(load_file(str(out / WEIGHT_NAME))), str(folder / WEIGHT_NAME), metadata=metadata)
    return folder


def test_a_mixed_naming_file_from_an_earlier_version_loads_in_full(conv_adapter, tmp_path):
    """Adapters written before the fix mix the two namings; our loader and the export read all of it (stock
    diffusers cannot)."""
    kind, base, out, modules, expected = conv_adapter

    def mix(tensors):
        return {(k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.") if ".to_" not in k else k): v
                for k, v in tensors.items()}

    old = _rewritten(out, tmp_path / "old", mix)
    assert any(".lora_A." in k for k in load_file(str(old / WEIGHT_NAME)))
    pipe = load_aligned_pipeline(str(base), old)
    assert _lora_modules(pipe.unet) == modules
    assert torch.allclose(_unet_out(pipe.unet, kind), expected, atol=1e-5)
    kohya = export_kohya(old, tmp_path / "kohya.safetensors")  # the export reads both namings too
    stock = stock_pipeline(str(base))
    stock.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    assert torch.allclose(_unet_out(stock.unet, kind), expected, atol=1e-5)


def test_a_file_naming_a_module_the_unet_lacks_is_refused(conv_adapter, tmp_path):
    _, base, out, _, _ = conv_adapter

    def add_missing_module(tensors):
        module = next(k for k in tensors if k.endswith(".lora.down.weight")).removesuffix(".lora.down.weight")
        tensors["unet.no_such_block.conv9.lora.down.weight"] = tensors[f"{module}.lora.down.weight"].clone()
        tensors["unet.no_such_block.conv9.lora.up.weight"] = tensors[f"{module}.lora.up.weight"].clone()
        return tensors

    with pytest.raises(AdapterError, match="no_such_block.conv9"):
        load_aligned_pipeline(str(base), _rewritten(out, tmp_path / "bad", add_missing_module))
