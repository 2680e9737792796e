"""``symmpo-fast prepare-data``: validate a data set, report its problems and lengths, write it out.

The written form is our JSONL with every image as a PNG beside it.  For data without contrast
images (mDPO, DPO) each row also gets ``mdpo_crop``: the cropped image m_l that the collator
builds for mDPO's column 3 with this seed, so that it can be looked at before training.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .. import formats


def _length_report(dataset: formats.PreferenceDataset, model: str, objective: str, max_length: int, seed: int,
                   prompt_format: str = "auto") -> dict:
    from ..data import PreferenceCollator
    from ..models import load_processor

    if model == "tiny":
        processor = load_processor()
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model)
    # The longest sequence of every record, measured with no length limit.
    collator = PreferenceCollator(processor, objective, max_length=10**9, seed=seed, prompt_format=prompt_format)
    longest = []
    for i in range(len(dataset)):
        batch = collator([dataset[i]])
        longest.append(max(len(p) + len(r) for p, r in zip(batch.prompt_ids[0], batch.response_ids[0])
                           if p is not None))
    ordered = sorted(longest)
    return {"tokens_max": ordered[-1], "tokens_mean": round(sum(longest) / len(longest), 1),
            "tokens_p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            f"over_max_length_{max_length}": sum(n > max_length for n in longest)}


def _write(dataset: formats.PreferenceDataset, output: str, seed: int) -> str:
    from ..data import _image_digest, random_crop

    path = formats.write_jsonl(dataset, output)
    if dataset.has_fields(("contrast_image",)):
        return str(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        image = dataset[i]["image"]
        # The same seeding as the collator's, so this is the crop training will use.
        rng = random.Random(hashlib.sha256(f"{seed}:".encode() + _image_digest(image)).digest())
        rel = f"images/{i:06d}_mdpo_crop.png"
        random_crop(image, rng).save(Path(output) / rel)
        row["mdpo_crop"] = rel
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(data: str, data_format: str = "auto", objective: str = "symmpo", image_root: str = "",
            skip_bad_records: bool = False, output: str = "", model: str = "", max_length: int = 2048,
            seed: int = 0, prompt_format: str = "auto") -> dict:
    """Validate ``data`` for ``objective``; returns the report that the command prints."""
    dataset = formats.load_dataset(data, data_format, objective=objective, image_root=image_root,
                                   skip_bad_records=skip_bad_records)
    report = {
        "source": dataset.source,
        "format": formats.detect_format(data) if data_format == "auto" else data_format,
        "objective": objective,
        "usable": len(dataset),
        "skipped": len(dataset.skipped),
        "problems": [{"record": s.where, "problem": s.problem} for s in dataset.skipped[:50]],
        "has_contrast": dataset.has_fields(("contrast_image", "contrast_chosen")),
        "has_reference_logps": dataset.has_fields(("ref_logps",)),
        "fingerprint": dataset.fingerprint(),
    }
    if model:
        report.update(_length_report(dataset, model, objective, max_length, seed, prompt_format))
    if output:
        report["written"] = _write(dataset, output, seed)
    return report
