"""``symmpo-fast prepare-data``: validate a data set, report its problems and lengths, write it out;
and the checks of a record that only the trainer's processor knows, which training runs too.

The written form is our JSONL with every image as a PNG beside it.  For data without contrast
images (mDPO, DPO) each row also gets ``mdpo_crop``: the cropped image m_l that the collator
builds for mDPO's column 3 with this seed, so that it can be looked at before training.

The report and the trainer see the same records: both read with :func:`record_check` of the
same processor (for the lengths: ``--model``'s, with the run's ``--max-length`` and
``--truncation``), so what ``prepare-data`` accepts, training accepts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import formats
from ..images import ImagePolicy, RecordProblem

RESPONSES = ("chosen", "rejected", "contrast_chosen")


def load_processor_for(model: str):
    """The processor of ``model`` as training loads it, without its weights (:func:`symmpo_fast.models.load_processor_for`)."""
    from ..models import load_processor_for as load

    return load(model)


def special_texts(processor) -> tuple[str, ...]:
    """Texts the tokenizer turns into special tokens wherever they occur (``</s>`` becomes EOS in
    the middle of a response), the image placeholder included."""
    tok = getattr(processor, "tokenizer", processor)
    found = {getattr(processor, "image_token", None), *tok.all_special_tokens,
             *(t.content for t in tok.added_tokens_decoder.values() if t.special)}
    return tuple(sorted(t for t in found if t))


def mdpo_crop(image, seed: int):
    """mDPO's m_l of ``image`` exactly as the collator draws it: seeded by ``seed`` and the pixels."""
    from ..data import seeded_crop

    return seeded_crop(image, seed)


_LENGTH_FIX = {
    "drop": "raise max_length, or set truncation=right (cut the responses' tails) or truncation=question (cut the "
            "question: records with a question only, not as-written prompts or text records)",
    "question": "raise max_length, or set truncation=right (cut the responses' tails)",
    "right": "raise max_length: its prompt alone (image tokens included) leaves no response token",
}


def length_check(processor, objective: str, collate: dict) -> formats.Check:
    """A record that the run's collator (``collate``: its options, max_length and truncation
    among them) would drop as too long: ``too_long``, found when the data is read, instead of a
    step whose records are all dropped mid-run (which under torchrun no process can skip).
    ``objective="eval"``: each record's own (SymMPO's five columns when it has contrast fields,
    else mDPO's), as the held-out evaluation collates it."""
    from ..data import PreferenceCollator

    # Built here, once: a setting the collator refuses is the run's error, not every record's.
    images = hasattr(processor, "image_processor")
    names = (objective,) if objective != "eval" else ("symmpo", "mdpo", "dpo") if images else ("dpo",)
    collators = {name: PreferenceCollator(processor, name, **collate) for name in names}

    def collator(name: str) -> PreferenceCollator:
        return collators[name]

    def check(rec: dict) -> None:
        name = objective
        if name == "eval":
            name = ("symmpo" if "contrast_image" in rec and "contrast_chosen" in rec else
                    "mdpo" if "image" in rec else "dpo")
        kept, longest, prompt = collator(name).measure(rec)  # tokenization only, no pixel processed
        if kept:
            return
        policy = collate.get("truncation", "drop")
        raise RecordProblem("too_long", f"its longest sequence is {longest} tokens (prompt {prompt}, image tokens "
                            f"included), above max_length={collate['max_length']} with truncation={policy}",
                            _LENGTH_FIX[policy])

    return check


def record_check(processor, seed: int, crop: bool, objective: str | None = None,
                 collate: dict | None = None) -> formats.Check:
    """What the collator would refuse mid-run, checked when the data is read: a special token's
    text in a response or the question (the image placeholder is the question's own); with
    ``crop`` (mDPO, or evaluation data without contrast images) an image too small for m_l; with
    ``objective`` and the run's collator options ``collate``, a record too long to keep
    (:func:`length_check`)."""
    texts = special_texts(processor)
    too_long = length_check(processor, objective, collate) if objective is not None and collate is not None else None

    def alternatives(ts):
        # One search per field, also for tokenizers with hundreds of reserved special tokens;
        # "(?!)" matches nothing, where an empty pattern would match everywhere.
        return re.compile("|".join(map(re.escape, ts)) or "(?!)")

    anywhere = alternatives(texts)
    in_question = alternatives([t for t in texts if t != getattr(processor, "image_token", None)])

    def check(rec: dict) -> None:
        for field in ("question", *RESPONSES):
            value = rec.get(field)
            if isinstance(value, list):  # a text model's conversational answer: its messages' texts
                value = "\n".join(m["content"] for m in value)
            found = value is not None and (in_question if field == "question" else anywhere).search(value)
            if found:
                t = found.group()
                raise RecordProblem("special_token", f"field {field!r} contains {t!r}, a special token of the "
                                    "tokenizer (it would be read as that token, not as text)",
                                    f"remove {t!r} from the text")
        if crop:
            try:
                mdpo_crop(rec["image"], seed)
            except ValueError as e:
                raise RecordProblem("image_too_small", f"image: {e}", "use a larger image (mDPO crops 1-20 % of "
                                    "its area)") from None
        if too_long is not None:  # last: the collator needs a record the checks above let through
            too_long(rec)

    return check


def _length_report(dataset: formats.PreferenceDataset, processor, objective: str, max_length: int,
                   collate: dict) -> dict:
    from ..data import PreferenceCollator

    # The longest sequence of every record, measured (tokenization only) with no length limit.
    # The records read are those the length check kept: over max_length only when the truncation
    # cuts them instead.
    collator = PreferenceCollator(processor, objective, **{**collate, "max_length": 10**9})
    longest = [collator.measure(dataset[i])[1] for i in range(len(dataset))]
    ordered = sorted(longest)
    return {"tokens_max": ordered[-1], "tokens_mean": round(sum(longest) / len(longest), 1),
            "tokens_p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            f"over_max_length_{max_length}": sum(n > max_length for n in longest)}


def _write(dataset: formats.PreferenceDataset, output: str, seed: int) -> str:
    path = formats.write_jsonl(dataset, output)
    if dataset.has_fields(("contrast_image",)) or not dataset.has_fields(("image",)):  # SymMPO or text data
        return str(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        rel = f"images/{i:06d}_mdpo_crop.png"
        mdpo_crop(dataset[i]["image"], seed).save(Path(output) / rel)
        row["mdpo_crop"] = rel
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(data: str, data_format: str = "auto", objective: str = "symmpo", image_root: str = "",
            skip_bad_records: bool = False, output: str = "", model: str = "", max_length: int = 2048,
            seed: int = 0, images: ImagePolicy = ImagePolicy(), prompt_format: str = "auto",
            truncation: str = "drop", system_prompt: str | None = None, mdpo_crop: str = "seeded") -> dict:
    """Validate ``data`` for ``objective``; returns the report that the command prints.

    The special tokens checked are ``model``'s, or without one the tiny model's (LLaVA-1.5's); a
    text model's data is read as text preference data.  With ``model``, records too long for
    ``max_length`` under ``truncation`` are bad records (``too_long``), as training finds them;
    without one lengths are not checked (the tiny model's say nothing about another's).
    """
    processor = load_processor_for(model or "tiny")
    text_only = not hasattr(processor, "image_processor")
    collate = dict(max_length=max_length, truncation=truncation, seed=seed, prompt_format=prompt_format,
                   system_prompt=system_prompt, mdpo_crop=mdpo_crop)  # as TrainConfig.collator_kwargs()
    check = record_check(processor, seed, crop=objective == "mdpo" and mdpo_crop == "seeded",
                         objective=objective if model else None, collate=collate)
    dataset = formats.load_dataset(data, data_format, objective=objective, image_root=image_root,
                                   skip_bad_records=skip_bad_records, images=images, check=check, text_only=text_only)
    report = {
        "source": dataset.source,
        "format": formats.detect_format(data) if data_format == "auto" else data_format,
        "objective": objective,
        "usable": len(dataset),
        "skipped": len(dataset.skipped),
        "skipped_by_kind": dataset.skipped_by_kind(),
        "problems": [{"record": s.where, "kind": s.kind, "problem": s.problem} for s in dataset.skipped[:50]],
        "duplicates": len(dataset.duplicates),
        "duplicate_examples": [{"record": w, "same_as": first} for w, first in dataset.duplicates[:10]],
        "has_contrast": dataset.has_fields(("contrast_image", "contrast_chosen")),
        "has_reference_logps": dataset.has_fields(("ref_logps",)),
        "fingerprint": dataset.fingerprint(),
    }
    if model:
        report.update(_length_report(dataset, processor, objective, max_length, collate))
    if output:
        report["written"] = _write(dataset, output, seed)
    return report
