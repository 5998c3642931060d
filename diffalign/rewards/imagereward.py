"""ImageReward (Xu et al. 2023, THUDM/ImageReward) rebuilt without the ``image-reward`` package.

The released ``ImageReward.pt`` is a plain state dict of ImageReward's ``ImageReward`` module: a BLIP ViT-L/16
image encoder (``blip.visual_encoder``), BLIP's ``med.py`` BERT-base text encoder with cross-attention to the
image tokens in every layer (``blip.text_encoder``), two unused retrieval projections
(``blip.vision_proj``, ``blip.text_proj``) and the reward MLP (``mlp.layers``). The modules below reproduce
that key layout, so loading is ``strict=True`` with one documented exception
(see :func:`load_imagereward_state`).

Score: the text encoder's hidden state at the first position ([CLS]), after cross-attending to the image, goes
through the MLP and is standardised with the published mean/std. Preprocessing uses tensor ops (bicubic resize
with antialias, centre crop, CLIP mean/std), so the head is differentiable with respect to the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RewardError
from .clip import AestheticMLP, clip_preprocess, load_state_dict_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUB_REPO, HUB_FILE = "THUDM/ImageReward", "ImageReward.pt"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: ImageReward.mean / .std
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"  # a saved buffer of med.py, not a weight
DOWNLOAD_HINT = f"`huggingface-cli download {HUB_REPO} {HUB_FILE}`"


@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of the network; the defaults are the released model (BLIP ViT-L/16 at 224 px + BERT-base)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    vocab_size: int = 30524  # bert-base-uncased (30522) + [DEC] + [ENC]
    hidden_size: int = 768
    text_layers: int = 12
    text_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    proj_dim: int = 256  # BLIP's contrastive projections: in the checkpoint, unused by the score
    max_length: int = 35  # prompt tokens, as ImageReward.score tokenizes
    # BLIP's ITM head swaps [CLS] for [ENC]; ImageReward's released scorer (score, inference_rank, score_gard)
    # and its training data keep [CLS], so the faithful default is False.
    enc_first_token: bool = False


def _heads(x: Tensor, n: int) -> Tensor:
    """[B, L, n*d] -> [B, n, L, d] for scaled_dot_product_attention."""
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


class _ViTBlock(nn.Module):
    """Pre-norm timm/BLIP ViT block; child names follow BLIP's vit.py (norm1, attn.qkv, mlp.fc1, ...)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = _heads(self.attn["qkv"](self.norm1(x)), 3 * self.heads).chunk(3, dim=1)
        x = x + self.attn["proj"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(x))))


class VisionEncoder(nn.Module):
    """BLIP's VisionTransformer (no head): all tokens, [CLS] first, after the final LayerNorm."""

    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        n = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Module()  # timm's PatchEmbed holds the conv as .proj
        self.patch_embed.proj = nn.Conv2d(3, c.vision_width, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, c.vision_width))
        self.blocks = nn.ModuleList(_ViTBlock(c.vision_width, c.vision_heads) for _ in range(c.vision_depth))
        self.norm = nn.LayerNorm(c.vision_width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # so a random (test) model is not degenerate
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _BertAttention(nn.Module):
    """Post-norm BERT attention (self or cross) with med.py's names: self.{query,key,value}, output.*."""

    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.self = nn.ModuleDict({"query": nn.Linear(hidden, hidden), "key": nn.Linear(kv_width, hidden),
                                   "value": nn.Linear(kv_width, hidden)})
        self.output = nn.ModuleDict({"dense": nn.Linear(hidden, hidden),
                                     "LayerNorm": nn.LayerNorm(hidden, eps=1e-12)})

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        q = _heads(self.self["query"](x), self.heads)
        k, v = _heads(self.self["key"](context), self.heads), _heads(self.self["value"](context), self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        return self.output["LayerNorm"](x + self.output["dense"](out))


class _BertLayer(nn.Module):
    """Self-attention, cross-attention to the image tokens, feed-forward (med.py's multimodal BertLayer)."""

    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.attention = _BertAttention(c.hidden_size, c.text_heads, c.hidden_size)
        self.crossattention = _BertAttention(c.hidden_size, c.text_heads, c.vision_width)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(c.hidden_size, c.intermediate_size)})
        self.output = nn.ModuleDict({"dense": nn.Linear(c.intermediate_size, c.hidden_size),
                                     "LayerNorm": nn.LayerNorm(c.hidden_size, eps=1e-12)})

    def forward(self, x: Tensor, mask: Tensor, image: Tensor) -> Tensor:
        x = self.crossattention(self.attention(x, x, mask), image)  # image mask is all ones: no mask
        h = self.output["dense"](F.gelu(self.intermediate["dense"](x)))
        return self.output["LayerNorm"](x + h)


class TextEncoder(nn.Module):
    """BLIP's med.py ``BertModel(add_pooling_layer=False)``: word + absolute position embeddings (no token
    types), ``config.text_layers`` cross-attending layers; returns the last hidden state."""

    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.embeddings.position_embeddings = nn.Embedding(c.max_positions, c.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(c.hidden_size, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_BertLayer(c) for _ in range(c.text_layers))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image: Tensor) -> Tensor:
        e = self.embeddings
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = e.LayerNorm(e.word_embeddings(input_ids) + e.position_embeddings(pos))
        mask = attention_mask[:, None, None, :].bool()  # padded keys are ignored (med.py adds -10000)
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


class ImageRewardModel(nn.Module):
    """The whole network; ``forward(pixels, input_ids, attention_mask)`` -> standardised reward [B]."""

    def __init__(self, config: ImageRewardConfig | None = None):
        super().__init__()
        c = self.config = config or ImageRewardConfig()
        self.blip = nn.Module()
        self.blip.visual_encoder, self.blip.text_encoder = VisionEncoder(c), TextEncoder(c)
        self.blip.vision_proj = nn.Linear(c.vision_width, c.proj_dim)
        self.blip.text_proj = nn.Linear(c.hidden_size, c.proj_dim)
        self.mlp = AestheticMLP(c.hidden_size)  # the same 5-linear stack and key names as ImageReward's MLP

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image)
        return ((self.mlp(text[:, 0].float()) - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def imagereward_model(config: ImageRewardConfig | None = None) -> ImageRewardModel:
    """A randomly initialised ImageReward network (build under ``torch.device("meta")`` to skip the cost)."""
    return ImageRewardModel(config)


def load_imagereward_state(model: ImageRewardModel, state: dict[str, Tensor], assign: bool = False) -> None:
    """Load a state dict with the published key names into ``model``, ``strict=True``.

    The one key dropped on purpose is ``blip.text_encoder.embeddings.position_ids``: med.py saves its
    ``arange(512)`` position buffer with the weights; this encoder computes the positions instead. It is
    checked to be that arange, so nothing with a meaning is thrown away. A ``module.`` prefix (a DDP save) is
    stripped. Missing, unexpected and wrongly shaped keys raise a :class:`RewardError` naming them.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    pos = state.pop(POSITION_IDS, None)
    if isinstance(pos, Tensor) and not pos.is_meta:
        if not torch.equal(pos.flatten().cpu(), torch.arange(pos.numel())):
            raise RewardError(f"reward 'imagereward': {POSITION_IDS} is not arange(n); "
                              "not an ImageReward checkpoint")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(v.shape)} != {expected[k]}" for k, v in state.items()
              if k in expected and isinstance(v, Tensor) and tuple(v.shape) != expected[k]]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes", shapes)) if keys]
    if problems:
        raise RewardError("reward 'imagereward': the checkpoint does not match the ImageReward network: "
                          + "; ".join(problems) + f" (expected {HUB_FILE} from {DOWNLOAD_HINT})")
    model.load_state_dict(state, strict=True, assign=assign)


def resolve_weights(weights: str | Path) -> Path:
    """A local ``ImageReward.pt`` (or a folder holding one), else a hub repo id (``hf_hub_download``)."""
    path = Path(weights).expanduser()
    if path.is_dir() and (path / HUB_FILE).is_file():
        return path / HUB_FILE
    if path.is_file():
        return path
    name = str(weights)
    if path.suffix or path.exists() or name.count("/") != 1:  # meant as a local file: do not ask the hub
        raise RewardError(f"reward 'imagereward': weights file {name!r} does not exist; download it with "
                          f"{DOWNLOAD_HINT} and pass its path")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, HUB_FILE))
    except Exception as e:  # offline, not cached, no such repo: all mean the same to the user
        raise RewardError(f"reward 'imagereward': cannot get {HUB_FILE} from the hub repo {name!r} "
                          f"({type(e).__name__}); download it first with {DOWNLOAD_HINT}") from None


def load_tokenizer(tokenizer: str | Path | PreTrainedTokenizerBase, vocab_size: int,
                   ) -> PreTrainedTokenizerBase:
    """BLIP's tokenizer: BERT's (a folder, hub id or tokenizer) with ``[DEC]`` as bos and ``[ENC]`` added,
    checked against the text encoder's vocabulary size."""
    from transformers import BertTokenizer

    source = tokenizer
    if isinstance(tokenizer, (str, Path)):
        try:
            tokenizer = BertTokenizer.from_pretrained(str(tokenizer))
        except OSError as e:
            tokenizer = e
    if not isinstance(tokenizer, Exception):
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    # offline, transformers can return a near-empty tokenizer instead of failing: check the size
    if isinstance(tokenizer, Exception) or len(tokenizer) != vocab_size:
        got = type(tokenizer).__name__ if isinstance(tokenizer, Exception) else f"{len(tokenizer)} tokens"
        raise RewardError(f"reward 'imagereward': tokenizer {str(source)!r} gave {got}, expected "
                          f"{vocab_size} (bert-base-uncased + [DEC] + [ENC]); download it first "
                          f"(`huggingface-cli download bert-base-uncased`) or pass a local folder")
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


class ImageReward:
    """ImageReward v1.0: a human-preference score for a (prompt, image) pair, standardised with the published
    mean/std (roughly zero-mean, unit-variance). ``weights``: a path to ``ImageReward.pt``, a folder holding
    it, or a hub repo id (the default; read from the local cache when offline). ``config`` changes the sizes
    (for tests)."""

    name, differentiable, higher_is_better = "imagereward", True, True

    def __init__(self, weights: str | Path = HUB_REPO,
                 tokenizer: str | Path | PreTrainedTokenizerBase = "bert-base-uncased",
                 device: str | torch.device | None = None, config: ImageRewardConfig | None = None):
        config = config or ImageRewardConfig()
        tokenizer = load_tokenizer(tokenizer, config.vocab_size)  # first: it is small and fails fast
        path = resolve_weights(weights)
        try:
            state = load_state_dict_file(path)
        except Exception as e:  # truncated download, not a torch file, pickled objects weights_only refuses
            raise RewardError(f"reward 'imagereward': cannot read {str(path)!r} as a state dict "
                              f"({type(e).__name__}); expected {HUB_FILE} from {DOWNLOAD_HINT}") from None
        if not isinstance(state, dict):
            raise RewardError(f"reward 'imagereward': {str(path)!r} holds a {type(state).__name__}, "
                              f"not a state dict; expected {HUB_FILE} from {DOWNLOAD_HINT}")
        with torch.device("meta"):  # no random init of ~447M parameters that are overwritten at once
            model = imagereward_model(config)
        load_imagereward_state(model, state, assign=True)
        self._setup(model.float(), tokenizer, device)

    @classmethod
    def from_model(cls, model: ImageRewardModel, tokenizer: str | Path | PreTrainedTokenizerBase,
                   device: str | torch.device | None = None) -> ImageReward:
        """A head around an already built network (fine-tuned weights, tests) and a tokenizer (or source)."""
        self = cls.__new__(cls)
        self._setup(model, load_tokenizer(tokenizer, model.config.vocab_size), device)
        return self

    def _setup(self, model: ImageRewardModel, tokenizer: PreTrainedTokenizerBase, device) -> None:
        self.model = model.requires_grad_(False).eval().to(device or "cpu")
        self.config, self.tokenizer = model.config, tokenizer

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        dev = next(self.model.parameters()).device
        pixels = clip_preprocess(images.to(dev), self.config.image_size)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.config.max_length, return_tensors="pt")
        ids = tokens["input_ids"].to(dev)
        if self.config.enc_first_token:
            ids[:, 0] = self.tokenizer.enc_token_id
        return self.model(pixels, ids, tokens["attention_mask"].to(dev))
