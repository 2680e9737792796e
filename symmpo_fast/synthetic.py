"""A generated, grounded preference task: rendered shapes, questions about them, and a language prior.

Each image m shows ``count`` copies (1-4) of one ``shape`` (circle, square, triangle, cross) in
one ``colour`` (red, green, blue, yellow), grouped in one ``region`` (top left, top right, bottom
left, bottom right).  A record asks about one attribute::

    colour    "What colour is the circle?"   -> "The circle is red."
    count     "How many squares are there?"  -> "There are three squares."
    position  "Where are the crosses?"       -> "The crosses are in the top left."

y_w is the answer true of m; y_l a hallucinated answer (a wrong value of the same attribute);
m' is a minimal edit of m (same layout, only the asked attribute changed: recoloured, an object
added or removed, the group moved) and y_w' the answer true of m'.

The design for testing whether an objective grounds its answers in the image (issue 6) is fixed
here, before any comparison, and documented by :class:`SyntheticConfig`:

* **A language prior.**  Every shape has a typical value of each attribute (:data:`PRIOR`:
  circles are red, come alone and sit top left; squares are green, come in twos, top right; ...).
  In the ``sft`` and ``train`` splits a share ``prior_fraction`` of the records takes the prior
  value for the asked attribute, so on those the question's shape word alone predicts y_w; the
  rest draw the value uniformly (and so also hit the prior a quarter of the time).
* **A held-out split that breaks the prior** (``heldout``): the asked attribute never takes the
  prior value, and y_l *is* the prior's answer, the hallucination a text-only model would give.
  An objective that learns "circles are red" from the text reaches a high training reward and
  still fails here.  ``iid`` is a held-out split drawn like ``train`` for comparison.
* The contrast m' always changes the asked attribute, so in a prior record m' breaks the prior:
  the y_w' | m' pairs are exactly the signal that text alone cannot explain.

Splits are generated deterministically from ``(seed, split, index)``: the same call returns the
same records on any machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .formats import PreferenceDataset, content_digest

# The prompt format of the generated task: the tiny model's own chat template.  The official
# llava_v1 input adds a 40-token system text that is most of a 2-layer model's context: with it
# the demo's 200-step warm-up did not learn to use the image (image conditioning 0.00 nats
# before SymMPO, 0.19 after, 9.8 % correct answers; measured once on this project's CPU).
PROMPT_FORMAT = "chat_template"

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
COUNTS = (1, 2, 3, 4)
REGIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
QUESTION_TYPES = ("colour", "count", "position")
SPLITS = ("sft", "train", "heldout", "iid")

# The language prior: shape i is typically COLOURS[i], COUNTS[i] strong and in REGIONS[i].
PRIOR = {s: {"colour": COLOURS[i], "count": COUNTS[i], "position": REGIONS[i]} for i, s in enumerate(SHAPES)}
_VALUES = {"colour": COLOURS, "count": COUNTS, "position": REGIONS}
_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30)}
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}

# Words a generated answer may use for each attribute; any of them other than the truth is a
# contradiction of the image.
_ANSWER_WORDS = {
    "colour": ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
               "grey", "cyan", "magenta"),
    "count": COUNT_WORDS[1:] + tuple(str(i) for i in range(1, 11)),
}


@dataclass(frozen=True)
class SyntheticConfig:
    """The task's knobs; their defaults are the design, fixed before any objective is compared."""

    image_size: int = 64
    """Side of the rendered square image in pixels (the processor resizes it to the vision tower's)."""
    question_types: tuple[str, ...] = QUESTION_TYPES
    """Attributes asked about, drawn uniformly per record."""
    prior_fraction: float = 0.5
    """Share of sft/train records whose asked attribute takes the shape's prior value (the language prior)."""
    heldout_breaks_prior: bool = True
    """Held-out records never take the prior value, and their y_l is the prior's answer."""
    jitter: int = 2
    """Random shift of each object in pixels, so that images of the same scene differ."""
    seed: int = 0
    """Base seed of every split."""

    def __post_init__(self) -> None:
        bad = set(self.question_types) - set(QUESTION_TYPES)
        if bad or not self.question_types:
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, "
                             f"got {self.question_types}")
        if not 0.0 <= self.prior_fraction <= 1.0:
            raise ValueError(f"prior_fraction must be in [0, 1], got {self.prior_fraction}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int
    region: str
    slots: tuple[int, ...]  # which of the region's 2x2 slots hold an object (the first `count`)
    offsets: tuple[tuple[int, int], ...]  # per-slot jitter
    background: tuple[int, int, int]

    def with_value(self, qtype: str, value) -> "Scene":
        key = {"colour": "colour", "count": "count", "position": "region"}[qtype]
        return Scene(**{**self.__dict__, key: value})


def render(scene: Scene, size: int) -> Image.Image:
    im = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(im)
    half, cell = size // 2, size // 4
    r = max(3, size // 9)  # object radius: 7 px at 64 x 64, most of a 16-px slot (one vision patch at 32 px)
    qx, qy = (REGIONS.index(scene.region) % 2) * half, (REGIONS.index(scene.region) // 2) * half
    fill = _RGB[scene.colour]
    for slot in scene.slots[: scene.count]:
        dx, dy = scene.offsets[slot]
        cx = qx + (slot % 2) * cell + cell // 2 + dx
        cy = qy + (slot // 2) * cell + cell // 2 + dy
        box = (cx - r, cy - r, cx + r, cy + r)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:  # cross
            t = max(1, r // 3)
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return im


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + ("es" if shape.endswith(("ss", "x")) else "s")


def question(qtype: str, shape: str, count: int) -> str:
    noun, be = _plural(shape, count), "is" if count == 1 else "are"
    if qtype == "colour":
        return f"What colour {be} the {noun}?"
    if qtype == "count":
        return f"How many {_plural(shape, 2)} are there?"
    return f"Where {be} the {noun}?"


def answer(qtype: str, shape: str, count: int, value) -> str:
    """The answer stating ``value`` for the asked attribute (the scene's count sets the grammar)."""
    if qtype == "count":
        return f"There is one {shape}." if value == 1 else f"There are {COUNT_WORDS[value]} {_plural(shape, value)}."
    noun, be = _plural(shape, count), "is" if count == 1 else "are"
    if qtype == "colour":
        return f"The {noun} {be} {value}."
    return f"The {noun} {be} in the {value}."


def _value_text(value) -> str:
    return COUNT_WORDS[value] if isinstance(value, int) else value


def make_record(cfg: SyntheticConfig, split: str, index: int) -> dict:
    """Record ``index`` of ``split``: images m and m', question, y_w, y_l, y_w' and the ground truth."""
    if split not in _SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = random.Random(cfg.seed * 1_000_003 + _SPLIT_ID[split] * 100_000_007 + index)
    qtype = rng.choice(cfg.question_types)
    shape = rng.choice(SHAPES)
    values, prior = _VALUES[qtype], PRIOR[shape][qtype]
    scene = Scene(
        shape=shape, colour=rng.choice(COLOURS), count=rng.choice(COUNTS), region=rng.choice(REGIONS),
        slots=tuple(rng.sample(range(4), 4)),
        offsets=tuple((rng.randint(-cfg.jitter, cfg.jitter), rng.randint(-cfg.jitter, cfg.jitter)) for _ in range(4)),
        background=tuple(rng.randint(225, 245) for _ in range(3)),
    )
    breaks = split == "heldout" and cfg.heldout_breaks_prior
    follows = not breaks and rng.random() < cfg.prior_fraction
    if breaks:
        value = rng.choice([v for v in values if v != prior])
    else:
        value = prior if follows else rng.choice(values)
    scene = scene.with_value(qtype, value)
    contrast_value = rng.choice([v for v in values if v != value])
    rejected_value = prior if breaks else rng.choice([v for v in values if v != value])
    contrast = scene.with_value(qtype, contrast_value)
    q = question(qtype, shape, scene.count)
    return {
        "id": f"synthetic:{split}:{index}",
        "image": render(scene, cfg.image_size),
        "contrast_image": render(contrast, cfg.image_size),
        "question": q,
        "chosen": answer(qtype, shape, scene.count, value),
        "rejected": answer(qtype, shape, scene.count, rejected_value),
        "contrast_chosen": answer(qtype, shape, contrast.count, contrast_value),
        "meta": {
            "type": qtype, "shape": shape, "answer": _value_text(value), "contrast_answer": _value_text(contrast_value),
            "rejected_answer": _value_text(rejected_value), "prior_answer": _value_text(prior),
            "follows_prior": value == prior, "split": split,
        },
    }


def build_split(split: str, num_records: int, cfg: SyntheticConfig = SyntheticConfig()) -> PreferenceDataset:
    """``num_records`` records of ``split`` (sft, train, heldout, iid) as a :class:`PreferenceDataset`."""
    records = [make_record(cfg, split, i) for i in range(num_records)]
    return PreferenceDataset(records, f"synthetic:{split}")


def build_text_split(split: str, num_records: int, seed: int = 0) -> PreferenceDataset:
    """A text-only preference task for text LMs (DPO): questions about the shapes vocabulary
    with one right and one wrong answer, no image.  ``split`` and ``seed`` pick the draws."""
    rng = random.Random(f"text:{split}:{seed}")
    records = []
    for i in range(num_records):
        shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
        wrong = rng.choice([c for c in COLOURS if c != colour])
        n = rng.choice(COUNTS)
        noun, verb = (shape, "is") if n == 1 else (shape + ("es" if shape.endswith("s") else "s"), "are")
        records.append({"id": f"synthetic:text:{split}:{i}",
                        "question": f"There {verb} {COUNT_WORDS[n]} {colour} {noun}. What colour {verb} the {noun}?",
                        "chosen": f"The {noun} {verb} {colour}.", "rejected": f"The {noun} {verb} {wrong}."})
    for rec in records:
        rec["digest"] = content_digest(rec)
    return PreferenceDataset(records, f"synthetic:text:{split}")


# ----------------------------------------------------------------------------------------------
# judging generated answers


def _mentions(text: str, qtype: str) -> set[str]:
    low = " " + "".join(c if c.isalnum() else " " for c in text.lower()) + " "
    if qtype == "position":
        found = {r for r in REGIONS if f" {r} " in low}
        # "top" or "left" alone still commits to part of a region.
        found |= {w for w in ("top", "bottom", "left", "right") if f" {w} " in low and not any(w in r for r in found)}
        return found
    return {w for w in _ANSWER_WORDS[qtype] if f" {w} " in low}


def judge(text: str, meta: dict) -> str:
    """``correct``, ``hallucinated`` (names a value the image contradicts) or ``no_answer``."""
    qtype, truth = meta["type"], meta["answer"]
    said = _mentions(text, qtype)
    if not said:
        return "no_answer"
    if qtype == "count":
        truth_words = {truth, str(COUNT_WORDS.index(truth))}
        wrong = said - truth_words
    elif qtype == "position":
        wrong = {w for w in said if w != truth and w not in truth.split()}
    else:
        wrong = said - {truth} - ({"gray", "grey"} if truth in ("gray", "grey") else set())
    return "hallucinated" if wrong else "correct"
