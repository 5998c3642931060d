"""HPSv2 (Wu et al. 2023, tgxs002/HPSv2) rebuilt on ``open_clip`` without the ``hpsv2`` package.

The released ``HPS_v2*_compressed.pt`` files hold ``{"state_dict": ...}`` for an open_clip ``ViT-H-14`` CLIP with
plain keys (``hpsv2/img_score.py`` loads ``checkpoint['state_dict']`` strictly into the unwrapped model); a
``module.`` prefix (a DDP training checkpoint) is stripped. The score is HPSv2's
``diagonal(image_features @ text_features.T)`` on L2-normalised features: a cosine, no logit scale (~0.2-0.35).
Preprocessing uses tensor ops (differentiable): HPSv2's ``preprocess_val`` resizes the longest side to the model's
image size (bicubic) and zero-pads to a square, then applies the OpenAI mean/std; for square images that is
exactly :func:`~diffalign.rewards.clip.clip_preprocess`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RewardError
from .clip import clip_preprocess, load_state_dict_file

HUB_REPO = "xswu/HPSv2"
VERSIONS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # hpsv2/utils.py hps_version_map
HEAD = "hps"


@contextmanager
def _quiet_logging():
    """Hide open_clip's "initialized randomly" warning: the weights are loaded right after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def build_open_clip(model_name: str = "ViT-H-14", device: str | torch.device | None = None) -> nn.Module:
    """A randomly initialised, frozen fp32 open_clip model (no weights download); ``device="meta"`` for layouts."""
    import open_clip

    with _quiet_logging():
        model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device=device or "cpu")
    return model.requires_grad_(False).eval()


def load_hps_state(model: nn.Module, state: dict[str, Tensor], source: str = "state dict",
                   assign: bool = False) -> None:
    """Load an HPS state dict strictly (``module.`` prefixes stripped); a mismatch is a :class:`RewardError`."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
        raise RewardError(f"reward {HEAD!r}: {source} is not an HPSv2 checkpoint for this model: "
                          f"{detail[:400]}") from None


def hps_preprocess(images: Tensor, size: int) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> pixel values: longest side to ``size`` (bicubic, antialias), zero-pad, normalise."""
    h, w = images.shape[-2:]
    if h != w:
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
        x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        ph, pw = size - nh, size - nw
        images = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return clip_preprocess(images, size)  # square: a plain resize (identity at ``size``) + OpenAI mean/std


def resolve_weights(weights: str | None, version: str) -> str:
    """The local checkpoint path: ``weights`` if given, else the hub file for ``version`` (downloaded/cached)."""
    if version not in VERSIONS:
        raise RewardError(f"reward {HEAD!r}: unknown HPS version {version!r}; valid: {', '.join(VERSIONS)}")
    hint = (f"download it first (`huggingface-cli download {HUB_REPO} {VERSIONS[version]}`) or pass a local "
            f"path as weights=")
    if weights is not None:
        if not Path(weights).is_file():
            raise RewardError(f"reward {HEAD!r}: weights file {str(weights)!r} does not exist; {hint}")
        return str(weights)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(HUB_REPO, VERSIONS[version])
    except Exception as e:  # offline, not cached, network or auth errors
        raise RewardError(f"reward {HEAD!r}: cannot get {VERSIONS[version]} from {HUB_REPO} "
                          f"({type(e).__name__}); {hint}") from None


class HPSv2:
    """Human Preference Score v2: ``cos(image, text)`` of the HPS-finetuned open_clip ViT-H-14. Scale ~0.2-0.35.

    ``weights``: a local ``.pt``/``.safetensors`` checkpoint, else ``xswu/HPSv2``'s file for ``version``
    ("v2.1", the default, or "v2.0"). ``model_name``: the open_clip architecture (a registered config name).
    """

    name, differentiable, higher_is_better = HEAD, True, True

    def __init__(self, weights: str | None = None, version: str = "v2.1", model_name: str = "ViT-H-14",
                 device: str | torch.device | None = None):
        import open_clip

        path = resolve_weights(weights, version)
        try:
            state = load_state_dict_file(path)
        except Exception as e:  # not a torch/safetensors file, or pickled code refused by weights_only
            raise RewardError(f"reward {HEAD!r}: cannot read {path!r} ({type(e).__name__}: {e})") from None
        self.model = build_open_clip(model_name, device)
        load_hps_state(self.model, state, repr(path))
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.tokenizer = open_clip.get_tokenizer(model_name)  # open_clip's bundled BPE: no download

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        dev = next(self.model.parameters()).device
        img = self.model.encode_image(hps_preprocess(images.to(dev), self.image_size), normalize=True)
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(dev), normalize=True)
        return (img * txt).sum(dim=-1)  # = diagonal(img @ txt.T)
