"""Bad records (issue 14, part 2): every kind is caught when the data is read, named in one line
with its file, record and fix, or skipped and counted by kind; images are read as a hostile file
would test them.  Each case fails on the readers before this change (a traceback, a mid-run
crash with no file named, a silently wrong value, or a hang)."""

import json
import os
import re
import signal
import struct
import threading
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


def _bomb(tmp_path, row):  # above twice PIL's threshold, where PIL raised DecompressionBombError at open
    _png_header(tmp_path / "bomb.png", 20000, 20000)
    return {**row, "contrast_image": "bomb.png"}


def _thin(tmp_path, row):
    # 1 x 100000 pixels, 0.1 Mpx in a few hundred bytes: a processor resizing its short side to
    # 336 px (LLaVA-1.5) would make it 336 x 33.6 M pixels (~34 GB) in the middle of a run.
    _png_header(tmp_path / "thin.png", 1, 100000, rows=b"\x00")
    return {**row, "image": "thin.png"}


def _nul(tmp_path, row):
    return {**row, "contrast_image": "m2\u0000.png"}


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
    "decompression bomb": ("dpo", _bomb, "image_too_large", "contrast_image .*bomb.png is 20000x20000 = 400.0 Mpx, "
                                                            "above max_image_pixels"),
    "1x100000 PNG": ("symmpo", _thin, "image_aspect_ratio", r"thin.png is 1x100000, an aspect ratio of 100000:1, "
                                                             r"above max_image_aspect_ratio=200"),
    "<image> inside the question": ("symmpo", lambda t, r: {**r, "question": "Is <image> red?"}, "image_placeholder",
                                    "field 'question' holds '<image>' inside its text"),
    "a conversation with two images": ("mdpo", lambda t, r: {"img_path": r["image"], "chosen": "A.", "rejected": "B.",
                                                             "prompt": "USER: <image>\n<image>\nQ? ASSISTANT:"},
                                       "image_placeholder", "must place '<image>' once, found 2"),
    "NUL byte in a path": ("symmpo", _nul, "missing_image", r"contrast_image path 'm2\\x00.png' holds a NUL byte"),
    "unreadable image": ("symmpo", _junk, "unreadable_image", "cannot be decoded as an image"),
    "float pixels": ("symmpo", _float_tiff, "unreadable_image", r"floating-point pixels \(mode F\)"),
}


@contextmanager
def _no_hang(seconds=20, fifos=()):
    """Opening a FIFO for reading blocks until a writer comes: fail instead of hanging the suite.
    A blocking open in Python is interrupted by the alarm; one in C++ (pyarrow) retries through
    it, so after ``seconds`` a writer opens each of ``fifos`` (which releases a blocked reader) and
    the test fails."""
    def alarm(*_):
        raise TimeoutError("the reader blocked")

    released, done = [], threading.Event()

    def release():
        if not done.wait(seconds):
            for fifo in fifos:
                try:  # succeeds only while a reader waits in open()
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    released.append(fifo)
                except OSError:
                    pass

    watchdog = threading.Thread(target=release, daemon=True)
    watchdog.start()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds + 5)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        done.set()
        watchdog.join()
    assert not released, f"the reader blocked on {released}"


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


def test_a_checks_own_error_is_a_bad_record_of_kind_invalid(tmp_path):
    good = _good_row(tmp_path)
    (tmp_path / "data.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": "Boom."}) + "\n")

    def check(rec):  # as the collator raising on a record it does not expect
        if rec["chosen"] == "Boom.":
            raise ValueError("unexpected")

    with pytest.raises(BadRecordError, match=r"data.jsonl: line 2: unexpected; fix: correct or remove the record"):
        load_dataset(str(tmp_path / "data.jsonl"), check=check)
    assert load_dataset(str(tmp_path / "data.jsonl"), check=check, skip_bad_records=True).skipped_by_kind() == {
        "invalid": 1}


def test_a_path_outside_the_root_reads_the_same_whether_or_not_it_exists(tmp_path, processor):
    root = tmp_path / "d"
    root.mkdir()
    good = _good_row(root)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "file").write_text("x")
    (tmp_path / "outside" / "dir").mkdir()
    back_in = "../../" + "/".join(root.parts[1:]) + "/m.png"  # from the file system's root back to d/m.png
    deep = "../" * (len(root.parts) + 2)
    targets = [f"{deep}etc/passwd", f"{deep}etc/no-such-file-here",
               # Through something outside that exists as a file, as a directory, or not at all, back
               # into the root: the old check folded ".." textually (os.path.realpath), then opened the
               # path as written, which the kernel resolves for real: "Not a directory", "does not
               # exist", or (through a directory) the record accepted.
               f"../outside/file/{back_in}", f"../outside/dir/{back_in}", f"../outside/nothing/{back_in}",
               f"{deep}etc/passwd/{back_in}", str(tmp_path / "outside" / "dir") + "/../../d/m.png"]
    said = []
    for target in targets:
        (root / "data.jsonl").write_text(json.dumps({**good, "image": target}) + "\n")
        with pytest.raises(BadRecordError) as err:
            _load(root / "data.jsonl", processor)
        said.append(str(err.value).replace(repr(target), "PATH"))
        assert err.value.kind == "image_outside_root", said[-1]
    assert len(set(said)) == 1 and "image path PATH leaves the image root" in said[0], said
    # Inside the root, links are followed (an absolute one too) and what is opened is what was checked.
    (root / "sub").mkdir()
    (root / "sub" / "rel.png").symlink_to("../m.png")
    (root / "abs.png").symlink_to(root / "m2.png")
    rows = [{**good, "image": "sub/rel.png", "contrast_image": str(root / "abs.png")},
            {**good, "image": "./sub/./rel.png", "contrast_image": "sub/../m2.png", "chosen": "Other."}]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = _load(root / "data.jsonl", processor)
    assert ds.records[0]["image"] == str(root / "m.png") and ds.records[0]["contrast_image"] == str(root / "m2.png")
    assert [ds.records[1][k] for k in ("image", "contrast_image")] == [str(root / "m.png"), str(root / "m2.png")]
    # An explicit option allows leaving the root.
    (tmp_path / "outside.png").write_bytes((root / "m2.png").read_bytes())
    (root / "data.jsonl").write_text(json.dumps({**good, "contrast_image": "../outside.png"}) + "\n")
    assert len(_load(root / "data.jsonl", processor, images=ImagePolicy(allow_outside_root=True))) == 1


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


def test_hostile_json_is_a_bad_record_naming_its_line_never_a_traceback(tmp_path):
    good = _good_row(tmp_path)
    deep = {"a": 1}
    for _ in range(900):  # parses (json's own limit is near 1000 levels) but a recursive walk of it overflows
        deep = [deep]
    lines = [json.dumps(good), "[" * 200000, json.dumps({**good, "chosen": "Red."})[:-1] + ', "n": ' + "9" * 5000 + "}",
             json.dumps({**good, "chosen": "Deep.", "meta": deep}), json.dumps({**good, "chosen": "Last."})]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    # The old reader: RecursionError, then ValueError (int's 4300-digit limit), naming no line.
    with pytest.raises(BadRecordError, match=r"data.jsonl: line 2: not valid JSON: nested too deeply to parse; "
                                             "fix: repair the line"):
        load_dataset(str(path))
    ds = load_dataset(str(path), skip_bad_records=True)
    assert len(ds) == 3 and ds.skipped_by_kind() == {"invalid_json": 2}
    assert "line 3" in ds.skipped[1].where and "4300" in ds.skipped[1].problem

    (tmp_path / "mdpo.json").write_text("[" * 200000)
    with pytest.raises(BadRecordError, match=r"mdpo.json: not valid JSON: nested too deeply"):
        load_dataset(str(tmp_path / "mdpo.json"), objective="mdpo")


@pytest.mark.parametrize("logps", ["[" * 200000, "[" + "9" * 5000 + "]"])
def test_hostile_json_in_the_parquet_logps_column_is_a_bad_record(tmp_path, logps):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _official_rows(tmp_path)
    rows[1]["logps"] = logps
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    with pytest.raises(BadRecordError, match=r"train.parquet: record 1 \(idx 12\): logps is not valid JSON: "
                                             "(nested too deeply|.*4300)"):
        load_dataset(str(tmp_path / "train.parquet"))
    assert load_dataset(str(tmp_path / "train.parquet"), skip_bad_records=True).skipped_by_kind() == {"bad_ref_logps": 1}


def test_an_mdpo_json_with_a_byte_order_mark_reads_as_jsonl_does(tmp_path):
    _png(tmp_path / "a.png")
    rows = [{"img_path": "a.png", "prompt": "<image>\nColour?", "chosen": "Red.", "rejected": "Blue."}]
    (tmp_path / "mdpo.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())  # the old reader: refused
    (tmp_path / "ours.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({**rows[0], "question": "Colour?"}).encode())
    assert [r["chosen"] for r in load_dataset(str(tmp_path / "mdpo.json"), objective="mdpo").records] == ["Red."]
    assert len(load_dataset(str(tmp_path / "ours.jsonl"), objective="mdpo")) == 1


def test_a_fifo_among_parquet_shards_is_a_bad_record_not_a_hang(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_official_rows(tmp_path)), tmp_path / "a.parquet")
    fifo = tmp_path / "b.parquet"
    os.mkfifo(fifo)  # pq.ParquetFile(path) opened it blocking: the old reader hung here
    with _no_hang(fifos=[fifo]), pytest.raises(BadRecordError, match=r"b.parquet: the whole shard: parquet shard .* "
                                                                     "is not a regular file"):
        load_dataset(str(tmp_path))
    with _no_hang(fifos=[fifo]):
        ds = load_dataset(str(tmp_path), skip_bad_records=True)
    assert len(ds) == 2 and ds.skipped_by_kind() == {"not_a_file": 1}
    # The data file itself, too.
    os.mkfifo(tmp_path / "pipe.jsonl")
    with _no_hang(fifos=[tmp_path / "pipe.jsonl"]), pytest.raises(ValueError, match="pipe.jsonl is not a regular file"):
        load_dataset(str(tmp_path / "pipe.jsonl"))


def _flat_jpeg(width: int, height: int) -> bytes:
    """A valid baseline greyscale JPEG of ``width`` x ``height`` grey pixels in width * height / 256
    bytes (each 8x8 block is 2 bits: DC difference 0 and end of block, one-code Huffman tables),
    so that a 196-Mpx photo costs no 196 MB to make."""
    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    one_code = bytes([1] + [0] * 15) + b"\x00"  # one code of length 1, for the symbol 0
    blocks = -(-width // 8) * -(-height // 8)
    return (b"\xff\xd8" + segment(0xDB, bytes(1) + bytes([1] * 64))
            + segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0]))
            + segment(0xC4, b"\x00" + one_code + b"\x10" + one_code)
            + segment(0xDA, bytes([1, 1, 0, 0, 63, 0])) + bytes(-(-2 * blocks // 8)) + b"\xff\xd9")


def test_max_image_pixels_replaces_pils_own_limit(tmp_path, monkeypatch):
    good = _good_row(tmp_path)
    # 14000 x 14000 = 196 Mpx, above PIL's 178.9-Mpx DecompressionBombError: the old reader refused
    # it instead of decoding it at 1/4 scale (3500 x 3500 = 12.25 Mpx <= 25 Mpx).
    (tmp_path / "photo.jpg").write_bytes(_flat_jpeg(14000, 14000))
    (tmp_path / "data.jsonl").write_text(json.dumps({**good, "image": "photo.jpg"}) + "\n")
    image = load_dataset(str(tmp_path / "data.jsonl"))[0]["image"]
    assert image.size == (3500, 3500) and image.getpixel((0, 0)) == (128, 128, 128)
    # Any format: with PIL's limit lowered to 1000 pixels (errors above 2000), a 64x64 PNG under
    # max_image_pixels still reads, and PIL's limit is left as it was.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (64, 64), (9, 8, 7)).save(tmp_path / "m.png")
    (tmp_path / "data.jsonl").write_text(json.dumps(good) + "\n")
    assert load_dataset(str(tmp_path / "data.jsonl"))[0]["image"].getpixel((0, 0)) == (9, 8, 7)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(BadRecordError, match="64x64 = 0.0 Mpx, above max_image_pixels=4000"):
        load_dataset(str(tmp_path / "data.jsonl"), images=ImagePolicy(max_pixels=4000))


def test_the_aspect_ratio_bound_is_an_option(tmp_path):
    good = _good_row(tmp_path)
    _png_header(tmp_path / "wide.png", 400, 2, rows=bytes(400))  # 200:1, at the bound
    _png_header(tmp_path / "wider.png", 402, 2, rows=bytes(402))  # 201:1
    (tmp_path / "data.jsonl").write_text(json.dumps({**good, "image": "wide.png"}) + "\n"
                                         + json.dumps({**good, "image": "wider.png", "chosen": "Other."}) + "\n")
    ds = load_dataset(str(tmp_path / "data.jsonl"), skip_bad_records=True)
    assert len(ds) == 1 and ds.skipped_by_kind() == {"image_aspect_ratio": 1} and "wider.png" in ds.skipped[0].problem
    assert len(load_dataset(str(tmp_path / "data.jsonl"), images=ImagePolicy(max_aspect_ratio=201))) == 2
    with pytest.raises(ValueError, match="max_image_aspect_ratio must be a finite number >= 1"):
        ImagePolicy(max_aspect_ratio=0.5)


def test_a_record_too_long_to_keep_is_a_bad_record_when_read(tmp_path, processor, capsys):
    """With the tiny processor a short record is 67 tokens; at max_length=100 a long answer does not
    fit unless the responses are cut (truncation=right), a long question fits only by cutting it
    (truncation=question).  The old reader passed both; the collator dropped them mid-run, and a
    step whose records were all dropped stopped the run naming none, skip or not."""
    good = _good_row(tmp_path)
    rows = [good, {**good, "chosen": " ".join(["word"] * 50)}, {**good, "question": " ".join(["why"] * 50) + "?"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def load(truncation, **kw):
        collate = dict(max_length=100, truncation=truncation)
        return load_dataset(str(path), check=record_check(processor, 0, False, "symmpo", collate), **kw)

    with pytest.raises(BadRecordError, match=r"data.jsonl: line 2: its longest sequence is 214 tokens \(prompt 63, "
                                             r"image tokens included\), above max_length=100 with truncation=drop; fix: "
                                             "raise max_length, or set truncation=right .* or truncation=question"):
        load("drop")
    skipped = {t: [(s.where[-6:], s.kind) for s in load(t, skip_bad_records=True).skipped] for t in TRUNCATIONS}
    assert skipped == {"drop": [("line 2", "too_long"), ("line 3", "too_long")],
                       "question": [("line 2", "too_long")],  # cutting the question cannot save a long answer
                       "right": [("line 3", "too_long")]}  # its prompt alone is 212 tokens
    with pytest.raises(BadRecordError, match="line 3: .* with truncation=right; fix: raise max_length: its prompt "
                                             "alone"):
        load("right")
    # prepare-data with --model finds them as training does; without one it cannot know the lengths.
    assert cli.main(["prepare-data", str(path), "--model", "tiny", "--max-length", "100", "--truncation", "question",
                     "--skip-bad-records"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_by_kind"] == {"too_long": 1}
    assert cli.main(["prepare-data", str(path), "--skip-bad-records"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 0


TRUNCATIONS = ("drop", "question", "right")


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
    """16 good records and four bad ones of different kinds (the last too long for max_length=256)."""
    from symmpo_fast.formats import write_jsonl
    from symmpo_fast.synthetic import build_split

    path = write_jsonl(build_split("train", 16), tmp_path / "data")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bad = [{**rows[0], "chosen": "Yes <image>."}, {**rows[1], "rejected": rows[1]["chosen"]},
           {**rows[2], "contrast_chosen": "No.</s>"}, {**rows[3], "rejected": " ".join(["word"] * 100)}]
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
    from symmpo_fast.train.refcache import precompute

    with pytest.raises(BadRecordError, match=f"^{path}: line 6: field 'chosen' contains '<image>'"):
        precompute(config(tmp_path / "ref", data=str(path), reference="cache"))  # the same checks

    result = train(config(tmp_path / "run", data=str(path), max_steps=1, skip_bad_records=True, micro_batch_size=4))
    expected = {"identical_pair": 1, "special_token": 2, "too_long": 1}
    assert result["bad_records"] == expected and "dropped" not in result["last"]  # the collator drops nothing
    assert "4 bad records skipped (1 identical_pair, 2 special_token, 1 too_long)" in capsys.readouterr().out
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["bad_records"] == 4 and {k[len("bad_records/"):]: v for k, v in row.items()
                                        if k.startswith("bad_records/")} == expected

    same_model = ["--model", "tiny", "--max-length", "256"]  # the lengths are the model's
    assert cli.main(["prepare-data", str(path), "--skip-bad-records", *same_model]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_by_kind"] == expected and report["usable"] == 16
    assert [p["record"] for p in report["problems"]] == [f"{path}: line {n}" for n in (6, 7, 8, 9)]
    assert cli.main(["prepare-data", str(path), *same_model]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}: line 6: field 'chosen' contains '<image>'" in err and "; fix: " in err
