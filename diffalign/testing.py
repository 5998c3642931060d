"""Tiny offline models and datasets for tests, benchmarks and the demo.

Everything here is built from configs with random weights (diffusers' own fast-test sizes), written with
``save_pretrained`` and meant to be read back with ``from_pretrained``, so the real loading code runs. The
CLIP tokenizer is the real 49,408-token vocabulary rebuilt from the BPE merges file that open_clip ships.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import torch
from PIL import Image

CLIP_MERGES = 48894  # 49408 tokens = 256 bytes + 256 "</w>" forms + merges + 2 specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(path: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write CLIP's tokenizer files (vocab.json, merges.txt, configs) from open_clip's packaged BPE file."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_MERGES + 1]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token,
    }))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token,
    }))
    return path


def clip_tokenizer(path: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(path)))


def _text_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
        max_position_embeddings=77, projection_dim=projection_dim, hidden_act="gelu",
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=64,
    )


def build_tiny_pipeline(kind: str = "sdxl", seed: int = 0, prediction_type: str = "epsilon"):
    """A random-weight pipeline of the SD1.5 (``"sd15"``) or SDXL (``"sdxl"``) architecture."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"kind={kind!r}: expected 'sd15' or 'sdxl'")
    torch.manual_seed(seed)
    common = dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sd15":
            unet = UNet2DConditionModel(cross_attention_dim=32, norm_num_groups=32, **common)
            vae = _vae()
            text_encoder = CLIPTextModel(_text_config())
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(Path(tmp) / "tok"), unet=unet,
                scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **sched),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        else:
            unet = UNet2DConditionModel(
                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=1,
                **common,
            )
            vae = _vae()
            text_encoder = CLIPTextModel(_text_config())
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=32))
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=clip_tokenizer(Path(tmp) / "tok"), tokenizer_2=clip_tokenizer(Path(tmp) / "tok2"),
                unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading", **sched),
            )
    return pipe


def save_tiny_pipeline(path: str | Path, kind: str = "sdxl", seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it to ``path`` (safetensors); returns the folder."""
    path = Path(path)
    build_tiny_pipeline(kind, seed, prediction_type).save_pretrained(path, safe_serialization=True)
    return path


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (235, 220, 40)}


def _scene(colour: str, background: str, size: int, rng: random.Random, quality: float) -> bytes:
    """A JPEG of a coloured square on a background; ``quality`` in [0, 1] sets how large and centred it is."""
    img = Image.new("RGB", (size, size), COLOURS[background])
    half = int(size * (0.12 + 0.25 * quality))
    cx = size // 2 + int((1 - quality) * rng.uniform(-size / 4, size / 4))
    cy = size // 2 + int((1 - quality) * rng.uniform(-size / 4, size / 4))
    img.paste(COLOURS[colour], (cx - half, cy - half, cx + half, cy + half))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_pickapic_rows(n: int = 16, size: int = 48, seed: int = 0, ties: int = 0) -> list[dict]:
    """Rows in Pick-a-Pic v2 layout (caption, jpg_0, jpg_1, label_0, label_1, score_0, score_1): the preferred
    image has a larger, centred square. The last ``ties`` rows are ties (label 0.5). The scores stand in for a
    reward model: higher for the preferred image, except on every fifth row, where the reward disagrees."""
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour, background = rng.sample(names, 2)
        good = _scene(colour, background, size, rng, 1.0)
        bad = _scene(colour, background, size, rng, 0.0)
        first_wins = rng.random() < 0.5
        good_score, bad_score = 0.6 + 0.3 * rng.random(), 0.2 + 0.3 * rng.random()
        if i % 5 == 4:
            good_score, bad_score = bad_score, good_score
        rows.append({
            "caption": f"a {colour} square on a {background} background",
            "jpg_0": good if first_wins else bad,
            "jpg_1": bad if first_wins else good,
            "label_0": 0.5 if i >= n - ties else (1.0 if first_wins else 0.0),
            "label_1": 0.5 if i >= n - ties else (0.0 if first_wins else 1.0),
            "score_0": good_score if first_wins else bad_score,
            "score_1": bad_score if first_wins else good_score,
        })
    return rows


def write_pickapic_parquet(path: str | Path, n: int = 16, size: int = 48, seed: int = 0, ties: int = 0,
                           scores: bool = False) -> Path:
    """Write :func:`make_pickapic_rows` to a parquet file (the layout of ``yuvalkirstain/pickapic_v2``), with the
    ``score_0``/``score_1`` reward columns if ``scores``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_pickapic_rows(n, size, seed, ties)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "caption": [r["caption"] for r in rows],
        "jpg_0": pa.array([r["jpg_0"] for r in rows], type=pa.binary()),
        "jpg_1": pa.array([r["jpg_1"] for r in rows], type=pa.binary()),
        "label_0": [r["label_0"] for r in rows],
        "label_1": [r["label_1"] for r in rows],
        **({"score_0": [r["score_0"] for r in rows], "score_1": [r["score_1"] for r in rows]} if scores else {}),
    })
    pq.write_table(table, path)
    return path


def write_pairs_jsonl(folder: str | Path, n: int = 8, size: int = 48, seed: int = 0) -> Path:
    """A local-pairs dataset: ``pairs.jsonl`` plus an ``imgs/`` folder of PNG files."""
    folder = Path(folder)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(make_pickapic_rows(n, size, seed)):
        win, lose = (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1.0 else (row["jpg_1"], row["jpg_0"])
        for name, data in ((f"imgs/{i}_w.png", win), (f"imgs/{i}_l.png", lose)):
            Image.open(io.BytesIO(data)).save(folder / name)
        lines.append(json.dumps({"prompt": row["caption"], "chosen": f"imgs/{i}_w.png", "rejected": f"imgs/{i}_l.png"}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_unpaired_jsonl(folder: str | Path, n: int = 8, size: int = 48, seed: int = 0) -> Path:
    """An unpaired (Diffusion-KTO) dataset: ``unpaired.jsonl`` of ``n`` pairs' images, each winner labelled 1 and
    each loser 0 (2n lines, alternating), plus the ``imgs/`` folder :func:`write_pairs_jsonl` writes."""
    folder = Path(folder)
    write_pairs_jsonl(folder, n, size, seed)
    lines = []
    for row in map(json.loads, (folder / "pairs.jsonl").read_text().splitlines()):
        lines.append(json.dumps({"prompt": row["prompt"], "image": row["chosen"], "label": 1}))
        lines.append(json.dumps({"prompt": row["prompt"], "image": row["rejected"], "label": 0}))
    (folder / "pairs.jsonl").unlink()
    path = folder / "unpaired.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_clip(path: str | Path, projection_dim: int = 32, seed: int = 0) -> Path:
    """A random-weight ``CLIPModel`` of the real class (224 px, patch 32, tiny widths) with the real CLIP
    tokenizer, saved to ``path`` for reward-head tests."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=224, patch_size=32)
    config = CLIPConfig(text_config=_text_config(projection_dim).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=projection_dim)
    path = Path(path)
    CLIPModel(config).save_pretrained(path)
    write_clip_tokenizer(path)
    return path


def write_plugin_distribution(folder: str | Path, module: str, source: str, entry_points: dict[str, str],
                              group: str = "diffalign.rewards") -> Path:
    """An "installed" distribution in ``folder`` (put it on ``sys.path``): module ``module`` with ``source`` and a
    dist-info declaring ``entry_points`` (name -> "module:attr") in ``group``, as ``pip install`` would."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{module}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    return folder
