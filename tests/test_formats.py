"""Data readers: every format gives the same validated records; every bad-record kind is caught."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from symmpo_fast import formats
from symmpo_fast.formats import BadRecordError, load_dataset
from symmpo_fast.synthetic import build_split

TEXTS = ("question", "chosen", "rejected", "contrast_chosen")


def _png(path: Path, colour=(200, 30, 30)) -> bytes:
    im = Image.new("RGB", (24, 16), colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def jsonl(tmp_path):
    """Our JSONL format, written from 6 generated records (images as PNG files beside it)."""
    source = build_split("train", 6)
    return source, formats.write_jsonl(source, tmp_path / "data")


def _same_records(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        for k in TEXTS:
            assert ra.get(k) == rb.get(k)
        for k in ("image", "contrast_image"):
            assert np.array_equal(np.asarray(ra[k]), np.asarray(rb[k]))


def test_jsonl_round_trip(jsonl):
    source, path = jsonl
    loaded = load_dataset(str(path))
    _same_records(source, loaded)
    assert loaded.fingerprint() == source.fingerprint()
    assert loaded[0]["meta"] == source.records[0]["meta"]


def test_image_root_resolves_relative_paths(jsonl, tmp_path):
    _, path = jsonl
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_text(path.read_text())
    with pytest.raises(BadRecordError, match="does not exist"):
        load_dataset(str(moved))
    assert len(load_dataset(str(moved), image_root=str(path.parent))) == 6


def test_mdpo_json(tmp_path):
    _png(tmp_path / "a.png")
    rows = [{"img_path": "a.png", "prompt": "<image>\nWhat colour is the square?", "chosen": "Red.",
             "rejected": "Blue."}]
    (tmp_path / "mdpo.json").write_text(json.dumps(rows))
    ds = load_dataset(str(tmp_path / "mdpo.json"), objective="mdpo")
    rec = ds[0]
    assert rec["question"] == "What colour is the square?"  # the placeholder is the collator's job
    assert rec["chosen"] == "Red." and rec["image"].size == (24, 16)
    with pytest.raises(BadRecordError, match="missing field 'contrast_"):
        load_dataset(str(tmp_path / "mdpo.json"), objective="symmpo")


def _official_rows(tmp_path):
    img1, img2 = _png(tmp_path / "m.png"), _png(tmp_path / "m2.png", (30, 30, 200))
    logps = json.dumps({"logps": [-1.0, -2.0, -3.0, -4.0, -5.0, -.1, -.2, -.3, -.4, -.5,
                                  [-1.0], [-2.0], [-3.0], [-4.0], [-5.0]]})
    return [
        {"idx": 11, "question": "What colour is it?", "resp_1_w": "Red.", "resp_1_l": "Green.", "resp_2_w": "Blue.",
         "image_1": {"bytes": img1, "path": None}, "image_2": {"bytes": img2, "path": None},
         "image_path_1": "m.png", "image_path_2": "m2.png", "logps": logps},
        # images only by path: the reader falls back to image_path_*
        {"idx": 12, "question": "And now?", "resp_1_w": "Red.", "resp_1_l": "Green.", "resp_2_w": "Blue.",
         "image_1": {"bytes": None, "path": None}, "image_2": None,
         "image_path_1": "m.png", "image_path_2": "m2.png", "logps": logps},
    ]


def test_official_symmpo_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_official_rows(tmp_path)), tmp_path / "train-000.parquet")
    ds = load_dataset(str(tmp_path))  # a directory of parquet shards
    assert len(ds) == 2 and ds.records[0]["id"] == "11"
    rec = ds[1]
    assert (rec["question"], rec["chosen"], rec["rejected"], rec["contrast_chosen"]) == \
        ("And now?", "Red.", "Green.", "Blue.")
    assert np.asarray(rec["contrast_image"])[0, 0].tolist() == [30, 30, 200]
    assert rec["ref_logps"] == {"sum": [-1.0, -2.0, -3.0, -4.0, -5.0], "mean": [-.1, -.2, -.3, -.4, -.5]}


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_dataset(str(tmp_path / "x.parquet"))


def test_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _official_rows(tmp_path)[:1]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "hf"))
    loaded = load_dataset(str(tmp_path / "hf"))
    assert loaded[0]["contrast_chosen"] == "Blue."


# ----------------------------------------------------------------------------------------------
# bad records


def _good_row(tmp_path):
    _png(tmp_path / "m.png")
    _png(tmp_path / "m2.png", (0, 0, 255))
    return {"image": "m.png", "contrast_image": "m2.png", "question": "Q?", "chosen": "A.", "rejected": "B.",
            "contrast_chosen": "C."}


BAD = {
    "missing field": (lambda r: {k: v for k, v in r.items() if k != "rejected"}, "missing field 'rejected'"),
    "empty response": (lambda r: {**r, "chosen": "   "}, "field 'chosen' is empty"),
    "wrong type": (lambda r: {**r, "contrast_chosen": 3}, "must be a string, got int"),
    "missing image": (lambda r: {**r, "image": "nope.png"}, "does not exist"),
    "unreadable image": (lambda r: {**r, "contrast_image": "garbage.png"}, "cannot be decoded"),
    "image of wrong type": (lambda r: {**r, "image": 5}, "must be an image"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_record_stops_naming_file_and_record(tmp_path, kind):
    good = _good_row(tmp_path)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    mutate, message = BAD[kind]
    lines = [good, mutate(dict(good)), good]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(BadRecordError) as err:
        load_dataset(str(path))
    text = str(err.value)
    assert str(path) in text and "line 2" in text and message in text and "--skip-bad-records" in text
    ds = load_dataset(str(path), skip_bad_records=True)
    assert len(ds) == 2 and len(ds.skipped) == 1 and "line 2" in ds.skipped[0].where


def test_unparseable_lines_and_non_objects(tmp_path):
    good = _good_row(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n{broken\n[1, 2]\n\n" + json.dumps(good) + "\n")
    with pytest.raises(BadRecordError, match="line 2: not valid JSON"):
        load_dataset(str(path))
    ds = load_dataset(str(path), skip_bad_records=True)
    assert len(ds) == 2 and [s.where.split(": ")[-1] for s in ds.skipped] == ["line 2", "line 3"]
    assert "expected an object, got list" in ds.skipped[1].problem


def test_all_bad_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "Q?"}\n')
    with pytest.raises(BadRecordError, match="no usable records"):
        load_dataset(str(path), skip_bad_records=True)


def test_dpo_does_not_need_contrast_fields_but_validates_them(tmp_path):
    good = _good_row(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({k: good[k] for k in ("image", "question", "chosen", "rejected")}) + "\n"
                    + json.dumps({**good, "contrast_chosen": ""}) + "\n")
    with pytest.raises(BadRecordError, match="line 2: field 'contrast_chosen' is empty"):
        load_dataset(str(path), objective="dpo")


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_dataset(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "nope.jsonl"))
