"""Bad records (issue 14, part 2): every kind is caught when the data is read, named in one line
with its file, record and fix, or skipped and counted by kind; images are read as a hostile file
would test them.  Each case fails on the readers before this change (a traceback, a mid-run
crash with no file named, a silently wrong value, or a hang)."""

import json
import os
import re
import signal
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from symmpo_fast import cli
from symmpo_fast.formats import BadRecordError, load_dataset
from symmpo_fast.images import ImagePolicy
from symmpo_fast.models import load_processor
from symmpo_fast.train.prepare import record_check

from test_formats import _good_row, _official_rows, _png


@pytest.fixture(scope="module")
def processor():
    return load_processor()


def _load(path, processor, objective="symmpo", **kw):
    """As the trainer reads: with the checks of its processor (mDPO: its crop too)."""
    return load_dataset(str(path), objective=objective, check=record_check(processor, 0, crop=objective == "mdpo"),
                        **kw)


def _png_header(path, width, height, bit_depth=8, colour_type=0, rows=None):
    """A PNG whose IHDR says ``width`` x ``height``; ``rows`` (bytes of one scanline) fills it for real."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" + rows) for _ in range(height)) + z.flush() if rows is not None else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth,
                                                                        colour_type, 0, 0, 0))
                     + chunk(b"IDAT", idat or zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def _identical_image(tmp_path, row):
    (tmp_path / "copy.png").write_bytes((tmp_path / "m.png").read_bytes())
    return {**row, "contrast_image": "copy.png"}


def _outside(tmp_path, row):
    (tmp_path.parent / "outside").mkdir(exist_ok=True)
    _png(tmp_path.parent / "outside" / "secret.png")
    return {**row, "image": "../outside/secret.png"}


def _absolute(tmp_path, row):
    _png(tmp_path.parent / "abs.png")
    return {**row, "contrast_image": str(tmp_path.parent / "abs.png")}


def _symlink_out(tmp_path, row):
    _png(tmp_path.parent / "elsewhere.png", (5, 6, 7))
    (tmp_path / "link.png").symlink_to(tmp_path.parent / "elsewhere.png")
    return {**row, "contrast_image": "link.png"}


def _float_tiff(tmp_path, row):
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "f.tiff")
    return {**row, "image": "f.tiff"}


def _fifo(tmp_path, row):
    os.mkfifo(tmp_path / "pipe.png")
    return {**row, "image": "pipe.png"}


def _huge_png(tmp_path, row):
    # 11000 x 11000 pixels of 1 bit: 15 KB on disk, 1.5 GB once PIL has decoded and converted it.
    _png_header(tmp_path / "huge.png", 11000, 11000, bit_depth=1, rows=bytes(11000 // 8))
    return {**row, "image": "huge.png"}


def _bomb(tmp_path, row):  # above twice PIL's threshold: its DecompressionBombError at open
    _png_header(tmp_path / "bomb.png", 20000, 20000)
    return {**row, "contrast_image": "bomb.png"}


def _junk(tmp_path, row):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    return {**row, "image": "junk.png"}


def _tiny_for_mdpo(tmp_path, row):
    Image.new("RGB", (2, 2), (9, 9, 9)).save(tmp_path / "tiny.png")
    return {**row, "image": "tiny.png"}


# kind -> (objective, the bad record from a good one, what the message says)
CASES = {
    "image token in a response": ("symmpo", lambda t, r: {**r, "chosen": "It is <image> red."},
                                  "special_token", r"field 'chosen' contains '<image>'"),
    "EOS text in a response": ("dpo", lambda t, r: {**r, "rejected": "Blue.</s> Red."},
                               "special_token", r"field 'rejected' contains '</s>'"),
    "BOS text in the question": ("mdpo", lambda t, r: {**r, "question": "<s> What colour?"},
                                 "special_token", r"field 'question' contains '<s>'"),
    "chosen == rejected": ("mdpo", lambda t, r: {**r, "rejected": r["chosen"]},
                           "identical_pair", "'chosen' and 'rejected' are the same text"),
    "y_w' == y_w": ("symmpo", lambda t, r: {**r, "contrast_chosen": r["chosen"]},
                    "identical_pair", "'contrast_chosen' and 'chosen' are the same text"),
    "m' == m": ("symmpo", _identical_image, "identical_pair", "'image' and 'contrast_image' have the same pixels"),
    "mDPO image too small to crop": ("mdpo", _tiny_for_mdpo, "image_too_small", "too small for a crop"),
    "path leaving the root": ("symmpo", _outside, "image_outside_root",
                              "image path '../outside/secret.png' leaves the image root"),
    "absolute path outside": ("symmpo", _absolute, "image_outside_root", "contrast_image path '/.*' leaves the image"),
    "symbolic link out of the root": ("symmpo", _symlink_out, "image_outside_root", "path 'link.png' leaves the"),
    "FIFO as an image": ("symmpo", _fifo, "not_a_file", "is not a regular file"),
    "11000x11000 PNG": ("symmpo", _huge_png, "image_too_large", "11000x11000 = 121.0 Mpx, above max_image_pixels"),
    "decompression bomb": ("dpo", _bomb, "image_too_large", "contrast_image .*DecompressionBomb|exceeds limit"),
    "unreadable image": ("symmpo", _junk, "unreadable_image", "cannot be decoded as an image"),
    "float pixels": ("symmpo", _float_tiff, "unreadable_image", r"floating-point pixels \(mode F\)"),
}


@contextmanager
def _no_hang(seconds=20):
    """Opening a FIFO for reading blocks until a writer comes: fail instead of hanging the suite."""
    def alarm(*_):
        raise TimeoutError("the reader blocked")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_bad_record_is_named_in_one_line_or_skipped_and_counted(tmp_path, processor, case):
    objective, mutate, kind, message = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    good = _good_row(data)
    path = data / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, mutate(data, dict(good)), good)))
    with _no_hang(), pytest.raises(BadRecordError) as err:
        _load(path, processor, objective)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: line 2: ") and "; fix: " in text, text
    assert "--skip-bad-records" in text and err.value.kind == kind
    assert re.search(message, text), text
    with _no_hang():
        ds = _load(path, processor, objective, skip_bad_records=True)
    assert len(ds) == 2 and ds.skipped_by_kind() == {kind: 1} and ds.skipped[0].where == f"{path}: line 2"


def test_a_path_outside_the_root_reads_the_same_whether_or_not_it_exists(tmp_path, processor):
    (tmp_path / "d").mkdir()
    good = _good_row(tmp_path / "d")
    said = []
    for target in ("../../../../../../etc/passwd", "../../../../../../etc/no-such-file-here"):
        (tmp_path / "d" / "data.jsonl").write_text(json.dumps({**good, "image": target}) + "\n")
        with pytest.raises(BadRecordError) as err:
            _load(tmp_path / "d" / "data.jsonl", processor)
        said.append(str(err.value).replace(target, "PATH"))
    assert said[0] == said[1] and "leaves the image root" in said[0]
    # An explicit option allows it.
    (tmp_path / "outside.png").write_bytes((tmp_path / "d" / "m2.png").read_bytes())
    (tmp_path / "d" / "data.jsonl").write_text(json.dumps({**good, "contrast_image": "../outside.png"}) + "\n")
    assert len(_load(tmp_path / "d" / "data.jsonl", processor, images=ImagePolicy(allow_outside_root=True))) == 1


def test_prepare_data_copies_no_image_from_outside_the_root(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    good = _good_row(tmp_path / "d")
    _png(tmp_path / "secret.png", (1, 2, 3))
    rows = [good, {**good, "chosen": "Other.", "image": "../secret.png"}]
    (tmp_path / "d" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["prepare-data", str(tmp_path / "d" / "data.jsonl"), "--skip-bad-records", "--output",
                     str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == 1 and report["skipped_by_kind"] == {"image_outside_root": 1}
    for png in (tmp_path / "out" / "images").glob("*.png"):
        assert np.asarray(Image.open(png))[0, 0].tolist() != [1, 2, 3]
    assert cli.main(["prepare-data", str(tmp_path / "d" / "data.jsonl"), "--allow-outside-image-root"]) == 0


def test_non_utf8_bytes_name_the_line_and_skip_only_their_record(tmp_path):
    good = _good_row(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n" + json.dumps({**good, "chosen": "Rouge"}).encode()
                     .replace(b"Rouge", b"Roug\xe9") + b"\n" + json.dumps(good).encode() + b"\n")
    with pytest.raises(BadRecordError, match=r"data.jsonl: line 2: byte 0xe9 at column .* is not UTF-8; fix: "
                                             "re-encode the file as UTF-8"):
        load_dataset(str(path))
    assert load_dataset(str(path), skip_bad_records=True).skipped_by_kind() == {"not_utf8": 1}

    # mDPO's JSON: one document, records over several lines; the bad record is named with its line.
    _png(tmp_path / "a.png")
    rows = [{"img_path": "a.png", "prompt": "<image>\nColour?", "chosen": c, "rejected": "Blue."}
            for c in ("Red.", "Rouge", "Green.")]
    data = json.dumps(rows, indent=1).encode().replace(b"Rouge", b"Roug\xe9")
    line = data[: data.index(b"\xe9")].count(b"\n") + 1
    (tmp_path / "mdpo.json").write_bytes(data)
    with pytest.raises(BadRecordError, match=f"mdpo.json: record 1 \\(line {line}\\): field 'chosen' holds bytes "
                                             "that are not UTF-8"):
        load_dataset(str(tmp_path / "mdpo.json"), objective="mdpo")
    ds = load_dataset(str(tmp_path / "mdpo.json"), objective="mdpo", skip_bad_records=True)
    assert [r["chosen"] for r in ds.records] == ["Red.", "Green."] and ds.skipped_by_kind() == {"not_utf8": 1}


@pytest.mark.parametrize("bad, says", [
    (float("nan"), "entry 1 .* is nan"), (float("inf"), "entry 1 .* is inf"), (0.5, "entry 1 .* is 0.5"),
    ("short", "must hold .*15 entries .* got 14 entries"),
])
def test_reference_logps_must_be_finite_non_positive_and_complete(tmp_path, bad, says):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _official_rows(tmp_path)
    logps = json.loads(rows[0]["logps"])["logps"]
    if bad == "short":
        logps = logps[:14]
    else:
        logps[1] = bad
    rows[0]["logps"] = json.dumps({"logps": logps})  # JSON's NaN and Infinity are what Python writes
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    with pytest.raises(BadRecordError, match=f"train.parquet: record 0 \\(idx 11\\): logps {says}.*; fix: "
                                             "recompute the reference log-probs"):
        load_dataset(str(tmp_path / "train.parquet"))
    ds = load_dataset(str(tmp_path / "train.parquet"), skip_bad_records=True)
    assert len(ds) == 1 and ds.skipped_by_kind() == {"bad_ref_logps": 1}


def test_an_unreadable_parquet_shard_is_one_bad_record_and_the_others_load(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_official_rows(tmp_path)), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"")  # empty
    whole = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "c.parquet").write_bytes(whole[: len(whole) // 2])  # truncated
    with pytest.raises(BadRecordError, match=r"b.parquet: the whole shard: not a readable parquet file: .*; fix: "
                                             "re-download or remove the shard"):
        load_dataset(str(tmp_path))
    ds = load_dataset(str(tmp_path), skip_bad_records=True)
    assert len(ds) == 2 and ds.skipped_by_kind() == {"unreadable_shard": 2}


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    good = _good_row(tmp_path)
    Image.fromarray(ramp).save(tmp_path / "m.png")  # mode I;16
    (tmp_path / "data.jsonl").write_text(json.dumps(good) + "\n")
    got = np.asarray(load_dataset(str(tmp_path / "data.jsonl"))[0]["image"])
    assert got.shape == (64, 64, 3) and (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0].astype(int) - ramp / 257).max() <= 0.5  # the old reader: 99.6 % at 255
    assert (got == 255).mean() < 0.01


def test_huge_jpegs_are_downscaled_while_decoding_and_other_formats_refused(tmp_path):
    good = _good_row(tmp_path)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=90)
    photo.save(tmp_path / "photo.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({**good, "image": "photo.jpg"}) + "\n"
                                         + json.dumps({**good, "image": "photo.png"}) + "\n")
    cap = ImagePolicy(max_pixels=50_000)  # 1/2 scale is 76800 pixels, 1/4 is 19200
    ds = load_dataset(str(tmp_path / "data.jsonl"), skip_bad_records=True, images=cap)
    assert ds[0]["image"].size == (160, 120) and ds.skipped_by_kind() == {"image_too_large": 1}
    assert "photo.png is 640x480 = 0.3 Mpx, above max_image_pixels=50000" in ds.skipped[0].problem


def test_duplicates_are_reported_and_kept(tmp_path, processor, capsys):
    good = _good_row(tmp_path)
    other = {**good, "chosen": "Another."}
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, other, good)))
    ds = _load(tmp_path / "data.jsonl", processor)
    path = tmp_path / "data.jsonl"
    assert len(ds) == 3 and ds.duplicates == [(f"{path}: line 3", f"{path}: line 1")]
    assert "1 duplicate records kept" in ds.problems()
    assert cli.main(["prepare-data", str(tmp_path / "data.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["duplicates"] == 1


# ----------------------------------------------------------------------------------------------
# the trainer and prepare-data report the same


def _mixed(tmp_path):
    """16 good records and three bad ones of different kinds."""
    from symmpo_fast.formats import write_jsonl
    from symmpo_fast.synthetic import build_split

    path = write_jsonl(build_split("train", 16), tmp_path / "data")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bad = [{**rows[0], "chosen": "Yes <image>."}, {**rows[1], "rejected": rows[1]["chosen"]},
           {**rows[2], "contrast_chosen": "No.</s>"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:5] + bad + rows[5:]))
    return path


def test_training_catches_bad_records_before_the_first_step_and_reports_what_it_skipped(tmp_path, capsys):
    from symmpo_fast.train import train
    from train_helpers import config

    path = _mixed(tmp_path)
    steps = []
    # The old trainer read this file, then failed at step 1 with "record 0: 'chosen' contains the image token".
    with pytest.raises(BadRecordError, match=f"^{path}: line 6: field 'chosen' contains '<image>'"):
        train(config(tmp_path / "run", data=str(path), max_steps=1), on_step=lambda s, r: steps.append(s))
    assert steps == [] and not (tmp_path / "run").exists()

    result = train(config(tmp_path / "run", data=str(path), max_steps=1, skip_bad_records=True, micro_batch_size=4))
    expected = {"identical_pair": 1, "special_token": 2}
    assert result["bad_records"] == expected
    assert "3 bad records skipped (1 identical_pair, 2 special_token)" in capsys.readouterr().out
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["bad_records"] == 3 and {k[len("bad_records/"):]: v for k, v in row.items()
                                        if k.startswith("bad_records/")} == expected

    assert cli.main(["prepare-data", str(path), "--skip-bad-records"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_by_kind"] == expected and report["usable"] == 16
    assert [p["record"] for p in report["problems"]] == [f"{path}: line {n}" for n in (6, 7, 8)]
    assert cli.main(["prepare-data", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}: line 6: field 'chosen' contains '<image>'" in err and "; fix: " in err
