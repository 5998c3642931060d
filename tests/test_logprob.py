"""The DDIM step log-probability against a closed-form Gaussian and against diffusers' own DDIM step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.training.logprob import ddim_step_log_prob


def _scheduler(prediction_type="epsilon", steps=10):
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s.set_timesteps(steps)
    return s


def test_matches_the_closed_form_gaussian():
    s = _scheduler()
    torch.manual_seed(0)
    x, eps, prev = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([901, 1])  # the second has no earlier timestep: ā_prev = final_alpha_cumprod
    _, logp = ddim_step_log_prob(s, eps, t, x, eta=0.7, prev_sample=prev)
    for i, ti in enumerate(t.tolist()):
        a_t = s.alphas_cumprod[ti].item()
        a_prev = s.alphas_cumprod[ti - 100].item() if ti >= 100 else s.final_alpha_cumprod.item()
        x0 = (x[i] - math.sqrt(1 - a_t) * eps[i]) / math.sqrt(a_t)
        std = 0.7 * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps[i]
        expected = torch.distributions.Normal(mu, std).log_prob(prev[i]).mean()
        assert logp[i].item() == pytest.approx(expected.item(), rel=1e-4)  # fp32; std ~1e-2 at t=1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sample_equals_diffusers_ddim_step(prediction_type):
    s = _scheduler(prediction_type)
    torch.manual_seed(1)
    x, out = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    for t in s.timesteps[[0, 4, -1]]:
        ours, logp = ddim_step_log_prob(s, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
        ref = s.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5)
        _, again = ddim_step_log_prob(s, out, t, x, eta=1.0, prev_sample=ours)
        assert torch.allclose(logp, again, atol=1e-6)  # sampling and re-scoring agree
    # batched timesteps == one call per sample
    t = s.timesteps[[0, 3, 9]]
    prev = torch.randn_like(x)
    _, batched = ddim_step_log_prob(s, out, t, x, prev_sample=prev)
    single = [ddim_step_log_prob(s, out[i : i + 1], t[i], x[i : i + 1], prev_sample=prev[i : i + 1])[1] for i in range(3)]
    assert torch.allclose(batched, torch.cat(single), atol=1e-6)


def test_gradient_flows_through_the_mean_only():
    s = _scheduler()
    out = torch.randn(2, 4, 3, 3, requires_grad=True)
    x = torch.randn(2, 4, 3, 3)
    prev, logp = ddim_step_log_prob(s, out, s.timesteps[2], x, generator=torch.Generator().manual_seed(0))
    assert not prev.requires_grad
    logp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_bad_settings_are_named():
    s = _scheduler()
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta=0"):
        ddim_step_log_prob(s, x, s.timesteps[0], x, eta=0)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_log_prob(DDIMScheduler(), x, 10, x)
    one = DDIMScheduler(set_alpha_to_one=True, steps_offset=1)
    one.set_timesteps(10)
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        ddim_step_log_prob(one, x, one.timesteps[-1], x)
