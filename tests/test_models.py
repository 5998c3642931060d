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


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_epsilon_space_error_is_the_error_of_the_predicted_noise(kind, prediction_type, request):
    """train.error_space=epsilon: the error equals (ε̂ - ε)² computed through predict_noise, on either kind of
    model; on v-prediction it is ā_t times the v error, on ε-prediction the error itself."""
    b = Backbone.load(str(request.getfixturevalue(f"tiny_{kind}")), prediction_type=prediction_type)
    torch.manual_seed(0)
    z, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([3, 500, 990])
    x_t, cond = b.scheduler.add_noise(z, eps, t), b.encode_prompt(["a", "b", "c"])
    if kind == "sdxl":
        cond.time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 3, dtype=torch.float32)
    native = b.denoising_error(x_t, t, cond, b.target(z, eps, t))
    in_eps = b.denoising_error(x_t, t, cond, b.target(z, eps, t), space="epsilon")
    by_hand = ((b.predict_noise(x_t, t, cond) - eps) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(in_eps, by_hand, rtol=1e-4, atol=1e-7)
    scale = b.scheduler.alphas_cumprod[t] if prediction_type == "v_prediction" else torch.ones(3)
    assert torch.allclose(in_eps, scale * native, rtol=1e-5)
    if prediction_type == "v_prediction":
        assert in_eps[2] < 0.05 * native[2]  # the noisiest step weighs ā_990 ≈ 0.005 of its v error
    with pytest.raises(ValueError, match="space='noise'"):
        b.denoising_error(x_t, t, cond, b.target(z, eps, t), space="noise")


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


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("negative_prompt", ["", "blurry"])
def test_our_sampler_draws_what_the_stock_pipeline_draws(kind, negative_prompt, request):
    """The rollout sampler (online objectives, `diffalign sample`) with CFG equals ``pipe(prompt)`` from the same
    x_T: on SDXL that needs the stock pipeline's zero unconditional branch when there is no negative prompt."""
    from diffalign.sampling.settings import Sampling
    from diffalign.sampling.trajectories import ddim_scheduler, sample_rollouts

    path = request.getfixturevalue(f"tiny_{kind}")
    backbone = Backbone.load(str(path))
    resolution, prompt = 32, "a red circle"
    # η must be > 0 for step log-probabilities; at 1e-6 its noise is far below the tolerance.
    sampling = Sampling(steps=4, guidance=5.0, eta=1e-6, negative_prompt=negative_prompt)
    cond = backbone.at_resolution(backbone.encode_prompt([prompt]), resolution)
    negative = backbone.at_resolution(backbone.encode_negative(negative_prompt), resolution)
    ours = sample_rollouts(backbone, backbone.unet, [prompt], cond, negative, 1, sampling, resolution,
                           torch.Generator().manual_seed(0), decode=False)
    pipe = backbone.pipeline_class.from_pretrained(str(path), scheduler=ddim_scheduler(backbone, 4),
                                                   **({"safety_checker": None} if kind == "sd15" else {}))
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompt, negative_prompt=negative_prompt or None, latents=ours.latents[:, 0, 0], height=resolution,
                 width=resolution, num_inference_steps=4, guidance_scale=5.0, eta=0.0, output_type="latent").images
    torch.testing.assert_close(ours.latents[:, 0, -1], stock.float(), atol=1e-4, rtol=1e-4)
    embeds = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                negative_prompt=negative_prompt or None)
    torch.testing.assert_close(negative.prompt_embeds, embeds[1])
    if kind == "sdxl":
        torch.testing.assert_close(negative.pooled, embeds[3])
    if kind == "sdxl" and not negative_prompt:
        assert torch.count_nonzero(negative.prompt_embeds) == 0 and torch.count_nonzero(negative.pooled) == 0
