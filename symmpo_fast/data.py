"""Preference records -> a :class:`PreferenceBatch`: tokenized once, each distinct image processed once.

A record is a dict of PIL images and strings::

    {"image": m, "contrast_image": m', "question": x,
     "chosen": y_w, "rejected": y_l, "contrast_chosen": y_w'}

SymMPO needs all six fields; mDPO and DPO need neither ``contrast_image`` nor ``contrast_chosen``
(mDPO's column 3 uses ``m_l``, a seeded random crop of ``m`` keeping 1-20% of its area, as in
the mDPO paper, https://arxiv.org/abs/2406.11839).  Extra fields are ignored.

Each role (column of :data:`symmpo_fast.ROLES`) is the sequence ``prompt(image, x) + response``:

====  ===================  ==========  ================
col   role                 image       response
====  ===================  ==========  ================
0     chosen               m           y_w
1     rejected             m           y_l
2     pair_rejected        m           y_w'
3     contrast_rejected    m' (m_l)    y_w
4     contrast_chosen      m'          y_w'
====  ===================  ==========  ================

The prompt is the processor's chat template with its generation prompt (LLaVA-1.5:
``USER: <image>\\n{x} ASSISTANT:``), the image placeholder expanded to the image's token count.
The response is the answer as the template places it after the prompt, then the end-of-turn
token ``</s>`` (the tokenizer's EOS); the labels are all of the response's tokens, EOS
included, as the official LLaVA / mDPO / SymMPO code trains them.  Concatenating a role's
``prompt_ids`` and ``response_ids`` gives exactly the ids the model is run on, packed or not.

Truncation (``max_length`` bounds every prompt + response): a response and an image are never
cut.  ``truncation="drop"`` drops a record whose longest sequence is too long;
``truncation="question"`` cuts the question's last tokens instead, keeping at least one, and
drops the record when that is not enough.  Both are counted in ``num_dropped`` /
``num_truncated`` for the logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass

import torch
from PIL import Image

from .objectives import NUM_ROLES, ObjectiveConfig

OBJECTIVES = ("symmpo", "mdpo", "dpo")
TRUNCATION = ("drop", "question")
COLUMNS = {name: ObjectiveConfig.preset(name).used_columns for name in OBJECTIVES}
# Which answer and which image each column uses ("crop" is mDPO's m_l, made from "image").
ROLE_TEXT = ("chosen", "rejected", "contrast_chosen", "chosen", "contrast_chosen")
ROLE_IMAGE = {"symmpo": ("image", "image", "image", "contrast_image", "contrast_image"),
              "mdpo": ("image", "image", None, "crop", None),
              "dpo": ("image", "image", None, None, None)}
CROP_AREA = (0.01, 0.2)
_SENTINEL_Q = "\x00question\x00"
_SENTINEL_A = "\x00answer\x00"


@dataclass
class PreferenceBatch:
    """Everything a policy or reference pass needs for a batch of records.

    ``prompt_ids[b][k]`` / ``response_ids[b][k]`` are 1-D int64 CPU tensors for each used column
    ``k`` (``None`` for unused ones); the prompt has the image placeholders expanded, the
    response ends with the end-of-turn token and is the label sequence.  ``image_index[b][k]``
    indexes ``pixel_values``, which holds each distinct image of the batch once.
    """

    objective: str
    columns: tuple[int, ...]
    prompt_ids: list[list[torch.Tensor | None]]
    response_ids: list[list[torch.Tensor | None]]
    image_index: list[list[int]]
    pixel_values: torch.Tensor
    """[num_images, C, H, W] float, each distinct image once."""
    image_token_id: int
    pad_token_id: int
    record_keys: list[str]
    """sha256 per record over the objective, every used role's token ids, its image's bytes and
    its pixel values: the key of a reference log-prob cache."""
    num_dropped: int = 0
    num_truncated: int = 0

    @property
    def num_records(self) -> int:
        return len(self.prompt_ids)

    @property
    def device(self) -> torch.device:
        return self.pixel_values.device

    def to(self, device, non_blocking: bool = False) -> "PreferenceBatch":
        """A copy with the pixels on ``device``; token ids stay on the host, where packing is planned."""
        return dataclasses.replace(self, pixel_values=self.pixel_values.to(device, non_blocking=non_blocking))

    def sequence(self, b: int, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [n], labels [n])`` of one role as a plain causal LM sees it (labels -100 on
        the prompt; position i's label is the token at i, so shift before comparing with logits)."""
        prompt, response = self.prompt_ids[b][column], self.response_ids[b][column]
        if prompt is None:
            raise ValueError(f"column {column} is not part of a {self.objective} batch (columns {self.columns})")
        ids = torch.cat([prompt, response])
        labels = torch.cat([torch.full_like(prompt, -100), response])
        return ids, labels


def random_crop(image, rng: random.Random, area: tuple[float, float] = CROP_AREA):
    """A crop of ``image`` keeping a fraction of its area drawn uniformly in ``area``.

    The aspect ratio is log-uniform in [3/4, 4/3] (as ``RandomResizedCrop``); draws whose rounded
    box falls outside ``area`` are redrawn.
    """
    W, H = image.size
    for _ in range(100):
        target = rng.uniform(*area) * W * H
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 1 <= w <= W and 1 <= h <= H and area[0] <= w * h / (W * H) <= area[1]:
            x, y = rng.randint(0, W - w), rng.randint(0, H - h)
            return image.crop((x, y, x + w, y + h))
    raise ValueError(f"an image of {W}x{H} pixels is too small for a crop keeping {area[0]:.0%}-{area[1]:.0%} "
                     "of its area")


def _image_digest(image) -> bytes:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).digest()


class PreferenceCollator:
    """``collator(records) -> PreferenceBatch``; see the module docstring for the layout and policies.

    ``processor``: a transformers processor with a tokenizer (fast: offsets are used), an image
    processor, ``image_token`` and a chat template.  ``seed`` fixes mDPO's crops: the crop of a
    record depends only on ``seed`` and its image, so a reference log-prob cache stays valid
    across epochs.  ``system_prompt`` goes into the template's system turn when given.
    """

    def __init__(self, processor, objective: str = "symmpo", max_length: int = 2048, truncation: str = "drop",
                 seed: int = 0, system_prompt: str | None = None):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        if truncation not in TRUNCATION:
            raise ValueError(f"unknown truncation {truncation!r}; expected one of {TRUNCATION}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.processor, self.objective, self.max_length = processor, objective, max_length
        self.truncation, self.seed, self.system_prompt = truncation, seed, system_prompt
        self.columns = COLUMNS[objective]
        self.tokenizer = tok = processor.tokenizer
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: the end-of-turn label needs one")
        self.image_token = processor.image_token
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._before, self._after, self._sep = self._template_pieces()
        # The answer is tokenized after the prompt's tail, so that tokenizers which treat a text's
        # start specially (SentencePiece's prefix space) give the ids the model sees in context.
        self._anchor = tok(self._after, add_special_tokens=False)["input_ids"]

    def _messages(self, question: str, answer: str | None = None) -> list[dict]:
        msgs = []
        if self.system_prompt is not None:
            msgs.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return msgs

    def _template_pieces(self) -> tuple[str, str, str]:
        """(text before the question, text after it up to the generation prompt's end, separator
        between the generation prompt and the answer), from rendering the template once."""
        render = self.processor.apply_chat_template
        prompt = render(self._messages(_SENTINEL_Q), add_generation_prompt=True, tokenize=False)
        full = render(self._messages(_SENTINEL_Q, _SENTINEL_A), add_generation_prompt=False, tokenize=False)
        before, _, after = prompt.partition(_SENTINEL_Q)
        if before.count(self.image_token) != 1 or self.image_token in after:
            raise ValueError(f"the chat template must place one {self.image_token!r} before the question; "
                             f"it renders {prompt!r}")
        if not full.startswith(prompt) or _SENTINEL_A not in full[len(prompt):]:
            raise ValueError("the chat template's assistant turn does not continue its generation prompt: "
                             f"{prompt!r} vs {full!r}")
        sep = full[len(prompt):].partition(_SENTINEL_A)[0]
        return before, after, sep

    # ------------------------------------------------------------------------------------------

    def _check(self, records) -> None:
        if not isinstance(records, (list, tuple)) or not records:
            raise ValueError(f"the collator needs a non-empty list of records, got {type(records).__name__}")
        images = {c for c in ROLE_IMAGE[self.objective] if c not in (None, "crop")}
        texts = {"question"} | {ROLE_TEXT[k] for k in self.columns}
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise TypeError(f"record {i} must be a dict, got {type(r).__name__}")
            for f in sorted(images | texts):
                if f not in r:
                    raise ValueError(f"record {i} has no field {f!r}, which objective {self.objective!r} needs "
                                     f"(fields: {sorted(images | texts)})")
            for f in images:
                if not isinstance(r[f], Image.Image):
                    raise TypeError(f"record {i}: {f!r} must be a PIL image, got {type(r[f]).__name__}")
            for f in texts:
                if not isinstance(r[f], str):
                    raise TypeError(f"record {i}: {f!r} must be a str, got {type(r[f]).__name__}")
                if self.image_token in r[f]:
                    raise ValueError(f"record {i}: {f!r} contains the image token {self.image_token!r}")

    def _prompt(self, question: str) -> tuple[list[int], int, int, int]:
        """Prompt ids (one image placeholder), the placeholder's index and the question's token span."""
        text = self._before + question + self._after
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        q0, q1 = len(self._before), len(self._before) + len(question)
        inside = [i for i, (s, e) in enumerate(offsets) if s >= q0 and e <= q1 and e > s]
        span = (inside[0], inside[-1] + 1) if inside else (0, 0)
        return ids, ids.index(self.image_token_id), *span

    def _response(self, answer: str) -> list[int]:
        ids = self.tokenizer(self._after + self._sep + answer, add_special_tokens=False)["input_ids"]
        n = len(self._anchor)
        if ids[:n] == self._anchor:
            ids = ids[n:]
        else:  # the prompt's tail merged with the answer: tokenize the answer alone
            ids = self.tokenizer(self._sep + answer, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def _images(self, records) -> tuple[list[list[int]], torch.Tensor, list[int], list[bytes]]:
        """Per record the distinct-image index of each column, the pixels of each distinct image,
        its placeholder count and its digest (of the image's bytes and of the pixels the model
        sees, so that a cache key also changes with the image processor's settings)."""
        role_image = ROLE_IMAGE[self.objective]
        index: dict[bytes, int] = {}
        distinct, raw, per_record = [], [], []
        for r in records:
            row = [-1] * NUM_ROLES
            for k in self.columns:
                name = role_image[k]
                if name == "crop":
                    digest = _image_digest(r["image"])
                    rng = random.Random(hashlib.sha256(f"{self.seed}:".encode() + digest).digest())
                    image = random_crop(r["image"], rng)
                else:
                    image = r[name]
                key = _image_digest(image)
                if key not in index:
                    index[key] = len(distinct)
                    distinct.append(image)
                    raw.append(key)
                row[k] = index[key]
            per_record.append(row)
        # The processor itself expands the placeholder, so the token count per image is the
        # model family's own rule (fixed for LLaVA-1.5, size-dependent for LLaVA-NeXT).
        out = self.processor(text=[self.image_token] * len(distinct), images=distinct, return_tensors="pt",
                             padding=True)
        counts = (out["input_ids"] == self.image_token_id).sum(1).tolist()
        pixels = out["pixel_values"]
        digests = [d + hashlib.sha256(p.contiguous().numpy().tobytes()).digest()
                   for d, p in zip(raw, pixels, strict=True)]
        return per_record, pixels, counts, digests

    def __call__(self, records) -> PreferenceBatch:
        self._check(records)
        image_index, pixels, counts, digests = self._images(records)
        prompts, responses, keys, kept_images = [], [], [], []
        dropped = truncated = 0
        for r, img in zip(records, image_index, strict=True):
            ids, at, q0, q1 = self._prompt(r["question"])
            answers = {name: self._response(r[name]) for name in {ROLE_TEXT[k] for k in self.columns}}
            longest = max(len(ids) - 1 + counts[img[k]] + len(answers[ROLE_TEXT[k]]) for k in self.columns)
            over = longest - self.max_length
            if over > 0:
                if self.truncation == "drop" or q1 - q0 - over < 1:
                    dropped += 1
                    continue
                ids = ids[: q1 - over] + ids[q1:]
                truncated += 1
            # Columns with the same image share one prompt tensor, and one tensor per answer.
            by_image = {i: torch.tensor(ids[:at] + [self.image_token_id] * counts[i] + ids[at + 1:])
                        for i in {img[k] for k in self.columns}}
            answer_ids = {name: torch.tensor(a) for name, a in answers.items()}
            p_row: list[torch.Tensor | None] = [None] * NUM_ROLES
            r_row: list[torch.Tensor | None] = [None] * NUM_ROLES
            h = hashlib.sha256(self.objective.encode())
            for k in self.columns:
                p_row[k], r_row[k] = by_image[img[k]], answer_ids[ROLE_TEXT[k]]
                h.update(f"{k}:{len(p_row[k])}:{len(r_row[k])}:".encode() + p_row[k].numpy().tobytes()
                         + r_row[k].numpy().tobytes() + digests[img[k]])
            prompts.append(p_row)
            responses.append(r_row)
            keys.append(h.hexdigest())
            kept_images.append(img)
        # Images of dropped records are not sent to the vision tower.
        used = sorted({i for img in kept_images for i in img if i >= 0})
        remap = {old: new for new, old in enumerate(used)}
        kept_images = [[remap.get(i, -1) for i in img] for img in kept_images]
        return PreferenceBatch(
            objective=self.objective, columns=self.columns, prompt_ids=prompts, response_ids=responses,
            image_index=kept_images, pixel_values=pixels[used], image_token_id=self.image_token_id,
            pad_token_id=self.pad_token_id, record_keys=keys, num_dropped=dropped, num_truncated=truncated,
        )
