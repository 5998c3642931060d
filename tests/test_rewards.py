"""Reward heads: the interface, checks, combinations, simple proxies by hand, CLIP-based heads on tiny models."""

import io
import sys
import textwrap

import pytest
import torch
from PIL import Image

from diffalign.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    load_reward,
    pareto_dominates,
    pareto_preference,
    score,
    weighted_sum,
)
from diffalign.rewards.clip import AestheticMLP, clip_preprocess
from diffalign.testing import save_tiny_clip, write_plugin_distribution


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip32")


@pytest.fixture(scope="module")
def tiny_clip768(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip768", projection_dim=768)


def _jpeg_kb(img: torch.Tensor) -> float:
    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def test_simple_proxies_against_hand_values():
    torch.manual_seed(0)
    flat, noisy = torch.full((3, 32, 32), 0.25), torch.rand(3, 32, 32)
    images = torch.stack([flat, noisy])
    assert score(load_reward("brightness"), images, ["", ""]).tolist() == pytest.approx([0.25, noisy.mean().item()])
    size = score(load_reward("jpeg_incompressibility"), images, ["", ""])
    assert size.tolist() == pytest.approx([_jpeg_kb(flat), _jpeg_kb(noisy)])
    assert size[1] > size[0]  # noise does not compress
    assert torch.equal(score(load_reward("jpeg_compressibility"), images, ["", ""]), -size)


@pytest.mark.parametrize("images, prompts, message", [
    (torch.rand(2, 3, 8, 8) * 2, ["a", "b"], r"must lie in \[0, 1\]"),
    (torch.rand(2, 8, 8), ["a", "b"], r"tensor \[B, 3, H, W\]"),
    (torch.rand(2, 3, 8, 8), ["a"], "2 images but 1 prompts"),
])
def test_bad_inputs_are_named(images, prompts, message):
    with pytest.raises(RewardError, match=f"reward 'brightness': .*{message}"):
        score(load_reward("brightness"), images, prompts)


def test_bad_user_outputs_are_named():
    def wrong_shape(images, prompts):
        return torch.zeros(len(images), 1)

    def not_finite(images, prompts):
        return torch.tensor([float("nan")] * len(images))

    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(RewardError, match=r"reward 'wrong_shape' returned \(2, 1\); expected a tensor of shape \(2,\)"):
        score(wrong_shape, x, ["a", "b"])
    with pytest.raises(RewardError, match="reward 'not_finite' returned non-finite"):
        score(not_finite, x, ["a", "b"])


def test_user_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        import torch

        def redness(images, prompts):
            return images[:, 0].mean(dim=(1, 2))

        class Scaled:
            name, differentiable, higher_is_better = "scaled", True, True
            def __init__(self, factor=1.0):
                self.factor = factor
            def __call__(self, images, prompts):
                return self.factor * images.mean(dim=(1, 2, 3))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1.0
    assert score(load_reward("my_rewards:redness"), x, ["", ""]).tolist() == [1.0, 0.0]
    scaled = load_reward("my_rewards:Scaled", factor=3.0)
    assert scaled.name == "scaled" and score(scaled, x, ["", ""]).tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(RewardError, match="takes no keyword arguments"):
        load_reward("my_rewards:redness", factor=2)
    with pytest.raises(KeyError, match="unknown reward 'pickscor'.*brightness.*clip"):
        load_reward("pickscor")
    with pytest.raises(KeyError, match="cannot be imported"):
        load_reward("no_such_module_xyz:fn")
    sys.modules.pop("my_rewards", None)


def test_weighted_sum_and_pareto():
    x = torch.stack([torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 0.6)])
    b, jc = load_reward("brightness"), load_reward("jpeg_compressibility")
    total = weighted_sum([b, jc], [2.0, 0.5], x, ["", ""])
    assert total.tolist() == pytest.approx((2 * score(b, x, ["", ""]) + 0.5 * score(jc, x, ["", ""])).tolist())
    assert pareto_dominates(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
    assert not pareto_dominates(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))  # equal: no one dominates
    assert pareto_preference(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])) == 0  # a trade-off is a tie
    assert pareto_preference(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])) == -1


def test_clip_preprocess_is_tensor_only_and_differentiable():
    x = torch.rand(2, 3, 40, 60, requires_grad=True)
    out = clip_preprocess(x, 32)
    assert out.shape == (2, 3, 32, 32)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_score_on_a_tiny_clip(tiny_clip):
    head = load_reward("clip", model=str(tiny_clip))
    torch.manual_seed(0)
    x = torch.rand(3, 3, 48, 64)
    prompts = ["a red square", "a blue circle", "a dog"]
    s = score(head, x, prompts)
    assert s.shape == (3,) and (s >= 0).all()
    sim = head.similarity(x, prompts)
    assert torch.allclose(s, sim.clamp(min=0))
    one_by_one = torch.cat([head.similarity(x[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    assert torch.allclose(sim, one_by_one, atol=1e-4)  # batch consistency
    assert not torch.allclose(head.similarity(x[:1], ["a red square"]), head.similarity(x[:1], ["a cat on a sofa"]))
    xg = x.clone().requires_grad_(True)
    head.similarity(xg, prompts).sum().backward()
    assert xg.grad.abs().sum() > 0  # differentiable w.r.t. the images


def test_clip_offline_and_missing_says_what_to_download(tmp_path):
    with pytest.raises(RewardError, match=r"reward 'clip': cannot load CLIP weights from .*huggingface-cli download"):
        load_reward("clip", model=str(tmp_path / "nowhere"))


def test_aesthetic_published_layout_loads_strictly(tmp_path, tiny_clip768):
    torch.manual_seed(0)
    published = {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                 "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                 "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    state = {k: torch.randn(shape) * 0.05 for k, shape in published.items()}
    AestheticMLP().load_state_dict(state, strict=True)
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, pth)
    head = load_reward("aesthetic", weights=str(pth), clip=str(tiny_clip768))
    x = torch.rand(3, 3, 64, 64)
    s = score(head, x, ["", "", ""])
    assert s.shape == (3,)
    assert torch.allclose(s, torch.cat([head(x[i : i + 1], [""]) for i in range(3)]), atol=1e-5)
    assert torch.equal(head(x, ["a", "b", "c"]), head(x, ["", "", ""]))  # prompts are ignored
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, bad)
    with pytest.raises(RewardError, match="not an improved-aesthetic MLP checkpoint"):
        load_reward("aesthetic", weights=str(bad), clip=str(tiny_clip768))


def test_builtin_names_resolve():
    assert {"clip", "aesthetic", "pickscore", "brightness", "jpeg_compressibility", "jpeg_incompressibility"} <= set(BUILTIN_REWARDS)


def test_pickscore_is_scaled_cosine(tiny_clip):
    head = load_reward("pickscore", model=str(tiny_clip), tokenizer=str(tiny_clip))
    clip = load_reward("clip", model=str(tiny_clip))
    x, prompts = torch.rand(2, 3, 32, 32), ["a red square", "a dog"]
    expected = head.model.logit_scale.exp() * clip.similarity(x, prompts) / 100
    assert torch.allclose(score(head, x, prompts), expected, atol=1e-5)
    probs = torch.softmax(head(x, [prompts[0]] * 2), dim=0)  # one prompt, two candidates
    assert probs.sum().item() == pytest.approx(1.0)


def test_reward_from_an_installed_entry_point(tmp_path, monkeypatch):
    write_plugin_distribution(tmp_path, "shiny_rewards", "def shininess(images, prompts):\n"
                              "    return images.amax(dim=(1, 2, 3))\n", {"shiny": "shiny_rewards:shininess"})
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.zeros(2, 3, 4, 4)
    x[1, 2, 0, 0] = 0.5
    head = load_reward("shiny")
    assert head.name == "shiny" and score(head, x, ["", ""]).tolist() == [0.0, 0.5]
    sys.modules.pop("shiny_rewards", None)


def test_weighted_sum_keeps_the_gradient_of_differentiable_heads():
    x = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    total = weighted_sum([lambda images, prompts: images.mean(dim=(1, 2, 3))], [2.0], x, ["", ""])
    total.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0 / (3 * 8 * 8)))
