import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data.dataset import RawPairDataset
from diffalign.data.errors import DataError
from diffalign.data.images import BadImageError, decode_image
from diffalign.data.readers import load_pairs
from diffalign.data.transforms import paired_transform
from diffalign.testing import make_pickapic_rows, write_pairs_jsonl


def _parquet(path, rows, drop=()):
    cols = {k: [r[k] for r in rows] for k in rows[0] if k not in drop}
    for k in ("jpg_0", "jpg_1"):
        if k in cols:
            cols[k] = pa.array(cols[k], type=pa.binary())
    pq.write_table(pa.table(cols), path)
    return path


def _png(colour, size=(40, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_pickapic_winner_follows_label_and_ties_are_counted(pickapic):
    src = load_pairs(DataConfig(dataset=str(pickapic)))
    assert len(src) == 10 and src.ties_dropped == 2
    rows = make_pickapic_rows(12, 40, 0, ties=2)
    for i in range(len(src)):
        r = rows[src.rows[i]]
        expected = r["jpg_0"] if r["label_0"] == 1.0 else r["jpg_1"]
        assert src[i].winner == expected and src[i].caption == r["caption"]
    kept = load_pairs(DataConfig(dataset=str(pickapic), keep_ties=True))
    assert len(kept) == 12 and kept.ties_dropped == 0
    assert len(load_pairs(DataConfig(dataset=str(pickapic), max_pairs=3))) == 3


def test_exclude_prompts_leaves_out_the_pairs_of_those_prompts(pickapic, tmp_path, caplog):
    everything = load_pairs(DataConfig(dataset=str(pickapic)))
    captions = [everything.caption_of(r) for r in everything.rows]
    out = tmp_path / "validation.txt"
    out.write_text(f"  {captions[0]}  \n\n{captions[3]}\nnot a caption here\n")  # stripped, blank lines skipped
    with caplog.at_level("INFO", logger="diffalign.data.readers"):
        kept = load_pairs(DataConfig(dataset=str(pickapic), exclude_prompts=str(out)))
    left_out = sum(c in (captions[0], captions[3]) for c in captions)
    assert len(kept) == len(everything) - left_out and left_out >= 2
    assert not {kept.caption_of(r) for r in kept.rows} & {captions[0], captions[3]}
    assert f"left out {left_out} pairs whose prompt is in data.exclude_prompts" in caplog.text
    assert len(load_pairs(DataConfig(dataset=str(pickapic), exclude_prompts=str(out), max_pairs=2))) == 2
    none = tmp_path / "none.txt"
    none.write_text("no such caption\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffalign.data.readers"):
        assert len(load_pairs(DataConfig(dataset=str(pickapic), exclude_prompts=str(none)))) == len(everything)
    assert "none of the 1 prompts in data.exclude_prompts" in caplog.text  # most likely the wrong file
    every = tmp_path / "every.txt"
    every.write_text("\n".join(captions) + "\n")
    with pytest.raises(DataError, match=r"every one of its 10 pairs has a prompt in data.exclude_prompts=.*every.txt"):
        load_pairs(DataConfig(dataset=str(pickapic), exclude_prompts=str(every)))
    with pytest.raises(DataError, match=r"prompts file .*missing.txt' does not exist"):
        load_pairs(DataConfig(dataset=str(pickapic), exclude_prompts=str(tmp_path / "missing.txt")))


def test_missing_columns_are_named(tmp_path):
    path = _parquet(tmp_path / "bad.parquet", make_pickapic_rows(3), drop=("label_0",))
    with pytest.raises(DataError, match=r"bad.parquet: missing column\(s\) label_0"):
        load_pairs(DataConfig(dataset=str(path)))


def test_all_ties_and_empty_dataset(tmp_path):
    path = _parquet(tmp_path / "ties.parquet", make_pickapic_rows(4, ties=4))
    with pytest.raises(DataError, match=r"no usable preference pairs \(4 ties dropped"):
        load_pairs(DataConfig(dataset=str(path)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no usable preference pairs"):
        load_pairs(DataConfig(dataset=str(empty)))
    with pytest.raises(DataError, match="no such file or folder"):
        load_pairs(DataConfig(dataset=str(tmp_path / "missing.parquet")))


def test_undecodable_images_skip_with_count_or_stop(tmp_path, caplog):
    rows = make_pickapic_rows(4)
    rows[1]["jpg_1"] = b"not a jpeg"
    path = _parquet(tmp_path / "broken.parquet", rows)
    raw = RawPairDataset(load_pairs(DataConfig(dataset=str(path))), 32, 0)
    with pytest.raises(BadImageError, match=r"broken.parquet, row 1 \((preferred|rejected) image\): cannot decode"):
        RawPairDataset(load_pairs(DataConfig(dataset=str(path))), 32, 0).drop_bad_rows("error")
    assert raw.drop_bad_rows("skip") == 1 and len(raw) == 3 and 1 not in raw.source.rows
    assert "skipped 1 pair(s) with undecodable images" in caplog.text


def test_local_jsonl_and_csv(tmp_path):
    path = write_pairs_jsonl(tmp_path / "pairs", n=3, size=40)
    src = load_pairs(DataConfig(dataset=str(path)))
    assert len(src) == 3 and src[0].winner.name == "0_w.png"
    csv = tmp_path / "pairs" / "pairs.csv"
    csv.write_text("prompt,chosen,rejected,chosen_score,rejected_score\nhi,imgs/0_w.png,imgs/0_l.png,0.3,0.1\n")
    pair = load_pairs(DataConfig(dataset=str(csv)))[0]
    assert (pair.caption, pair.score_w, pair.score_l) == ("hi", 0.3, 0.1)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x", "chosen": "imgs/0_w.png"}, r"line 1: missing key\(s\) rejected"),
    ({"prompt": "x", "chosen": "../outside.png", "rejected": "imgs/0_l.png"}, "leaves the dataset folder"),
    ({"prompt": "x", "chosen": "imgs/nope.png", "rejected": "imgs/0_l.png"}, "chosen image 'imgs/nope.png' does not exist"),
    ({"prompt": "x", "chosen": "imgs/0_w.png", "rejected": "imgs/0_l.png", "chosen_score": "high"}, "chosen_score='high' is not a number"),
])
def test_local_pairs_bad_rows_are_named(tmp_path, line, message):
    folder = write_pairs_jsonl(tmp_path / "pairs", n=1, size=40).parent
    (tmp_path / "outside.png").write_bytes(_png("red"))
    bad = folder / "bad.jsonl"
    bad.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        load_pairs(DataConfig(dataset=str(bad)))
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl, line 1: not valid JSON"):
        load_pairs(DataConfig(dataset=str(bad)))


def test_decode_errors_name_the_place():
    with pytest.raises(BadImageError, match="somewhere: cannot decode"):
        decode_image(b"\x00\x01", "somewhere")


def test_paired_transform_is_identical_for_both_images():
    # An asymmetric image: a flip or a different crop would change it.
    img = Image.new("RGB", (60, 40), "black")
    img.paste((255, 0, 0), (0, 0, 10, 40))
    small_loser = img.resize((30, 20))  # the loser is resized to the winner's size first
    flips = set()
    for row in range(12):
        out = paired_transform(img, img, 32, seed=0, row=row)
        assert torch.equal(out.winner, out.loser)
        assert out.winner.shape == (3, 32, 32) and out.winner.min() >= -1 and out.winner.max() <= 1
        orig_h, orig_w, top, left = out.geometry.tolist()
        assert (orig_h, orig_w, top) == (40, 60, 0) and 0 <= left <= 48 - 32
        flips.add(bool(out.winner[0, :, 0].mean() < out.winner[0, :, -1].mean()))
        again = paired_transform(img, small_loser, 32, seed=0, row=row)
        assert torch.equal(again.geometry, out.geometry)  # fixed per (seed, row)
        assert (again.winner - again.loser).abs().mean() < 0.1
    assert flips == {True, False}  # both orientations occur across pairs
    centred = paired_transform(img, img, 32, seed=0, row=0, random_flip=False, center_crop=True)
    assert centred.geometry.tolist() == [40, 60, 0, 8]
