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
* ``jsonl``: one JSON object a line with our field names, images as paths.  (JSON and JSONL
  alike: a leading UTF-8 byte-order mark is skipped.)
* ``hf``: a ``datasets`` data set (``hf:NAME[:SPLIT]`` or a ``save_to_disk`` directory) with
  any of the column sets above.  Needs the ``datasets`` package.

Text preference data (``load_dataset(..., text_only=True)``, for text-only models and DPO): JSONL,
JSON or ``datasets`` rows in TRL's columns, ``prompt`` / ``chosen`` / ``rejected``, plain strings
(the prompt used as written) or conversational lists of ``{role, content}`` messages (a row
without ``prompt`` has it extracted: the messages both answers start with), or ``question``
instead of ``prompt`` (put in the model's chat template).  A row with none of the image columns
is a text row.

Every record is validated when it is read, before training starts: a line that is not JSON
(also one nested past Python's recursion limit, or an integer past its 4300-digit limit), a
missing field, a wrong type, an empty response, text that is not UTF-8, ``chosen`` equal to
``rejected``, reference log-probs that are not finite and <= 0, a missing, unreadable, oversized,
too thin or out-of-root image (:mod:`symmpo_fast.images`), and whatever the trainer's ``check``
adds (its tokenizer's special tokens in a text, mDPO's crop of a tiny image, a record too long for
``max_length``) stop with a one-line :class:`BadRecordError` naming the file, the record and the
fix, unless ``skip_bad_records`` is set, in which case the record is skipped and counted by kind
(``dataset.skipped``).  Duplicate records (the same texts and pixels as an earlier one) are kept
and listed in ``dataset.duplicates``.  An unreadable parquet shard (or a FIFO among them: every
data file is opened non-blocking and must be a regular file) is one bad "record": skipping it
keeps the directory's other shards.  Nothing is ever silently replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from .images import ImagePolicy, RecordProblem, open_image, open_regular, pixels_digest, resolve
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


SKIP_HINT = "pass --skip-bad-records to skip bad records and count them"
# Lone surrogates: what undecodable bytes become under "surrogateescape", or a JSON "\\udc80" escape.
_SURROGATE = re.compile("[\ud800-\udfff]")
_UTF8_FIX = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


class BadRecordError(ValueError):
    """A record that cannot be trained on; the one-line message names the file, the record and the fix."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Skipped:
    where: str
    problem: str
    kind: str = "invalid"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------
# images


def _image_source(value, field: str, base: Path | None, policy: ImagePolicy) -> bytes | str | Image.Image:
    """Normalise the ways a format stores an image: PIL, bytes, a path (confined to ``base``), or
    ``{"bytes", "path"}``."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _image_source(value["path"], field, base, policy)
        raise RecordProblem("missing_image", f"{field} has neither bytes nor a path", "give the image")
    if isinstance(value, (str, os.PathLike)):
        return resolve(value, field, base, policy)
    raise RecordProblem("wrong_type", f"{field} must be an image, bytes, a path or {{bytes, path}}, got "
                        f"{type(value).__name__}", "store the image as a path or as encoded bytes")


# ----------------------------------------------------------------------------------------------
# column sets -> our fields


_LOGPS_FIX = "recompute the reference log-probs, or train with --reference adapter, copy or cache"


def _official_logps(raw) -> dict[str, list[float]]:
    """The official ``logps`` column, a JSON list of 15 (or ``{"logps": [...]}``): 5 sums, 5 means, 5
    per-token lists, in ROLES order.  Log-probs are finite and <= 0: anything else is refused here,
    since a NaN one would skip its whole global batch every epoch without naming the record."""
    try:
        value = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except (ValueError, RecursionError) as e:
        raise RecordProblem("bad_ref_logps", f"logps is not valid JSON: {_json_error(e)}", _LOGPS_FIX) from None
    if isinstance(value, dict):
        value = value.get("logps")
    if not isinstance(value, (list, tuple)) or len(value) != 15:
        got = f"{len(value)} entries" if isinstance(value, (list, tuple)) else type(value).__name__
        raise RecordProblem("bad_ref_logps", f"logps must hold the official format's 15 entries (5 sums, 5 means, "
                            f"5 per-token lists), got {got}", _LOGPS_FIX)
    numbers = value[:10]
    for j, v in enumerate(numbers):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 0:
            what = "sum" if j < 5 else "mean"
            raise RecordProblem("bad_ref_logps", f"logps entry {j} (the {what} of role {j % 5}) is {v!r}: a log-prob "
                                "is a finite number <= 0", _LOGPS_FIX)
    if not all(isinstance(v, (list, tuple)) for v in value[10:]):
        raise RecordProblem("bad_ref_logps", "logps entries 10-14 must be the per-token lists", _LOGPS_FIX)
    return {"sum": [float(v) for v in numbers[:5]], "mean": [float(v) for v in numbers[5:]]}


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


Check = Callable[[dict], None]
"""One of the trainer's checks on a record (its texts and decoded images under our field names),
for what only the trainer knows (its tokenizer's special tokens, mDPO's crop): raises RecordProblem."""


def _missing(field: str) -> RecordProblem:
    return RecordProblem("missing_field", f"missing field {field!r}",
                         f"add {field!r} to the record, or train an objective that does not need it")


def _identical(what: str) -> RecordProblem:
    return RecordProblem("identical_pair", f"{what}: the pair carries no preference",
                         "make the two differ, or remove the record")


def _text(v, k: str) -> str:
    """A text field: a non-empty string of valid UTF-8."""
    if not isinstance(v, str):
        raise RecordProblem("wrong_type", f"field {k!r} must be a string, got {type(v).__name__}", "store it as text")
    if not v.strip():
        raise RecordProblem("empty_field", f"field {k!r} is empty", "fill it in or remove the record")
    bad = _SURROGATE.search(v)
    if bad:
        raise RecordProblem("not_utf8", f"field {k!r} holds bytes that are not UTF-8 (or a lone surrogate "
                            f"escape) at character {bad.start()}", _UTF8_FIX)
    return v


def _messages(value, field: str, roles: tuple[str, ...]) -> list[dict]:
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value):
        raise RecordProblem("wrong_type", f"field {field!r} must be a non-empty list of {{role, content}} messages",
                            "store it as TRL's conversational format")
    bad = [m["role"] for m in value if m["role"] not in roles]
    if bad:
        raise RecordProblem("wrong_type", f"field {field!r} has a message of role {bad[0]!r}; expected one of "
                            f"{roles}", "fix the conversation's roles")
    return [{"role": m["role"], "content": _text(m.get("content"), f"{field}.content")} for m in value]


def validate_text(row: dict, where: str, check: Check | None = None) -> dict:
    """One validated text record (DPO): ``prompt`` or ``question``, ``chosen``, ``rejected``."""
    rec: dict = {"id": str(row.get("id", where))}
    try:
        if "_error" in row:
            raise row["_error"]
        if any(row.get(k) is not None for k in IMAGE_FIELDS):
            raise RecordProblem("image_for_text_model", "the record has an image, which a text-only model cannot see",
                                "train a vision-language model on it, or give text data")
        lead = "question" if row.get("question") is not None else "prompt"
        for k in (lead, "chosen", "rejected"):
            v = row.get(k)
            if v is None:
                raise _missing("prompt' (or 'question" if k == "prompt" else k)
            if isinstance(v, list) and k != "question":
                v = _messages(v, k, ("system", "user", "assistant", "tool") if k == "prompt" else ("assistant",))
            else:
                v = _text(v, k)
            rec[k] = v
        if lead == "prompt" and isinstance(rec["prompt"], str) and any(isinstance(rec[k], list)
                                                                      for k in ("chosen", "rejected")):
            raise RecordProblem("wrong_type", "a plain-text 'prompt' takes plain-text answers, but 'chosen' or "
                                "'rejected' is a list of messages", "give the prompt as messages too, or the "
                                "answers as text")
        if rec["chosen"] == rec["rejected"]:
            raise _identical("'chosen' and 'rejected' are the same")
        if check is not None:
            check(rec)
    except RecordProblem as e:
        raise BadRecordError(f"{where}: {_one_line(e)}; fix: {e.fix}", e.kind) from None
    except (ValueError, TypeError) as e:  # a check's own error (the collator's): still named, never a traceback
        raise BadRecordError(f"{where}: {_one_line(e)}; fix: correct or remove the record") from None
    rec["digest"] = content_digest(rec)
    return rec


def validate(row: dict, objective: str, where: str, images: ImagePolicy = ImagePolicy(),
             check: Check | None = None) -> dict:
    """One validated record (images as sources, each decoded once here to check it); raises BadRecordError."""
    required = REQUIRED[objective]
    base = row.get("_base")
    rec: dict = {"id": str(row.get("id", where))}
    digests: dict[str, str] = {}
    decoded: dict[str, Image.Image] = {}
    try:
        if "_error" in row:
            raise row["_error"]
        for k in TEXT_FIELDS:
            v = row.get(k)
            if v is None:
                if k in required and not (k == "question" and row.get("prompt") is not None):
                    raise _missing(k)
                continue
            if isinstance(v, str) and k == "question":
                v = _question(v)
            elif isinstance(v, str) and k == "prompt" and v.count(IMAGE_PLACEHOLDER) != 1:
                raise RecordProblem("image_placeholder", f"field 'prompt' holds the whole conversation and must place "
                                    f"{IMAGE_PLACEHOLDER!r} once, found {v.count(IMAGE_PLACEHOLDER)}",
                                    f"put one {IMAGE_PLACEHOLDER!r} where the image goes")
            rec[k] = _text(v, k)
        if rec.get("chosen", "").strip() == rec.get("rejected", "").strip():
            raise _identical("'chosen' and 'rejected' are the same text")
        if objective == "symmpo" and rec["contrast_chosen"].strip() == rec["chosen"].strip():
            raise _identical("'contrast_chosen' and 'chosen' are the same text")
        for k in IMAGE_FIELDS:
            v = row.get(k)
            if v is None or (isinstance(v, str) and not v and k not in required):
                if k in required:
                    raise _missing(k)
                continue
            src = _image_source(v, k, base, images)
            decoded[k] = open_image(src, k, images)
            rec[k] = src
            digests[k] = pixels_digest(decoded[k])
        if objective == "symmpo" and digests["image"] == digests["contrast_image"]:
            raise _identical("'image' and 'contrast_image' have the same pixels")
        if "ref_logps_official" in row:
            rec["ref_logps"] = _official_logps(row["ref_logps_official"])
        if "meta" in row:
            rec["meta"] = row["meta"]
        if check is not None:
            check({**rec, **decoded})
    except RecordProblem as e:
        raise BadRecordError(f"{where}: {_one_line(e)}; fix: {e.fix}", e.kind) from None
    except (ValueError, TypeError) as e:  # a check's own error: still named, never a traceback
        raise BadRecordError(f"{where}: {_one_line(e)}; fix: correct or remove the record") from None
    rec["digest"] = content_digest(rec, digests)
    return rec


def _question(text: str, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """The question verbatim, as the official code uses it, less one image placeholder at its
    start or end (LLaVA data puts "<image>\\n" there; the prompt format places the image)."""
    if text.startswith(placeholder):
        text = text[len(placeholder):].removeprefix("\n")
    elif text.endswith(placeholder):
        text = text[: -len(placeholder)].removesuffix("\n")
    if placeholder in text:
        raise RecordProblem("image_placeholder", f"field 'question' holds {placeholder!r} inside its text; only "
                            "one at its start or end is understood (the prompt format places the image)",
                            f"remove the {placeholder!r} from the question's middle")
    return text


def question_or_conversation(text: str, placeholder: str = IMAGE_PLACEHOLDER) -> dict[str, str]:
    """A prompt string as our readers take it: ``{"prompt": text}`` when it already holds the
    conversation up to the assistant's turn (used as written), else ``{"question": ...}`` less
    one placeholder at its start or end (:func:`_question`)."""
    if is_conversation(text) and placeholder in text:
        return {"prompt": text}
    return {"question": _question(text, placeholder)}


def content_digest(rec: dict, image_digests: dict[str, str] | None = None) -> str:
    """Hash of a record's texts and decoded image pixels: the data set's fingerprint is built from it."""
    h = hashlib.sha256()
    for k in TEXT_FIELDS:
        value = rec.get(k, "")
        h.update(f"{k}\0{value if isinstance(value, str) else json.dumps(value, sort_keys=True)}\0".encode())
    for k in IMAGE_FIELDS:
        if k in rec:
            h.update(((image_digests or {}).get(k) or pixels_digest(open_image(rec[k], k))).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# the data set


class PreferenceDataset:
    """Validated records; ``dataset[i]`` decodes its images.  ``skipped`` lists what was skipped and
    why, ``duplicates`` the ``(where, where of the first)`` of records kept although seen before."""

    def __init__(self, records: list[dict], source: str, skipped: list[Skipped] | None = None,
                 duplicates: list[tuple[str, str]] | None = None, images: ImagePolicy = ImagePolicy()):
        self.records = records
        self.source = source
        self.skipped = skipped or []
        self.duplicates = duplicates or []
        self.images = images
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = dict(self.records[i])
        for k in IMAGE_FIELDS:
            if k in rec:
                try:
                    rec[k] = open_image(rec[k], k, self.images)
                except RecordProblem as e:
                    raise BadRecordError(f"{self.source}: record {rec['id']}: {k} became unreadable since it was "
                                         f"read: {_one_line(e)}", e.kind) from None
        return rec

    def skipped_by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(s.kind for s in self.skipped).items()))

    def problems(self) -> str:
        """One line on what was skipped and what is duplicated, or "" when nothing was."""
        parts = []
        if self.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in self.skipped_by_kind().items())
            parts.append(f"{len(self.skipped)} bad records skipped ({kinds})")
        if self.duplicates:
            where, first = self.duplicates[0]
            parts.append(f"{len(self.duplicates)} duplicate records kept (e.g. {where} repeats {first})")
        return "; ".join(parts)

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
             max_records: int, images: ImagePolicy, check: Check | None, text_only: bool = False) -> PreferenceDataset:
    if objective not in REQUIRED:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(REQUIRED)}")
    if text_only and objective != "dpo":
        raise ValueError(f"objective {objective!r} needs images; text data trains with objective dpo")
    if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0:
        raise ValueError(f"max_records must be an int >= 0 (0: all), got {max_records!r}")
    records, skipped, duplicates, first = [], [], [], {}
    for where, row in rows:
        try:
            rec = validate_text(row, where, check) if text_only else validate(row, objective, where, images, check)
        except BadRecordError as e:
            if not skip_bad_records:
                raise BadRecordError(f"{e} (or {SKIP_HINT})", e.kind) from None
            skipped.append(Skipped(where, str(e), e.kind))
            continue
        if rec["digest"] in first:
            duplicates.append((where, first[rec["digest"]]))
        first.setdefault(rec["digest"], where)
        records.append(rec)
        if max_records and len(records) >= max_records:
            break
    if not records:
        raise BadRecordError(f"{source}: no usable records" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return PreferenceDataset(records, source, skipped, duplicates, images)


# ----------------------------------------------------------------------------------------------
# readers: each yields (where, row with our field names)


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading the official SymMPO parquet needs pyarrow: pip install pyarrow") from None
    files = parquet_files(path) if path.is_dir() else [path]
    for file in files:
        yield from _parquet_rows(file)


def _parquet_rows(file: Path) -> Iterator[tuple[str, dict]]:
    """One shard's rows; a shard that cannot be read (empty, truncated, not parquet) is one bad record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = 0
    try:
        fh = open_regular(file, "parquet shard")  # pq.ParquetFile(path) would block on a FIFO
    except RecordProblem as e:
        yield f"{file}: the whole shard", {"_error": e}
        return
    except OSError as e:
        yield f"{file}: the whole shard", {"_error": RecordProblem(
            "unreadable_shard", f"cannot be opened: {e.strerror}", "make the shard readable, or remove it")}
        return
    try:
        with fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    idx = f" (idx {row['idx']})" if row.get("idx") is not None else ""
                    yield f"{file}: record {i}{idx}", normalise_row(row, file.parent)
                    i += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        rows = f"rows from {i} on" if i else "the whole shard"
        yield f"{file}: {rows}", {"_error": RecordProblem(
            "unreadable_shard", f"not a readable parquet file: {e}", "re-download or remove the shard")}


def _not_an_object(row) -> dict:
    return {"_error": RecordProblem("not_an_object", f"expected an object, got {type(row).__name__}",
                                    "write each record as a JSON object of field: value")}


def _surrogates(value) -> int:
    """Lone surrogates in every string (keys too) of a parsed JSON value.  A loop, not recursion:
    what json.loads nested just below its own limit would overflow a recursive walk."""
    n, todo = 0, [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            n += len(_SURROGATE.findall(v))
        elif isinstance(v, dict):
            todo += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            todo += v
    return n


def _json_error(e: Exception) -> str:
    """json.loads' own error, or what its other failures mean: nesting past Python's recursion
    limit (a line of 200000 '['), an integer past int's 4300-digit string limit."""
    if isinstance(e, RecursionError):
        return "nested too deeply to parse"
    return _one_line(e)


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
    # Undecodable bytes are kept as lone surrogates, so that only the records holding them are bad;
    # each is named with the line of its first such byte (records and their bytes come in file order).
    # A UTF-8 byte-order mark (Windows editors write one) is not part of the JSON, as for JSONL.
    with _open_data(path) as fh:
        text = fh.read().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    bad_lines = [text.count("\n", 0, m.start()) + 1 for m in _SURROGATE.finditer(text)]
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadRecordError(f"{path}: not valid JSON: {_json_error(e)}; fix: repair the file", "invalid_json") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise BadRecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}", "not_an_object")
    seen = 0
    for i, row in enumerate(data):
        where = f"{path}: record {i}"
        n = _surrogates(row)
        if n and seen < len(bad_lines):
            where += f" (line {bad_lines[seen]})"
        seen += n
        if not isinstance(row, dict):
            yield where, _not_an_object(row)
            continue
        yield where, normalise_row(row, path.parent)


def _open_data(path: Path):
    try:
        return open_regular(path, "data")
    except RecordProblem as e:  # the data path itself: not a record's problem
        raise ValueError(str(e)) from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with _open_data(path) as fh:
        for i, raw in enumerate(fh):
            where = f"{path}: line {i + 1}"
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, {"_error": RecordProblem("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                                                      "is not UTF-8", _UTF8_FIX)}
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:  # also: nesting past the recursion limit, huge ints
                yield where, {"_error": RecordProblem("invalid_json", f"not valid JSON: {_json_error(e)}",
                                                      "repair the line or remove it")}
                continue
            if not isinstance(row, dict):
                yield where, _not_an_object(row)
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
                 skip_bad_records: bool = False, max_records: int = 0, images: ImagePolicy = ImagePolicy(),
                 check: Check | None = None, text_only: bool = False) -> PreferenceDataset:
    """Read and validate a preference data set; see the module docstring for the formats.

    ``images``: how image paths are confined and decoded (:class:`symmpo_fast.images.ImagePolicy`);
    ``check``: the trainer's own checks of each record (:data:`Check`); ``text_only``: text
    preference data for a text-only model (DPO).
    """
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "hf":
        source, rows = _read_hf(path)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"data {path} does not exist")
        if not p.is_dir() and not p.is_file():  # a FIFO would block the reader (the readers check again on open)
            raise ValueError(f"data {path} is not a regular file or a directory")
        source = str(p)
        reader = {"symmpo_parquet": _read_parquet, "mdpo_json": _read_json, "jsonl": _read_jsonl}.get(fmt)
        if reader is None:
            raise ValueError(f"unknown data format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
        rows = reader(p)
    if image_root:
        rows = ((w, {**r, "_base": Path(image_root)}) for w, r in rows)
    return _collect(rows, source, objective, skip_bad_records, max_records, images, check, text_only)


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
