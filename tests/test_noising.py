"""DDIM inversion exactly to t, and ReNoise, against closed forms and a hand-written reference."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffalign.training.noising import CLEAN, ddim_inverse_step, ddim_invert, inversion_grid, inverted_noise

ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def alpha(levels):
    """ā of grid levels, 1 for the clean level."""
    return torch.where(levels == CLEAN, torch.tensor(1.0), ALPHAS[levels.clamp(min=0)]).view(-1, 1, 1, 1)


def constant(eps_star):
    return lambda x, t: eps_star.expand_as(x)


@pytest.mark.parametrize("num_steps", [1, 3, 10, 50])
def test_constant_model_lands_exactly_on_the_forward_noising(num_steps):
    torch.manual_seed(0)
    z, eps = torch.randn(6, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([0, 1, 7, 250, 731, 999])
    out = ddim_invert(constant(eps), z, t, ALPHAS, num_steps=num_steps)
    a = ALPHAS[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * z + (1 - a).sqrt() * eps
    assert torch.equal(out[0], z[0])  # t = 0: no inversion step
    assert torch.allclose(out[1:], expected[1:], atol=1e-5)
    assert torch.allclose(inverted_noise(z, out, t, ALPHAS)[1:], eps.expand(5, -1, -1, -1), atol=1e-4)


def test_grid_ends_exactly_at_t_with_bounded_spacing():
    t = torch.tensor([0, 3, 99, 100, 101, 555, 999])
    grid = inversion_grid(t, 1000, 10)
    assert grid.shape == (11, 7)  # ceil(999 * 10 / 1000) = 10 steps
    assert torch.equal(grid[-1, 1:], t[1:]) and (grid[:, 0] == CLEAN).all()
    moved = grid[1:] != grid[:-1]
    steps = (grid[1:] - torch.where(grid[:-1] == CLEAN, 0, grid[:-1]))[moved]
    assert (steps >= 0).all() and steps.max() <= 100
    assert ((grid[1:] >= grid[:-1]) | (grid[1:] == CLEAN)).all()  # levels only climb
    moves = (grid[1:] != grid[:-1]).sum(0)
    assert moves.tolist() == [0, 1, 1, 1, 2, 6, 10]  # each sample's own ceil(t * 10 / 1000) steps
    assert inversion_grid(torch.tensor([0, 0]), 1000, 10).shape == (1, 2)


def _reference_inversion(predict, z, t, num_steps):
    """One sample at a time, levels listed by hand: clean -> the multiples of 100 below t -> t."""
    out = []
    for zi, ti in zip(z, t.tolist()):
        x = zi[None]
        if ti == 0:
            out.append(x)
            continue
        levels = [None] + [100 * j for j in range(1, 10) if 100 * j < ti] + [ti]  # num_steps = 10
        for prev, nxt in zip(levels, levels[1:]):
            if prev == nxt:
                continue
            a = torch.tensor(1.0) if prev is None else ALPHAS[prev]
            eps = predict(x, torch.tensor([nxt]))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = ALPHAS[nxt].sqrt() * x0 + (1 - ALPHAS[nxt]).sqrt() * eps
        out.append(x)
    return torch.cat(out)


def _smooth(x, t):
    return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).float().sqrt()


def test_batched_plain_inversion_matches_a_per_sample_reference():
    torch.manual_seed(1)
    z, t = torch.randn(4, 4, 8, 8), torch.tensor([5, 333, 0, 998])
    # a batch mixing grids of different lengths equals each sample inverted on its own
    got = ddim_invert(_smooth, z, t, ALPHAS, num_steps=10, renoise_iters=0)
    assert torch.allclose(got, _reference_inversion(_smooth, z, t, 10), atol=1e-5)


def test_renoise_k1_averages_two_predictions_per_step():
    torch.manual_seed(2)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 600])
    grid = inversion_grid(t, 1000, 5)
    x = z.clone()
    for j in range(1, len(grid)):  # SmPO's step written out: eps_a, x', eps_b, step with their mean
        a, b, level = alpha(grid[j - 1]), alpha(grid[j]), grid[j].clamp(min=0)
        eps_a = _smooth(x, level)
        x_guess = ddim_inverse_step(x, eps_a, a, b)
        eps_b = _smooth(x_guess, level)
        moved = (grid[j] != grid[j - 1]).view(-1, 1, 1, 1)
        x = torch.where(moved, ddim_inverse_step(x, (eps_a + eps_b) / 2, a, b), x)
    got = ddim_invert(_smooth, z, t, ALPHAS, num_steps=5, renoise_iters=1)
    assert torch.allclose(got, x, atol=1e-5)
    plain = ddim_invert(_smooth, z, t, ALPHAS, num_steps=5, renoise_iters=0)
    assert not torch.allclose(got, plain, atol=1e-3)  # the refinement does something for this model
    # a window holding only the first prediction is plain DDIM again
    assert torch.allclose(ddim_invert(_smooth, z, t, ALPHAS, 5, renoise_iters=1, renoise_window=(0, 1)), plain)
    with pytest.raises(ValueError, match="renoise_window"):
        ddim_invert(_smooth, z, t, ALPHAS, 5, renoise_iters=1, renoise_window=(1, 3))


def test_inversion_then_ddim_denoising_returns_the_latent():
    torch.manual_seed(3)
    z, t = torch.randn(3, 4, 8, 8), torch.tensor([200, 500, 900])

    def slow(x, t):  # depends weakly on x, so inversion is approximate but close
        return 0.02 * x + torch.ones_like(x)

    x = ddim_invert(slow, z, t, ALPHAS, num_steps=50)
    grid = inversion_grid(t, 1000, 50)
    for j in range(len(grid) - 1, 0, -1):  # DDIM denoising down the same levels
        b, a = alpha(grid[j]), alpha(grid[j - 1])
        eps = slow(x, grid[j].clamp(min=0))
        x0 = (x - (1 - b).sqrt() * eps) / b.sqrt()
        moved = (grid[j] != grid[j - 1]).view(-1, 1, 1, 1)
        x = torch.where(moved, a.sqrt() * x0 + (1 - a).sqrt() * eps, x)
    assert (x - z).abs().max() < 0.05
    exact = ddim_invert(constant(torch.ones(1, 4, 8, 8)), z, t, ALPHAS, num_steps=7)
    assert exact.shape == z.shape


@pytest.mark.parametrize("renoise_iters", [0, 1])
def test_cached_shared_levels_plus_one_live_step_equal_the_full_inversion(renoise_iters):
    from diffalign.training.noising import finish_inversion, invert_to_shared_levels

    torch.manual_seed(4)
    z = torch.randn(7, 4, 8, 8)
    t = torch.tensor([0, 5, 100, 101, 450, 900, 999])  # below, on and above shared levels
    shared = invert_to_shared_levels(_smooth, z, ALPHAS, num_steps=10, renoise_iters=renoise_iters)
    assert shared.shape == (7, 9, 4, 8, 8)
    got = finish_inversion(_smooth, z, shared, t, ALPHAS, num_steps=10, renoise_iters=renoise_iters)
    full = ddim_invert(_smooth, z, t, ALPHAS, num_steps=10, renoise_iters=renoise_iters)
    assert torch.equal(got[0], z[0])
    assert torch.allclose(got, full, atol=1e-5)
