"""CLIP-based heads: CLIPScore, PickScore and the LAION improved-aesthetic predictor.

Preprocessing is done with tensor ops (bicubic resize with antialias, centre crop, OpenAI mean/std), so the heads
are differentiable with respect to the images. Weights load when a head is built, from a local folder or a hub
id; nothing downloads at import.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RewardError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_L14 = "openai/clip-vit-large-patch14"


def clip_preprocess(images: Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP pixel values: shortest side to ``size`` (bicubic, antialias), centre crop."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(images.float(), size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def load_clip(source: str, head: str, device: str | torch.device | None = None, model: bool = True,
              tokenizer: bool = True):
    """``(CLIPModel, CLIPTokenizer)`` from a local folder or hub id (either may be skipped: None), the model frozen,
    with a clear error when missing."""
    from transformers import CLIPModel, CLIPTokenizer

    try:
        clip = CLIPModel.from_pretrained(source) if model else None
        tok = CLIPTokenizer.from_pretrained(source) if tokenizer else None
    except OSError as e:
        raise RewardError(f"reward {head!r}: cannot load CLIP weights from {source!r} ({type(e).__name__}); download "
                          f"them first (`huggingface-cli download {source}`) or pass a local folder") from None
    if clip is not None:
        clip = clip.requires_grad_(False).eval().to(device or "cpu")
    return clip, tok


def _features(out) -> Tensor:
    """``get_*_features`` returns a tensor in older transformers and an output object in newer ones."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipScore:
    """CLIPScore: ``max(100 · cos(image, text), 0)`` (torchmetrics convention). Scale 0-100."""

    name, differentiable, higher_is_better = "clip", True, True

    def __init__(self, model: str = CLIP_L14, device: str | torch.device | None = None):
        self.model, self.tokenizer = load_clip(model, self.name, device)

    def similarity(self, images: Tensor, prompts: list[str]) -> Tensor:
        """100 · cos(image, text), unclamped."""
        dev = next(self.model.parameters()).device
        size = self.model.config.vision_config.image_size
        img = _features(self.model.get_image_features(pixel_values=clip_preprocess(images.to(dev), size)))
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(dev)
        txt = _features(self.model.get_text_features(**tokens))
        return 100 * F.cosine_similarity(img, txt, dim=-1)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.similarity(images, prompts).clamp(min=0)


class PickScore(ClipScore):
    """PickScore: ``logit_scale.exp() · cos(text, image)`` with the PickScore_v1 CLIP and the tokenizer of
    CLIP-ViT-H-14; a softmax over one prompt's candidates gives preference probabilities. Scale ~18-24."""

    name = "pickscore"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str | torch.device | None = None):
        self.model, _ = load_clip(model, self.name, device, tokenizer=False)
        _, self.tokenizer = load_clip(tokenizer, self.name, device, model=False)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.model.logit_scale.exp() * self.similarity(images, prompts) / 100


class AestheticMLP(nn.Module):
    """LAION's improved-aesthetic MLP; its state dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or, without executing code, a ``.pt/.pth`` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise RewardError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class Aesthetic:
    """LAION improved aesthetic predictor (``sac+logos+ava1-l14-linearMSE.pth``) on the L2-normalised CLIP
    ViT-L/14 image embedding. Scale ~1-10; prompts are ignored."""

    name, differentiable, higher_is_better = "aesthetic", True, True

    def __init__(self, weights: str, clip: str = CLIP_L14, device: str | torch.device | None = None):
        self.model, _ = load_clip(clip, self.name, device)
        self.mlp = AestheticMLP(self.model.config.projection_dim)
        try:
            self.mlp.load_state_dict(load_state_dict_file(weights), strict=True)
        except RuntimeError as e:
            raise RewardError(f"reward 'aesthetic': {weights!r} is not an improved-aesthetic MLP checkpoint: "
                              f"{str(e).splitlines()[0]}") from None
        self.mlp.requires_grad_(False).eval().to(next(self.model.parameters()).device)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        dev = next(self.model.parameters()).device
        size = self.model.config.vision_config.image_size
        emb = _features(self.model.get_image_features(pixel_values=clip_preprocess(images.to(dev), size)))
        return self.mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
