"""Preference data readers: every supported format becomes the same validated records.

A record is a dict with our field names::

    image            PIL image m
    question         str x, verbatim (one "<image>" at its start or end removed: the prompt format places the image)
    prompt           str, instead of question: the whole conversation up to the assistant's turn, used as
                     written (mDPO's JSON ships its prompts so)
    chosen           str y_w, the answer grounded in m
    rejected         str y_l, a hallucinated answer
    contrast_image   PIL image m', a minimal edit of m      (SymMPO only)
    contrast_chosen  str y_w', the answer grounded in m'     (SymMPO only)

plus ``id`` (where it came from, for messages), ``digest`` (of the content) and, when the source has them, ``ref_logps``
(``{"sum": [5], "mean": [5]}`` reference log-probs in :data:`symmpo_fast.ROLES` order) and
``meta`` (the synthetic task's ground truth).

Formats (``load_dataset(path, format="auto")``):

* ``symmpo_parquet``: the official SymMPO data set, a parquet file or a directory holding them (at
  its top or in sub-folders, as the Hub's ``data/train-*.parquet``: the train split's files, as
  ``datasets.load_dataset(DIR)["train"]`` reads them) with
  ``idx, question, resp_1_w, resp_1_l, resp_2_w, image_1, image_2`` (``{"bytes", "path"}``),
  ``image_path_1, image_path_2`` and optionally ``logps`` (JSON: 5 sums, 5 means, 5 per-token
  lists, in the official order 1_w, 1_l, 1_2, 2_w, 2_2 = our ROLES order).  Needs pyarrow.
* ``mdpo_json``: mDPO's JSON list of ``{img_path, prompt, chosen, rejected}``; a ``prompt`` that is
  already a conversation (ends with the assistant's turn, "... ASSISTANT:") is kept as ``prompt``
  and used as written, a bare one is the question.
* ``jsonl``: one JSON object a line with our field names, images as paths.
* ``hf``: a ``datasets`` data set (``hf:NAME[:SPLIT]`` or a ``save_to_disk`` directory) with
  any of the column sets above.  Needs the ``datasets`` package.

Text preference data (``load_dataset(..., images=False)``, for text-only models and DPO): JSONL,
JSON or ``datasets`` rows in TRL's columns, ``prompt`` / ``chosen`` / ``rejected``, plain strings
(the prompt used as written) or conversational lists of ``{role, content}`` messages (a row
without ``prompt`` has it extracted: the messages both answers start with), or ``question``
instead of ``prompt`` (put in the model's chat template).  A row with none of the image columns
is a text row.

Every record is validated before training starts: a missing field, a wrong type, an empty
response, or a missing or unreadable image stops with :class:`BadRecordError` naming the file and
the record, unless ``skip_bad_records`` is set, in which case it is skipped and counted in
``dataset.skipped``.  Nothing is ever silently replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from .prompts import is_conversation

TEXT_FIELDS = ("question", "prompt", "chosen", "rejected", "contrast_chosen")
IMAGE_FIELDS = ("image", "contrast_image")
REQUIRED = {
    "symmpo": ("image", "question", "chosen", "rejected", "contrast_image", "contrast_chosen"),
    "mdpo": ("image", "question", "chosen", "rejected"),
    "dpo": ("image", "question", "chosen", "rejected"),
}
FORMATS = ("symmpo_parquet", "mdpo_json", "jsonl", "hf")
IMAGE_PLACEHOLDER = "<image>"
# Any of these columns makes a row a vision-language record; rows with none are text records.
_IMAGE_KEYS = ("image", "contrast_image", "img_path", "image_1", "image_2", "image_path_1", "image_path_2", "images")
# How `datasets.load_dataset(DIR)` names a split in a file's path (its default split patterns).
_SPLIT_WORDS = {"train": ("train", "training"), "test": ("test", "testing", "eval", "evaluation"),
                "validation": ("validation", "valid", "val", "dev")}
_SPLIT = {split: re.compile(r"(?:^|[-._ 0-9/])(?:" + "|".join(words) + r")(?:[-._ 0-9/]|$)")
          for split, words in _SPLIT_WORDS.items()}


class BadRecordError(ValueError):
    """A record that cannot be trained on; the message names the file and the record."""


@dataclass(frozen=True)
class Skipped:
    where: str
    problem: str


# ----------------------------------------------------------------------------------------------
# images


def _image_source(value, field: str, base: Path | None) -> bytes | str | Image.Image:
    """Normalise the ways a format stores an image: PIL, bytes, a path, or ``{"bytes", "path"}``."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _image_source(value["path"], field, base)
        raise ValueError(f"{field} has neither bytes nor a path")
    if isinstance(value, (str, os.PathLike)):
        if not str(value).strip():
            raise ValueError(f"{field} is an empty path")
        path = Path(value)
        return str(path if path.is_absolute() or base is None else base / path)
    raise ValueError(f"{field} must be an image, bytes, a path or {{bytes, path}}, got {type(value).__name__}")


def open_image(source: bytes | str | Image.Image) -> Image.Image:
    """Decode fully (a truncated file fails here, not in the middle of training) to RGB."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return im.convert("RGB")


def _pixels_digest(image: Image.Image) -> str:
    """Of the decoded pixels, so that the same picture hashes the same from a file, bytes or memory."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# column sets -> our fields


def _official_logps(raw) -> dict[str, list[float]]:
    """The official ``logps`` column, a JSON list of 15 (or ``{"logps": [...]}``): 5 sums, 5 means, 5 lists."""
    value = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    if isinstance(value, dict):
        value = value.get("logps")
    if not isinstance(value, (list, tuple)) or len(value) < 10:
        raise ValueError("logps must hold 5 sums and 5 means (the official format's 15 entries)")
    return {"sum": [float(v) for v in value[:5]], "mean": [float(v) for v in value[5:10]]}


def _common_messages(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _text_row(row: dict) -> dict:
    """Text preference data in TRL's columns: ``prompt`` (a string used as written, or a list of
    messages), ``chosen``, ``rejected`` (strings or lists of messages), or ``question`` (put in the
    chat template); conversational rows without ``prompt`` have it extracted as TRL does: the
    messages ``chosen`` and ``rejected`` start with in common."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    out: dict = {}
    if row.get("question") is not None:
        out["question"] = row["question"]
    elif prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        n = _common_messages(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if "question" not in out:
        out["prompt"] = prompt
    out.update(chosen=chosen, rejected=rejected)
    if row.get("id") is not None:
        out["id"] = str(row["id"])
    return out


def normalise_row(row: dict, base: Path | None) -> dict:
    """Map any supported column set to our field names (values not yet validated)."""
    if not any(k in row for k in _IMAGE_KEYS):  # text: TRL's prompt / chosen / rejected, plain or conversational
        out = _text_row(row)
        out["_base"] = base
        return out
    if "resp_1_w" in row:  # official SymMPO
        out = {"question": row.get("question"), "chosen": row.get("resp_1_w"), "rejected": row.get("resp_1_l"),
               "contrast_chosen": row.get("resp_2_w")}
        for ours, col, path_col in (("image", "image_1", "image_path_1"),
                                    ("contrast_image", "image_2", "image_path_2")):
            value = row.get(col)
            if not value or (isinstance(value, dict) and not value.get("bytes") and not value.get("path")):
                value = row.get(path_col)
            out[ours] = value
        if row.get("logps") is not None:
            out["ref_logps_official"] = row["logps"]
        if row.get("idx") is not None:
            out["id"] = str(row["idx"])
    elif "img_path" in row or "prompt" in row:  # mDPO
        prompt = row.get("prompt")
        # mDPO ships the whole conversation ("A chat ... USER: <image>\n{q} ASSISTANT:"): used as
        # written, never wrapped in the template again; a bare question is a question.
        key = "prompt" if isinstance(prompt, str) and is_conversation(prompt) else "question"
        out = {"image": row.get("img_path"), key: prompt, "chosen": row.get("chosen"), "rejected": row.get("rejected")}
    else:  # ours
        out = {k: row.get(k) for k in (*TEXT_FIELDS, *IMAGE_FIELDS)}
        for k in ("id", "meta"):
            if row.get(k) is not None:
                out[k] = row[k]
    out["_base"] = base
    return out


def _messages(value, field: str, roles: tuple[str, ...]) -> list[dict]:
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in value):
        raise ValueError(f"field {field!r} must be a non-empty list of {{role, content}} messages with string content")
    bad = [m["role"] for m in value if m["role"] not in roles]
    if bad:
        raise ValueError(f"field {field!r} has a message of role {bad[0]!r}; expected one of {roles}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def validate_text(row: dict, where: str) -> dict:
    """One validated text record (DPO): ``prompt`` or ``question``, ``chosen``, ``rejected``."""
    if "_error" in row:
        raise BadRecordError(f"{where}: {row['_error']}")
    rec: dict = {"id": str(row.get("id", where))}
    try:
        if any(row.get(k) is not None for k in IMAGE_FIELDS):
            raise ValueError("the record has an image, which a text-only model cannot see: train a vision-language "
                             "model on it, or give text data")
        lead = "question" if row.get("question") is not None else "prompt"
        for k in (lead, "chosen", "rejected"):
            v = row.get(k)
            if v is None:
                raise ValueError(f"missing field {k!r}" + (" (or 'question')" if k == "prompt" else ""))
            if isinstance(v, list) and k != "question":
                v = _messages(v, k, ("system", "user", "assistant", "tool") if k == "prompt" else ("assistant",))
            elif not isinstance(v, str):
                raise ValueError(f"field {k!r} must be a string{'' if k == 'question' else ' or a list of messages'}, "
                                 f"got {type(v).__name__}")
            elif not v.strip():
                raise ValueError(f"field {k!r} is empty")
            rec[k] = v
    except ValueError as e:
        raise BadRecordError(f"{where}: {e}") from None
    rec["digest"] = content_digest(rec)
    return rec


def validate(row: dict, objective: str, where: str) -> dict:
    """One validated record (images as sources, not yet decoded); raises BadRecordError."""
    if "_error" in row:
        raise BadRecordError(f"{where}: {row['_error']}")
    required = REQUIRED[objective]
    base = row.get("_base")
    rec: dict = {"id": str(row.get("id", where))}
    digests: dict[str, str] = {}
    try:
        for k in TEXT_FIELDS:
            v = row.get(k)
            if v is None:
                if k in required and not (k == "question" and row.get("prompt") is not None):
                    raise ValueError(f"missing field {k!r}")
                continue
            if not isinstance(v, str):
                raise ValueError(f"field {k!r} must be a string, got {type(v).__name__}")
            if k == "question":
                v = _question(v)
            elif k == "prompt" and v.count(IMAGE_PLACEHOLDER) != 1:
                raise ValueError(f"field 'prompt' holds the whole conversation and must place {IMAGE_PLACEHOLDER!r} "
                                 f"once, found {v.count(IMAGE_PLACEHOLDER)}")
            if not v.strip():
                raise ValueError(f"field {k!r} is empty")
            rec[k] = v
        for k in IMAGE_FIELDS:
            v = row.get(k)
            if v is None or (isinstance(v, str) and not v and k not in required):
                if k in required:
                    raise ValueError(f"missing field {k!r}")
                continue
            src = _image_source(v, k, base)
            try:
                im = open_image(src)
            except FileNotFoundError:
                raise ValueError(f"{k} file {src} does not exist") from None
            except (UnidentifiedImageError, OSError, ValueError) as e:
                shown = src if isinstance(src, str) else f"({len(src)} bytes)" if isinstance(src, bytes) else ""
                raise ValueError(f"{k} {shown} cannot be decoded as an image: {e}") from None
            if min(im.size) < 1:
                raise ValueError(f"{k} is empty ({im.size[0]}x{im.size[1]})")
            rec[k] = src
            digests[k] = _pixels_digest(im)
        if "ref_logps_official" in row:
            rec["ref_logps"] = _official_logps(row["ref_logps_official"])
        if "meta" in row:
            rec["meta"] = row["meta"]
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise BadRecordError(f"{where}: {e}") from None
    rec["digest"] = content_digest(rec, digests)
    return rec


def _question(text: str) -> str:
    """The question verbatim, as the official code uses it, less one image placeholder at its
    start or end (LLaVA data puts "<image>\\n" there; the prompt format places the image)."""
    if text.startswith(IMAGE_PLACEHOLDER):
        text = text[len(IMAGE_PLACEHOLDER):].removeprefix("\n")
    elif text.endswith(IMAGE_PLACEHOLDER):
        text = text[: -len(IMAGE_PLACEHOLDER)].removesuffix("\n")
    if IMAGE_PLACEHOLDER in text:
        raise ValueError(f"field 'question' holds {IMAGE_PLACEHOLDER!r} inside its text; only one at its start or "
                         "end is understood (the prompt format places the image)")
    return text


def content_digest(rec: dict, image_digests: dict[str, str] | None = None) -> str:
    """Hash of a record's texts and decoded image pixels: the data set's fingerprint is built from it."""
    h = hashlib.sha256()
    for k in TEXT_FIELDS:
        value = rec.get(k, "")
        h.update(f"{k}\0{value if isinstance(value, str) else json.dumps(value, sort_keys=True)}\0".encode())
    for k in IMAGE_FIELDS:
        if k in rec:
            h.update(((image_digests or {}).get(k) or _pixels_digest(open_image(rec[k]))).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# the data set


class PreferenceDataset:
    """Validated records; ``dataset[i]`` decodes its images.  ``skipped`` lists what was skipped and why."""

    def __init__(self, records: list[dict], source: str, skipped: list[Skipped] | None = None):
        self.records = records
        self.source = source
        self.skipped = skipped or []
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = dict(self.records[i])
        for k in IMAGE_FIELDS:
            if k in rec:
                try:
                    rec[k] = open_image(rec[k])
                except (OSError, UnidentifiedImageError) as e:
                    raise BadRecordError(f"{self.source}: record {rec['id']}: {k} became unreadable: {e}") from None
        return rec

    def fingerprint(self) -> str:
        """Order-sensitive hash of every record's content (texts and image bytes)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for rec in self.records:
                h.update((rec.get("digest") or content_digest(rec)).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def has_fields(self, fields: Iterable[str]) -> bool:
        return all(all(f in r for f in fields) for r in self.records)


def _collect(rows: Iterator[tuple[str, dict]], source: str, objective: str, skip_bad_records: bool,
             max_records: int, images: bool = True) -> PreferenceDataset:
    if objective not in REQUIRED:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(REQUIRED)}")
    if not images and objective != "dpo":
        raise ValueError(f"objective {objective!r} needs images; text data trains with objective dpo")
    records, skipped = [], []
    for where, row in rows:
        try:
            records.append(validate(row, objective, where) if images else validate_text(row, where))
        except BadRecordError as e:
            if not skip_bad_records:
                raise BadRecordError(f"{e} (pass --skip-bad-records to skip bad records and count them)") from None
            skipped.append(Skipped(where, str(e)))
        if max_records and len(records) >= max_records:
            break
    if not records:
        raise BadRecordError(f"{source}: no usable records" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return PreferenceDataset(records, source, skipped)


# ----------------------------------------------------------------------------------------------
# readers: each yields (where, row with our field names)


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading the official SymMPO parquet needs pyarrow: pip install pyarrow") from None
    files = parquet_files(path) if path.is_dir() else [path]
    for file in files:
        i = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                idx = f" (idx {row['idx']})" if row.get("idx") is not None else ""
                yield f"{file}: record {i}{idx}", normalise_row(row, file.parent)
                i += 1


def parquet_files(directory: Path) -> list[Path]:
    """The train split's parquet files under ``directory``, as ``datasets.load_dataset(DIR)["train"]``
    finds them: at the top or in sub-folders (the Hub's ``data/train-00000-of-00002.parquet``);
    where file or folder names name splits, only the train split's."""
    files = sorted(p for p in directory.rglob("*.parquet")
                   if not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise FileNotFoundError(f"{directory}: no .parquet files in it or its sub-folders")
    named = {split: [p for p in files if rx.search(p.relative_to(directory).as_posix())]
             for split, rx in _SPLIT.items()}
    if any(named.values()):
        if not named["train"]:
            raise FileNotFoundError(f"{directory}: its parquet files name only the splits "
                                    f"{[s for s, f in named.items() if f]}, no train split")
        return named["train"]
    return files


def _read_json(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadRecordError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise BadRecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            yield f"{path}: record {i}", {"_error": f"expected an object, got {type(row).__name__}"}
            continue
        yield f"{path}: record {i}", normalise_row(row, path.parent)


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path) as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            where = f"{path}: line {i + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, {"_error": f"not valid JSON: {e}"}
                continue
            if not isinstance(row, dict):
                yield where, {"_error": f"expected an object, got {type(row).__name__}"}
                continue
            yield where, normalise_row(row, path.parent)


def _read_hf(spec: str) -> tuple[str, Iterator[tuple[str, dict]]]:
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a `datasets` data set needs the datasets package: pip install datasets") from None
    name = spec[3:] if spec.startswith("hf:") else spec
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        split = "train"
    else:
        name, _, split = name.partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        split = split or "train"
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    base = Path(name) if Path(name).is_dir() else None

    def rows():
        for i, row in enumerate(ds):
            yield f"{spec}: record {i}", normalise_row(row, base)

    return spec, rows()


def detect_format(path: str) -> str:
    if path.startswith("hf:"):
        return "hf"
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "hf"
        if any(p.rglob("*.parquet")):
            return "symmpo_parquet"
        raise ValueError(f"{path}: a directory with neither .parquet files nor a saved `datasets` data set")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return "symmpo_parquet"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "mdpo_json"
    raise ValueError(f"{path}: cannot tell the format from the name; set data_format to one of {', '.join(FORMATS)}")


def load_dataset(path: str, format: str = "auto", objective: str = "symmpo", image_root: str = "",
                 skip_bad_records: bool = False, max_records: int = 0, images: bool = True) -> PreferenceDataset:
    """Read and validate a preference data set; see the module docstring for the formats.
    ``images=False``: text preference data for a text-only model (DPO)."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "hf":
        source, rows = _read_hf(path)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"data {path} does not exist")
        source = str(p)
        reader = {"symmpo_parquet": _read_parquet, "mdpo_json": _read_json, "jsonl": _read_jsonl}.get(fmt)
        if reader is None:
            raise ValueError(f"unknown data format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
        rows = reader(p)
    if image_root:
        rows = ((w, {**r, "_base": Path(image_root)}) for w, r in rows)
    return _collect(rows, source, objective, skip_bad_records, max_records, images)


def write_jsonl(dataset: PreferenceDataset, out_dir: str | Path, name: str = "data.jsonl") -> Path:
    """Our JSONL format with the images written as PNG files beside it (``images/``)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / name
    with open(path, "w") as fh:
        for i in range(len(dataset)):
            rec = dataset[i]
            row = {k: rec[k] for k in TEXT_FIELDS if k in rec}
            row["id"] = rec["id"]
            for k in IMAGE_FIELDS:
                if k in rec:
                    rel = f"images/{i:06d}_{k}.png"
                    rec[k].save(out / rel)
                    row[k] = rel
            if "meta" in rec:
                row["meta"] = rec["meta"]
            fh.write(json.dumps(row) + "\n")
    return path
