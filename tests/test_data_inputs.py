"""Inputs real datasets contain: make-pairs folders, 16-bit and transparent images, tiny images, duplicate and
identical pairs, non-finite scores, non-UTF-8 text, over-long captions; and the one-line data summary."""

import inspect
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data.cache import build_cache
from diffalign.data.dataset import RawPairDataset, encode_batch
from diffalign.data.errors import DataError
from diffalign.data.images import decode_image
from diffalign.data.prompts import read_prompts
from diffalign.data.readers import load_pairs
from diffalign.models import Conditioning
from diffalign.testing import clip_tokenizer, make_pickapic_rows, write_pairs_jsonl


# ----- helpers -----
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _local(folder, images: dict, rows: list[dict], name="pairs.jsonl"):
    """A local-pairs dataset: ``images`` maps a relative path to a PIL image; ``rows`` are the JSONL objects."""
    for rel, img in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / rel)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _solid(colour, size=(40, 40)):
    return Image.new("RGB", size, colour)


def _parquet(path, rows, **extra):
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    for k in ("jpg_0", "jpg_1"):
        cols[k] = pa.array(cols[k], type=pa.binary())
    cols.update(extra)
    pq.write_table(pa.table(cols), path)
    return path


def _warnings(caplog, text):
    """Warnings whose text (after the dataset's name, which holds the test's name) contains ``text``."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage().split(": ", 1)[-1]]


# ----- 1. the make-pairs output folder -----
def _make_pairs_folder(out, n=3):
    """What ``diffalign make-pairs --out`` writes: images/, scores.jsonl, pairs.jsonl, make_pairs.json."""
    (out / "images").mkdir(parents=True)
    records, lines = [], []
    for pid in range(n):
        files = [f"images/p{pid:05d}_{k}.png" for k in range(2)]
        for k, f in enumerate(files):
            _solid((40 * pid + 100 * k, 10, 10)).save(out / f)
        records.append({"prompt_id": pid, "prompt": f"prompt {pid}", "images": files, "seeds": [0, 1],
                        "scores": {"brightness": [0.2, 0.9]}})
        lines.append({"prompt": f"prompt {pid}", "chosen": files[1], "rejected": files[0], "chosen_score": 0.9,
                      "rejected_score": 0.2, "chosen_brightness": 0.9, "rejected_brightness": 0.2})
    (out / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "make_pairs.json").write_text(json.dumps({"base": "x", "per_prompt": 2}))
    return out


def test_make_pairs_output_folder_is_a_dataset(tmp_path):
    out = _make_pairs_folder(tmp_path / "made")
    src = load_pairs(DataConfig(dataset=str(out)))
    assert len(src) == 3 and src[0].winner.name == "p00000_1.png" and src[0].caption == "prompt 0"
    assert src.score_pairs()[0] == (0.9, 0.2)
    assert len(load_pairs(DataConfig(dataset=str(out) + "/"))) == 3


def test_folder_matching_no_layout_lists_the_layouts(tmp_path):
    folder = tmp_path / "just_images"
    folder.mkdir()
    _solid("red").save(folder / "a.png")
    with pytest.raises(DataError) as e:
        load_pairs(DataConfig(dataset=str(folder)))
    msg = str(e.value)
    assert "\n" not in msg and "just_images" in msg
    for layout in ("pairs.jsonl", "pairs.csv", "parquet", "save_to_disk"):
        assert layout in msg, layout


# ----- 2. high-bit-depth images -----
def test_16_bit_png_keeps_its_range():
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    img = Image.fromarray(grey)
    assert img.mode == "I;16"
    for value in (img, _png(img)):
        rgb = np.asarray(decode_image(value, "x"))
        assert rgb.shape == (64, 64, 3)
        assert abs(int(rgb[32, 32, 0]) - round(grey[32, 32] / 257)) <= 1
        assert rgb.min() == 0 and rgb.max() == 255 and (rgb == 255).mean() < 0.05


@pytest.mark.parametrize("array, expected", [
    (np.full((8, 8), 40000, dtype=np.int32), round(40000 / 257)),  # I holding 16-bit values
    (np.full((8, 8), 100, dtype=np.int32), 100),                    # I holding 8-bit values
    (np.full((8, 8), 0.5, dtype=np.float32), 128),                  # F in [0, 1]
    (np.full((8, 8), 200.0, dtype=np.float32), 200),                # F in [0, 255]
])
def test_32_bit_modes_use_their_range(array, expected):
    img = Image.fromarray(array)
    assert img.mode in ("I", "F")
    assert abs(int(np.asarray(decode_image(img, "x"))[0, 0, 0]) - expected) <= 1


# ----- 3. transparency -----
def _transparent_images():
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 20, 40))
    la = Image.new("LA", (40, 40), (0, 0))
    p = Image.new("P", (40, 40), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    return rgba, la, p


def test_transparent_pixels_are_composited_on_white():
    rgba, la, p = _transparent_images()
    out = np.asarray(decode_image(rgba, "x"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 39]) == (255, 255, 255)
    assert tuple(np.asarray(decode_image(_png(la), "x"))[5, 5]) == (255, 255, 255)
    assert tuple(np.asarray(decode_image(_png(p), "x"))[5, 5]) == (255, 255, 255)
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    assert tuple(np.asarray(decode_image(opaque, "x"))[0, 0]) == (10, 20, 30)


def test_composited_and_converted_images_are_counted_once(tmp_path, caplog):
    rgba, la, p = _transparent_images()
    sixteen = Image.fromarray(np.full((40, 40), 30000, dtype=np.uint16))
    images = {"a.png": rgba, "b.png": la, "c.png": p, "d.png": _solid("blue"), "e.png": sixteen,
              "f.png": _solid("green")}
    rows = [{"prompt": "x", "chosen": "a.png", "rejected": "d.png"},
            {"prompt": "y", "chosen": "b.png", "rejected": "c.png"},
            {"prompt": "z", "chosen": "e.png", "rejected": "f.png"}]
    raw = RawPairDataset(load_pairs(DataConfig(dataset=str(_local(tmp_path, images, rows)))), 32, 0)
    caplog.set_level(logging.INFO)
    raw.drop_bad_rows("skip")
    for _ in range(2):  # items read again (a second epoch) do not count twice
        for i in range(len(raw)):
            raw[i]
    counts = raw.source.counts()
    assert counts["composited"] == 3 and counts["converted"] == 1
    assert len(_warnings(caplog, "composited")) == 1 and "3 image(s)" in _warnings(caplog, "composited")[0].getMessage()
    assert "white" in _warnings(caplog, "composited")[0].getMessage()
    assert len(_warnings(caplog, "16-bit")) == 1


# ----- 4. tiny images -----
def test_tiny_images_are_named(tmp_path, caplog):
    images = {"big_a.png": _solid("red"), "big_b.png": _solid("blue"), "dot.png": _solid("red", (1, 1)),
              "thin.png": _solid("red", (200, 6))}
    rows = [{"prompt": "ok", "chosen": "big_a.png", "rejected": "big_b.png"},
            {"prompt": "dot", "chosen": "dot.png", "rejected": "big_b.png"},
            {"prompt": "thin", "chosen": "big_a.png", "rejected": "thin.png"}]
    raw = RawPairDataset(load_pairs(DataConfig(dataset=str(_local(tmp_path, images, rows)))), 32, 0)
    raw.drop_bad_rows("skip")
    warned = _warnings(caplog, "shorter side")
    assert len(warned) == 1 and len(raw) == 3  # warned, still trained on
    msg = warned[0].getMessage()
    assert "2 pair(s)" in msg and "line 2" in msg and "line 3" in msg and "line 1," not in msg
    assert raw.source.counts()["tiny_image_pairs"] == 2


# ----- 5. duplicates and identical pairs -----
def test_local_duplicates_and_identical_pairs_are_dropped(tmp_path, caplog):
    images = {"a.png": _solid("red"), "b.png": _solid("blue"), "c.png": _solid("green"),
              "a_copy.png": _solid("red")}
    rows = [{"prompt": "p", "chosen": "a.png", "rejected": "b.png"},
            {"prompt": "p", "chosen": "a.png", "rejected": "b.png"},          # duplicate of line 1
            {"prompt": "p", "chosen": "./a_copy.png", "rejected": "b.png"},   # same bytes as line 1: duplicate
            {"prompt": "other", "chosen": "a.png", "rejected": "b.png"},      # another caption: kept
            {"prompt": "q", "chosen": "c.png", "rejected": "c.png"},          # same path
            {"prompt": "q", "chosen": "a.png", "rejected": "a_copy.png"},     # same bytes
            {"prompt": "q", "chosen": "c.png", "rejected": "a.png"}]
    caplog.set_level(logging.INFO)
    src = load_pairs(DataConfig(dataset=str(_local(tmp_path, images, rows))))
    assert src.rows == [0, 3, 6]
    counts = src.counts()
    assert counts["duplicates_dropped"] == 2 and counts["identical_dropped"] == 2 and counts["pairs"] == 3
    assert _warnings(caplog, "2 duplicate") and _warnings(caplog, "2 pair(s) whose two images are identical")


def test_pickapic_duplicates_and_identical_pairs_are_dropped(tmp_path):
    rows = make_pickapic_rows(5, 40)
    rows.append(dict(rows[0]))                                    # duplicate
    rows.append({**rows[1], "jpg_1": rows[1]["jpg_0"]})            # identical bytes
    rows.append({**rows[2], "caption": "another caption"})         # same images, other caption: kept
    src = load_pairs(DataConfig(dataset=str(_parquet(tmp_path / "d.parquet", rows))))
    assert src.rows == [0, 1, 2, 3, 4, 7]
    assert (src.duplicates_dropped, src.identical_dropped) == (1, 1)


def test_pickapic_uid_columns_identify_images(tmp_path):
    rows = make_pickapic_rows(4, 40)
    uid0, uid1 = ["a", "b", "c", "a"], ["x", "b", "z", "x"]  # row 1: one image twice; row 3 repeats row 0
    rows[3] = {**rows[3], "caption": rows[0]["caption"], "label_0": rows[0]["label_0"]}
    src = load_pairs(DataConfig(dataset=str(_parquet(tmp_path / "u.parquet", rows, image_0_uid=uid0,
                                                      image_1_uid=uid1))))
    assert src.rows == [0, 2] and (src.duplicates_dropped, src.identical_dropped) == (1, 1)


# ----- 6. the summary -----
def test_summary_is_one_line_with_every_count(tmp_path):
    rows = make_pickapic_rows(6, 40, ties=1)
    rows.append(dict(rows[0]))
    raw = RawPairDataset(load_pairs(DataConfig(dataset=str(_parquet(tmp_path / "s.parquet", rows)))), 32, 0)
    before = raw.source.summary()
    assert "\n" not in before and "5 pairs kept" in before
    raw.drop_bad_rows("skip", [clip_tokenizer(tmp_path / "tok")])
    counts = raw.source.counts()
    assert counts == {"pairs": 5, "ties_dropped": 1, "duplicates_dropped": 1, "identical_dropped": 0,
                      "bad_images_skipped": 0, "composited": 0, "converted": 0, "tiny_image_pairs": 0,
                      "truncated_captions": 0}
    line = raw.source.summary()
    assert "\n" not in line
    for text in ("5 pairs kept", "1 tie", "1 duplicate", "0 identical", "0 with bad images", "0 composited",
                 "0 converted", "0 truncated"):
        assert text in line, text


# ----- 7. non-finite scores -----
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_local_scores_are_named(tmp_path, value):
    folder = write_pairs_jsonl(tmp_path / "pairs", n=2, size=40).parent
    bad = folder / "scored.jsonl"
    rows = [{"prompt": "a", "chosen": "imgs/0_w.png", "rejected": "imgs/0_l.png", "chosen_score": 1.0,
             "rejected_score": 0.5},
            {"prompt": "b", "chosen": "imgs/1_w.png", "rejected": "imgs/1_l.png", "chosen_score": 1.0,
             "rejected_score": value}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"scored.jsonl, line 2: rejected_score=(nan|inf) is not finite"):
        load_pairs(DataConfig(dataset=str(bad))).score_pairs()


def test_non_finite_pickapic_scores_name_the_column(tmp_path):
    rows = make_pickapic_rows(3, 40)
    rows[0]["label_0"], rows[1]["label_0"] = 1.0, 0.0
    s0 = [0.5, float("nan"), 0.5]
    src = load_pairs(DataConfig(dataset=str(_parquet(tmp_path / "n.parquet", rows, score_0=s0, score_1=[0.1] * 3))))
    with pytest.raises(DataError, match=r"n.parquet, row 1: score_0=nan is not finite"):
        src.score_pairs()


def test_missing_scores_message_is_current(tmp_path):
    src = load_pairs(DataConfig(dataset=str(write_pairs_jsonl(tmp_path / "p", n=1, size=40))))
    with pytest.raises(DataError, match="no reward scores") as e:
        src.score_pairs()
    assert "planned" not in str(e.value) and "diffalign score" in str(e.value)


# ----- 8. text that is not UTF-8 -----
def test_latin1_prompts_file_is_named(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a fox\nun café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"prompts.txt, line 2 \(byte 12\): not UTF-8.*UTF-8") as e:
        read_prompts(path)
    assert "\n" not in str(e.value)
    path.write_bytes("\ufeffa fox\nun café\n".encode("utf-8"))  # a BOM is not part of the first prompt
    assert read_prompts(path) == ["a fox", "un café"]


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv"])
def test_latin1_local_pairs_are_named(tmp_path, name):
    folder = write_pairs_jsonl(tmp_path / "pairs", n=1, size=40).parent
    path = folder / f"latin1{name[5:]}"
    if name.endswith(".csv"):
        text = "prompt,chosen,rejected\nun café,imgs/0_w.png,imgs/0_l.png\n"
    else:
        text = json.dumps({"prompt": "un café", "chosen": "imgs/0_w.png", "rejected": "imgs/0_l.png"},
                          ensure_ascii=False) + "\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.(jsonl|csv), line \d+ \(byte \d+\): not UTF-8"):
        load_pairs(DataConfig(dataset=str(path)))
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a BOM (Excel's CSV) reads
    assert load_pairs(DataConfig(dataset=str(path)))[0].caption == "un café"


# ----- 9. captions over the tokenizer's length -----
LONG = " ".join(["a very long and detailed prompt"] * 20)


def test_count_truncated(tmp_path):
    from diffalign.data.dataset import count_truncated

    tok = clip_tokenizer(tmp_path / "tok")
    assert count_truncated(tok, ["short", LONG, "", LONG + " x"]) == 2
    assert count_truncated([tok, tok], [LONG]) == 1
    assert count_truncated([], [LONG]) == 0


def test_truncated_captions_warn_once_and_are_counted(tmp_path, caplog):
    images = {"a.png": _solid("red"), "b.png": _solid("blue")}
    rows = [{"prompt": LONG, "chosen": "a.png", "rejected": "b.png"},
            {"prompt": LONG + " two", "chosen": "b.png", "rejected": "a.png"},
            {"prompt": "short", "chosen": "a.png", "rejected": "b.png"}]
    raw = RawPairDataset(load_pairs(DataConfig(dataset=str(_local(tmp_path, images, rows)))), 32, 0)
    raw.drop_bad_rows("skip", [clip_tokenizer(tmp_path / "tok")])
    warned = _warnings(caplog, "truncated")
    assert len(warned) == 1 and "2 of 3" in warned[0].getMessage() and "77" in warned[0].getMessage()
    assert raw.source.counts()["truncated_captions"] == 2


class _FakeBackbone:
    """Enough of a Backbone for build_cache: latents are subsampled pixels, embeddings are zeros."""

    def __init__(self, tokenizer):
        self.tokenizers = [tokenizer]

    def encode_prompt(self, prompts):
        return Conditioning(torch.zeros(len(prompts), 77, 8))

    def encode_images(self, pixels):
        return pixels[:, :, ::8, ::8].clone()


def test_cache_records_the_counts_and_restores_them(tmp_path, caplog):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    images = {"a.png": rgba, "b.png": _solid("blue"), "c.png": _solid("red", (2, 2))}
    rows = [{"prompt": LONG, "chosen": "a.png", "rejected": "b.png"},
            {"prompt": "p", "chosen": "b.png", "rejected": "c.png"},
            {"prompt": "p", "chosen": "b.png", "rejected": "c.png"}]
    path = _local(tmp_path, images, rows)
    backbone = _FakeBackbone(clip_tokenizer(tmp_path / "tok"))
    raw = RawPairDataset(load_pairs(DataConfig(dataset=str(path))), 32, 0)
    build_cache(backbone, raw, tmp_path / "cache")
    expected = {"pairs": 2, "ties_dropped": 0, "duplicates_dropped": 1, "identical_dropped": 0,
                "bad_images_skipped": 0, "composited": 1, "converted": 0, "tiny_image_pairs": 1, "truncated_captions": 1}
    assert raw.source.counts() == expected
    assert len(_warnings(caplog, "composited")) == 1 and len(_warnings(caplog, "truncated")) == 1
    again = RawPairDataset(load_pairs(DataConfig(dataset=str(path))), 32, 0)
    build_cache(backbone, again, tmp_path / "cache")  # reused: nothing decoded, counts from the cache
    assert again.source.counts() == expected


# ----- 10. stale arguments -----
def test_encode_batch_takes_no_resolution():
    assert list(inspect.signature(encode_batch).parameters) == ["backbone", "batch"]


def test_counts_survive_dataloader_workers(tmp_path):
    """The decoding pass's notes travel with the items, so a cache built with worker processes counts them too."""
    images = {"a.png": Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "b.png": _solid("blue")}
    path = _local(tmp_path, images, [{"prompt": "p", "chosen": "a.png", "rejected": "b.png"}])
    raw = RawPairDataset(load_pairs(DataConfig(dataset=str(path))), 32, 0)
    build_cache(_FakeBackbone(clip_tokenizer(tmp_path / "tok")), raw, tmp_path / "cache", num_workers=1)
    assert raw.source.counts()["composited"] == 1
