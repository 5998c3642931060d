"""HPSv2 head on a tiny open_clip model, and the published key layouts of the CLIP-based heads at real size,
built on the meta device (no weights, no download): open_clip ViT-H-14 (HPSv2), transformers CLIPModel at the
configs of openai/clip-vit-large-patch14 (CLIPScore, aesthetic) and yuvalkirstain/PickScore_v1, and the LAION
aesthetic MLP."""

import json

import pytest
import torch

from diffalign.rewards import RewardError, load_reward, score
from diffalign.rewards.clip import AestheticMLP, clip_preprocess
from diffalign.rewards.hps import VERSIONS, HPSv2, build_open_clip, hps_preprocess, load_hps_state

TINY = "diffalign-hps-tiny"
PROMPTS = ["a photo of a cat", "a red car on the beach at night", "the painting of a blue dog"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny open_clip config registered as ``TINY`` and its random weights in HPSv2's published format."""
    import open_clip

    root = tmp_path_factory.mktemp("hps")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (root / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY}.json")
    torch.manual_seed(0)
    source = build_open_clip(TINY)
    path = root / "HPS_tiny_compressed.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    return path, source


@pytest.fixture(scope="module")
def head(tiny_ckpt):
    return HPSv2(weights=str(tiny_ckpt[0]), model_name=TINY)


@pytest.fixture
def images():
    return torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))


def test_shape_range_and_batch_consistency(head, images):
    out = score(head, images, PROMPTS)
    assert out.shape == (3,) and torch.isfinite(out).all() and (out.abs() <= 1 + 1e-6).all()
    single = torch.cat([head(images[i : i + 1], [p]) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(single, out, atol=1e-5, rtol=0)
    assert head.name == "hps" and head.differentiable and head.higher_is_better and head.image_size == 32


def test_prompt_sensitivity_and_gradients(head, images):
    same = images[:1].expand(3, -1, -1, -1)
    assert head(same, PROMPTS).unique().numel() == 3
    x = images.clone().requires_grad_(True)
    head(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_published_format_gives_hpsv2_formula(tiny_ckpt, head, images, tmp_path):
    path, source = tiny_ckpt
    tokens = head.tokenizer(PROMPTS)
    assert tokens.shape == (3, 77)
    with torch.no_grad():  # hpsv2/img_score.py: diagonal(image_features @ text_features.T), open_clip forward
        image_features, text_features, _ = source(hps_preprocess(images, 32), tokens)  # normalised features
        ref = torch.diagonal(image_features @ text_features.T)
        torch.testing.assert_close(head(images, PROMPTS), ref, atol=1e-6, rtol=0)
        ddp = tmp_path / "ddp.pt"  # a DDP training checkpoint: "module." prefixes are stripped
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, ddp)
        via_registry = load_reward("diffalign.rewards.hps:HPSv2", weights=str(ddp), model_name=TINY)
        torch.testing.assert_close(via_registry(images, PROMPTS), ref, atol=1e-6, rtol=0)
    assert all(not p.requires_grad for p in head.model.parameters())


def test_preprocess_square_is_clip_and_non_square_is_padded():
    x = torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(hps_preprocess(x, 32), clip_preprocess(x, 32))
    wide = hps_preprocess(torch.rand(1, 3, 20, 40), 32)  # longest side -> 32, 16 rows, 8 black rows each side
    assert wide.shape == (1, 3, 32, 32)
    black = clip_preprocess(torch.zeros(1, 3, 32, 32), 32)
    torch.testing.assert_close(wide[..., :8, :], black[..., :8, :])
    torch.testing.assert_close(wide[..., 24:, :], black[..., 24:, :])
    assert not torch.allclose(wide[..., 8:24, :], black[..., 8:24, :])


def test_errors(tiny_ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    with pytest.raises(RewardError, match=r"'hps'.*does not exist.*huggingface-cli download xswu/HPSv2 HPS_v2.1"):
        HPSv2(weights=str(tmp_path / "missing.pt"), model_name=TINY)
    with pytest.raises(RewardError, match=r"unknown HPS version 'v3'.*v2\.0, v2\.1"):
        HPSv2(version="v3", model_name=TINY)

    def offline(repo, filename, **_):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RewardError, match=r"cannot get HPS_v2\.1_compressed\.pt.*huggingface-cli download "
                                          r"xswu/HPSv2 HPS_v2\.1_compressed\.pt.*local path"):
        HPSv2(model_name=TINY)
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, f, **_: asked.append((repo, f)) or
                        str(tiny_ckpt[0]))
    HPSv2(version="v2.0", model_name=TINY)
    assert asked == [("xswu/HPSv2", "HPS_v2_compressed.pt")] and VERSIONS["v2.1"] == "HPS_v2.1_compressed.pt"

    state = dict(tiny_ckpt[1].state_dict())
    del state["logit_scale"]
    torch.save({"state_dict": state}, tmp_path / "wrong.pt")
    with pytest.raises(RewardError, match=r"not an HPSv2 checkpoint.*Missing key.*logit_scale"):
        HPSv2(weights=str(tmp_path / "wrong.pt"), model_name=TINY)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RewardError, match="cannot read"):
        HPSv2(weights=str(tmp_path / "junk.pt"), model_name=TINY)


# ---- published layouts at real size, on the meta device -------------------------------------------------------

# open_clip ViT-H-14 (model_configs/ViT-H-14.json: width 1280, 32 layers, head_width 80, patch 14; text width
# 1024, 16 heads, 24 layers; embed_dim 1024), the architecture of laion/CLIP-ViT-H-14-laion2B-s32B-b79K and HPSv2.
OPEN_CLIP_H14 = {
    "visual.conv1.weight": (1280, 3, 14, 14),
    "visual.class_embedding": (1280,),
    "visual.positional_embedding": (257, 1280),
    "visual.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "visual.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "visual.ln_post.weight": (1280,),
    "visual.proj": (1280, 1024),
    "token_embedding.weight": (49408, 1024),
    "positional_embedding": (77, 1024),
    "transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
    "transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
    "ln_final.weight": (1024,),
    "text_projection": (1024, 1024),
    "logit_scale": (),
}
OPENAI_L14 = dict(  # openai/clip-vit-large-patch14 config.json
    text_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       patch_size=14, image_size=224, hidden_act="quick_gelu"),
    projection_dim=768)
PICKSCORE_H14 = dict(  # yuvalkirstain/PickScore_v1 config.json (CLIP ViT-H-14)
    text_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    projection_dim=1024)


def _hf_facts(v: int, t: int, proj: int, v_layers: int, t_layers: int, v_mlp: int, t_mlp: int) -> dict:
    return {"vision_model.embeddings.patch_embedding.weight": (v, 3, 14, 14),
            "vision_model.embeddings.class_embedding": (v,),
            "vision_model.embeddings.position_embedding.weight": (257, v),
            f"vision_model.encoder.layers.{v_layers - 1}.mlp.fc1.weight": (v_mlp, v),
            f"vision_model.encoder.layers.{v_layers - 1}.self_attn.q_proj.weight": (v, v),
            "vision_model.post_layernorm.weight": (v,),
            "text_model.embeddings.token_embedding.weight": (49408, t),
            "text_model.embeddings.position_embedding.weight": (77, t),
            f"text_model.encoder.layers.{t_layers - 1}.mlp.fc1.weight": (t_mlp, t),
            "text_model.final_layer_norm.weight": (t,),
            "visual_projection.weight": (proj, v), "text_projection.weight": (proj, t), "logit_scale": ()}


def _check_layout(model: torch.nn.Module, facts: dict) -> dict:
    state = model.state_dict()
    assert all(v.is_meta for v in state.values())
    assert {k: tuple(state[k].shape) for k in facts if k in state} == facts
    return state


def test_open_clip_vit_h14_layout_for_hps():
    with torch.device("meta"):
        model = build_open_clip("ViT-H-14", device="meta")
        fresh = build_open_clip("ViT-H-14", device="meta")
    state = _check_layout(model, OPEN_CLIP_H14)
    assert len(state) == 686 and sum(p.numel() for p in model.parameters()) == 986_109_441  # ~986M
    published = {k: torch.empty(OPEN_CLIP_H14.get(k, v.shape), device="meta") for k, v in state.items()}
    load_hps_state(fresh, published, assign=True)
    load_hps_state(fresh, {f"module.{k}": v for k, v in published.items()}, assign=True)
    published["visual.proj"] = torch.empty(1280, 768, device="meta")
    with pytest.raises(RewardError, match=r"size mismatch for visual\.proj"):
        load_hps_state(fresh, published, assign=True)


@pytest.mark.parametrize("config, facts, params", [
    (OPENAI_L14, _hf_facts(1024, 768, 768, 24, 12, 4096, 3072), 427_616_513),  # ~428M
    (PICKSCORE_H14, _hf_facts(1280, 1024, 1024, 32, 24, 5120, 4096), 986_109_441),  # = open_clip ViT-H-14
], ids=["clip-vit-large-patch14", "PickScore_v1"])
def test_transformers_clip_layouts(config, facts, params):
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        model, fresh = CLIPModel(CLIPConfig(**config)), CLIPModel(CLIPConfig(**config))
    state = _check_layout(model, facts)
    assert "visual_projection.bias" not in state and "text_projection.bias" not in state
    assert sum(p.numel() for p in model.parameters()) == params
    fresh.load_state_dict({k: torch.empty(v.shape, device="meta") for k, v in state.items()}, strict=True,
                          assign=True)


def test_aesthetic_mlp_layout():
    shapes = {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
              "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
              "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    with torch.device("meta"):
        mlp = AestheticMLP(OPENAI_L14["projection_dim"])
    state = mlp.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    mlp.load_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()}, strict=True, assign=True)
