import pytest
import torch

from diffalign.config import LoraConfig
from diffalign.lora import add_lora, reference_mode
from diffalign.models import Backbone, ModelLoadError, model_kind


def test_kind_detection_and_bad_paths(tiny_sdxl, tiny_sd15, tmp_path):
    assert model_kind(str(tiny_sdxl)) == "sdxl" and model_kind(str(tiny_sd15)) == "sd15"
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        model_kind(str(tmp_path))
    with pytest.raises(ModelLoadError, match="'/no/such/model'"):
        Backbone.load("/no/such/model")


def test_sdxl_conditioning(tiny_sdxl):
    b = Backbone.load(str(tiny_sdxl))
    cond = b.encode_prompt(["a red square", "a blue circle"])
    assert cond.prompt_embeds.shape == (2, 77, 64)  # both encoders' penultimate states, 32 + 32
    assert cond.pooled.shape == (2, 32)
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])
    geometry = torch.tensor([[48, 64, 0, 8], [32, 32, 0, 0]])
    ids = b.time_ids(geometry, 32)
    assert ids.tolist() == [[48, 64, 0, 8, 32, 32], [32, 32, 0, 0, 32, 32]]
    cond.time_ids = ids
    x = torch.randn(2, 4, 16, 16)
    out = b.predict(x, torch.tensor([10, 500]), cond)
    assert out.shape == x.shape
    cond.time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32)
    assert not torch.allclose(b.predict(x, torch.tensor([10, 500]), cond), out)  # time ids matter


def test_sd15_conditioning_and_vae(tiny_sd15):
    b = Backbone.load(str(tiny_sd15))
    cond = b.encode_prompt(["a red square"])
    assert cond.prompt_embeds.shape == (1, 77, 32) and cond.pooled is None and b.time_ids(torch.zeros(1, 4), 32) is None
    z = b.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert z.shape == (1, 4, 16, 16)
    assert b.decode(z).shape == (1, 3, 32, 32)


def test_v_prediction_target_uses_the_scheduler(tiny_sd15):
    b = Backbone.load(str(tiny_sd15), prediction_type="v_prediction")
    z, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    assert torch.equal(b.target(z, eps, t), b.scheduler.get_velocity(z, eps, t))
    a = b.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(b.target(z, eps, t), a.sqrt() * eps - (1 - a).sqrt() * z, atol=1e-6)


def test_reference_mode_disables_adapters_and_restores_on_error(tiny_sd15):
    b = Backbone.load(str(tiny_sd15))
    params = add_lora(b.unet, LoraConfig(rank=4))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05)
    cond = b.encode_prompt(["x"])
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([100])
    policy = b.predict(x, t, cond)
    with pytest.raises(RuntimeError, match="boom"):
        with reference_mode(b.unet):
            ref = b.predict(x, t, cond)
            assert not ref.requires_grad
            raise RuntimeError("boom")
    assert not torch.allclose(policy, ref)
    assert torch.allclose(b.predict(x, t, cond), policy)  # adapters are back on
