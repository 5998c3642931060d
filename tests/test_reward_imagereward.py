"""ImageReward head: a tiny random network of the real classes, checked against timm's ViT and transformers'
BLIP text encoder; strict loading of the published key layout (real size on the meta device); clear errors."""

from dataclasses import replace

import pytest
import torch

from diffalign.rewards import RewardError, load_reward, score
from diffalign.rewards.clip import clip_preprocess
from diffalign.rewards.imagereward import (
    POSITION_IDS,
    REWARD_MEAN,
    REWARD_STD,
    ImageReward,
    ImageRewardConfig,
    imagereward_model,
    load_imagereward_state,
)

WORDS = ["a", "an", "the", "photo", "painting", "of", "cat", "dog", "red", "blue", "car", "on", "beach", "at",
         "night"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY = ImageRewardConfig(image_size=32, patch_size=8, vision_width=48, vision_depth=2, vision_heads=4,
                         vocab_size=len(SPECIALS) + len(WORDS) + 2, hidden_size=32, text_layers=2,
                         text_heads=4, intermediate_size=64, max_positions=40, proj_dim=16, max_length=12)
PROMPTS = ["a photo of a cat", "a red car on the beach at night", "the painting of a blue dog"]

# Published key/shape facts, read from THUDM/ImageReward (ImageReward.py: blip = BLIP_Pretrain(image_size=224,
# vit='large'), mlp = MLP(768); blip_pretrain.py: vision_proj/text_proj with embed_dim 256; blip.py
# create_vit: width 1024, depth 24, heads 16, patch 16) and BLIP's vit.py / med.py (vocab 30524,
# cross-attention key/value from encoder_width = vision width; a saved position_ids buffer; no token types).
PUBLISHED = {
    "blip.visual_encoder.cls_token": (1, 1, 1024),
    "blip.visual_encoder.pos_embed": (1, 197, 1024),
    "blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
    "blip.visual_encoder.blocks.23.attn.qkv.weight": (3072, 1024),
    "blip.visual_encoder.blocks.23.mlp.fc1.weight": (4096, 1024),
    "blip.visual_encoder.norm.bias": (1024,),
    "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
    "blip.text_encoder.embeddings.position_embeddings.weight": (512, 768),
    "blip.text_encoder.embeddings.position_ids": (1, 512),
    "blip.text_encoder.encoder.layer.11.attention.self.query.weight": (768, 768),
    "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight": (768, 1024),
    "blip.text_encoder.encoder.layer.0.crossattention.self.value.weight": (768, 1024),
    "blip.text_encoder.encoder.layer.11.crossattention.output.LayerNorm.weight": (768,),
    "blip.text_encoder.encoder.layer.11.intermediate.dense.weight": (3072, 768),
    "blip.text_encoder.encoder.layer.11.output.dense.weight": (768, 3072),
    "blip.vision_proj.weight": (256, 1024),
    "blip.text_proj.weight": (256, 768),
    "mlp.layers.0.weight": (1024, 768),
    "mlp.layers.6.weight": (16, 64),
    "mlp.layers.7.weight": (1, 16),
    "mlp.layers.7.bias": (1,),
}
NOT_PUBLISHED = ["blip.text_encoder.embeddings.token_type_embeddings.weight",
                 "blip.text_encoder.pooler.dense.weight", "blip.visual_encoder.head.weight",
                 "mlp.layers.1.weight"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_tok")
    (path / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    return path


@pytest.fixture(scope="module")
def head(tok_dir):
    torch.manual_seed(0)
    return ImageReward.from_model(imagereward_model(TINY), str(tok_dir))


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 40, 48)  # not square, not 32: exercises resize + centre crop


def published_state(model) -> dict:
    """``model``'s weights under the published names (they are the same) + med.py's saved position buffer."""
    n = model.config.max_positions
    return {**model.state_dict(), POSITION_IDS: torch.arange(n).expand(1, -1).clone()}


def test_tokenizer_matches_blip(head):
    ids = head.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"])
    assert ids == [TINY.vocab_size - 2, TINY.vocab_size - 1]  # as 30522 / 30523 after bert-base-uncased
    assert head.tokenizer.bos_token == "[DEC]" and head.tokenizer.enc_token_id == ids[1]


def test_shape_finite_and_batch_consistent(head, images):
    out = score(head, images, PROMPTS)
    assert out.shape == (3,) and torch.isfinite(out).all()
    one_by_one = torch.cat([head(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(one_by_one, out, atol=1e-5, rtol=0)


def test_prompt_and_image_sensitivity(head, images):
    same_image = images[:1].expand(3, -1, -1, -1)
    by_prompt = head(same_image, PROMPTS)
    assert (by_prompt[1:] - by_prompt[0]).abs().min() > 1e-4
    by_image = head(images, [PROMPTS[0]] * 3)
    assert (by_image[1:] - by_image[0]).abs().min() > 1e-4


def test_gradient_flows_to_images(head, images):
    x = images.clone().requires_grad_(True)
    head(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in head.model.parameters())


def test_matches_timm_vit_and_transformers_blip_text(head, images):
    """Same weights through independent implementations of both towers: names load strictly, outputs agree."""
    timm = pytest.importorskip("timm")
    from transformers.models.blip.modeling_blip_text import BlipTextConfig, BlipTextModel

    model, c = head.model, TINY
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.vision_width, depth=c.vision_depth,
        num_heads=c.vision_heads, qkv_bias=True, num_classes=0, global_pool="").eval()
    vit.load_state_dict(model.blip.visual_encoder.state_dict(), strict=True)
    text = BlipTextModel(BlipTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, encoder_hidden_size=c.vision_width,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.text_layers,
        num_attention_heads=c.text_heads, max_position_embeddings=c.max_positions, layer_norm_eps=1e-12,
        hidden_act="gelu", bos_token_id=None, sep_token_id=None), add_pooling_layer=False).eval()
    text.load_state_dict(model.blip.text_encoder.state_dict(), strict=True)

    pixels = clip_preprocess(images, c.image_size)
    tokens = head.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=c.max_length,
                            return_tensors="pt")
    with torch.no_grad():
        ours_img = model.blip.visual_encoder(pixels)
        torch.testing.assert_close(ours_img, vit.forward_features(pixels), atol=1e-5, rtol=1e-5)
        ref = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                   encoder_hidden_states=ours_img,
                   encoder_attention_mask=torch.ones(ours_img.shape[:2])).last_hidden_state
        ours = model.blip.text_encoder(tokens["input_ids"], tokens["attention_mask"], ours_img)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        expected = ((model.mlp(ref[:, 0]) - REWARD_MEAN) / REWARD_STD).squeeze(-1)
    torch.testing.assert_close(head(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_enc_first_token_option(tok_dir, images):
    """Off by default (ImageReward's scorer keeps [CLS]); BLIP's ITM convention when asked for."""
    torch.manual_seed(0)
    model = imagereward_model(TINY)
    cls_head = ImageReward.from_model(model, str(tok_dir))
    enc_head = ImageReward.from_model(imagereward_model(replace(TINY, enc_first_token=True)), str(tok_dir))
    enc_head.model.load_state_dict(model.state_dict())
    assert not torch.allclose(cls_head(images, PROMPTS), enc_head(images, PROMPTS))


def test_published_checkpoint_loads_strictly_through_constructor(head, images, tok_dir, tmp_path):
    path = tmp_path / "ImageReward.pt"
    torch.save(published_state(head.model), path)
    expected = head(images, PROMPTS)
    for weights in (str(path), tmp_path):  # the file, or a folder holding ImageReward.pt
        loaded = ImageReward(weights=weights, tokenizer=str(tok_dir), config=TINY)
        assert torch.equal(loaded(images, PROMPTS), expected)
        assert all(not p.is_meta and p.dtype == torch.float32 for p in loaded.model.parameters())
    plugin = load_reward("diffalign.rewards.imagereward:ImageReward", weights=str(path),
                         tokenizer=str(tok_dir), config=TINY)
    assert torch.equal(plugin(images, PROMPTS), expected)


def test_real_size_published_layout_loads_strictly():
    with torch.device("meta"):
        model = imagereward_model()
    state = published_state(model)
    for key, shape in PUBLISHED.items():
        assert tuple(state[key].shape) == shape, key
    assert not set(NOT_PUBLISHED) & set(state)
    # ViT: 24 blocks x 12 tensors + 6; BERT: embeddings 4 + 12 layers x 26; position_ids; 2 projections;
    # 5 MLP linears
    assert len(state) == (24 * 12 + 6) + (4 + 12 * 26) + 1 + 4 + 10
    # fp32 bytes ~ the published ImageReward.pt (1,786,880,927 bytes, including the zip/pickle framing)
    assert 446_000_000 < sum(v.numel() for k, v in state.items() if k != POSITION_IDS) < 446_720_000
    with torch.device("meta"):
        fresh = imagereward_model()
    meta_state = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
    load_imagereward_state(fresh, meta_state, assign=True)
    assert all(v.shape == meta_state[k].shape for k, v in fresh.state_dict().items())


def test_missing_or_unreadable_weights(tmp_path, tok_dir, monkeypatch):
    import huggingface_hub

    with pytest.raises(RewardError, match=r"'imagereward'.*does not exist.*huggingface-cli download "
                                          r"THUDM/ImageReward ImageReward.pt"):
        ImageReward(weights=str(tmp_path / "nope.pt"), tokenizer=str(tok_dir), config=TINY)

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RewardError, match=r"repo 'THUDM/ImageReward' \(OSError\).*huggingface-cli download"):
        ImageReward(weights="THUDM/ImageReward", tokenizer=str(tok_dir), config=TINY)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RewardError, match=r"cannot read .*junk.pt.* as a state dict"):
        ImageReward(weights=str(junk), tokenizer=str(tok_dir), config=TINY)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(RewardError, match=r"holds a list, not a state dict"):
        ImageReward(weights=str(listed), tokenizer=str(tok_dir), config=TINY)


def test_wrong_checkpoint_is_named(head, tmp_path, tok_dir):
    def build(state):
        path = tmp_path / "bad.pt"
        torch.save(state, path)
        ImageReward(weights=str(path), tokenizer=str(tok_dir), config=TINY)

    state = published_state(head.model)
    del state["mlp.layers.7.weight"]
    state["blip.itm_head.weight"] = torch.zeros(2, TINY.hidden_size)
    state["blip.vision_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(RewardError, match=r"missing keys \(1\): mlp.layers.7.weight; unexpected keys \(1\): "
                                          r"blip.itm_head.weight; wrong shapes \(1\): "
                                          r"blip.vision_proj.weight"):
        build(state)
    zeros = torch.zeros(1, TINY.max_positions, dtype=torch.long)
    bad_pos = {**published_state(head.model), POSITION_IDS: zeros}
    with pytest.raises(RewardError, match="position_ids is not arange"):
        build(bad_pos)
    ddp = {"module." + k: v for k, v in published_state(head.model).items()}
    build(ddp)  # a DDP save loads


def test_tokenizer_that_does_not_fit_is_named(tok_dir):
    with pytest.raises(RewardError, match=r"tokenizer .* gave \d+ tokens, expected 99 .*bert-base-uncased"):
        ImageReward.from_model(imagereward_model(replace(TINY, vocab_size=99)), str(tok_dir))
