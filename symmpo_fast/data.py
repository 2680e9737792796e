"""Preference records -> a :class:`PreferenceBatch`: tokenized once, each distinct image processed once.

A record is a dict of PIL images and strings::

    {"image": m, "contrast_image": m', "question": x,
     "chosen": y_w, "rejected": y_l, "contrast_chosen": y_w'}

SymMPO needs all six fields; mDPO and DPO need neither ``contrast_image`` nor ``contrast_chosen``
(mDPO's column 3 uses ``m_l``, a random crop of ``m`` keeping 1-20% of its area, as in the mDPO
paper, https://arxiv.org/abs/2406.11839: by default one seeded crop of the raw image per record,
which a reference cache can hold; ``mdpo_crop="official"`` crops the processed pixels anew on
every forward, as mDPO's code does).  ``question`` may be replaced by ``prompt``, the whole
conversation up to the assistant's turn.  Extra fields are ignored.

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

The prompt and the response come from the collator's prompt format
(:mod:`symmpo_fast.prompts`): by default the family's official input (LLaVA-1.5: the official
``llava_v1`` conversation, ``{system} USER: <image>\\n{x} ASSISTANT: {y}</s>``), or the
processor's own chat template; a record whose ``prompt`` already holds the whole conversation
(mDPO's JSON) is used as written.  The image placeholder is expanded to the image's token
count; the labels are the answer's tokens and the end-of-turn ``</s>``, as the official LLaVA /
mDPO / SymMPO code trains them.  Concatenating a role's ``prompt_ids`` and ``response_ids``
gives exactly the ids the model is run on, packed or not.

Truncation (``max_length`` bounds every prompt + response, image tokens included; images are
never cut).  ``truncation="drop"`` (default) drops a record whose longest sequence is too long;
``truncation="question"`` cuts the question's last tokens instead (records with a question: an
as-written prompt or a text model's record has no question span and is dropped), keeping at least one, and
drops the record when that is not enough; ``truncation="right"`` is the official code's: each
sequence is cut on the right at ``max_length``, its response losing its tail (``</s>``
first), and a record with a sequence left without labels is dropped.  All are counted in
``num_dropped`` / ``num_truncated`` for the logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass

import torch
from PIL import Image

from . import prompts
from .objectives import NUM_ROLES, ObjectiveConfig

OBJECTIVES = ("symmpo", "mdpo", "dpo")
TRUNCATION = ("drop", "question", "right")
MDPO_CROPS = ("seeded", "official")
COLUMNS = {name: ObjectiveConfig.preset(name).used_columns for name in OBJECTIVES}
# Which answer and which image each column uses ("crop" is mDPO's m_l, made from "image").
ROLE_TEXT = ("chosen", "rejected", "contrast_chosen", "chosen", "contrast_chosen")
ROLE_IMAGE = {"symmpo": ("image", "image", "image", "contrast_image", "contrast_image"),
              "mdpo": ("image", "image", None, "crop", None),
              "dpo": ("image", "image", None, None, None)}
CROP_AREA = (0.01, 0.2)


def run_rows(sizes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows of items ``index`` (repeats allowed), in that order, of a tensor that holds items
    one after the other, item i taking ``sizes[i]`` consecutive rows: ``[sum(sizes[index])]``."""
    size = sizes[index]
    first = (sizes.cumsum(0) - sizes)[index]
    return torch.repeat_interleave(first - (size.cumsum(0) - size), size) + torch.arange(int(size.sum()),
                                                                                         device=sizes.device)


@dataclass
class Images:
    """A list of images as a model's forward takes them.

    Fixed-size families (LLaVA-1.5): ``pixel_values [N, C, H, W]``, one row per image, no grid.
    Dynamic-resolution families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ``pixel_values [P, C*T*p*p]``
    holds the flattened patches of every image one after the other, image i taking the next
    ``grid_thw[i].prod()`` rows, and ``grid_thw [N, 3]`` is each image's (temporal, height, width)
    patch grid, as the processor returns them.  The grid stays on the host (indexing with it
    needs no device sync); adapters send it to the model's device.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pixel_values.shape[0] if self.grid_thw is None else self.grid_thw.shape[0]

    def rows(self, index) -> torch.Tensor:
        """[n] int64 host tensor: the ``pixel_values`` rows of the images ``index``, in that order."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        if self.grid_thw is None:
            return index
        return run_rows(self.grid_thw.prod(-1), index)

    def select(self, index) -> "Images":
        """The images ``index`` (a list or 1-D tensor; repeats allowed), in that order."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        pixels = self.pixel_values.index_select(0, self.rows(index).to(self.pixel_values.device))
        return Images(pixels, None if self.grid_thw is None else self.grid_thw[index])


@dataclass
class PreferenceBatch:
    """Everything a policy or reference pass needs for a batch of records.

    ``prompt_ids[b][k]`` / ``response_ids[b][k]`` are 1-D int64 CPU tensors for each used column
    ``k`` (``None`` for unused ones); the prompt has the image placeholders expanded, the
    response ends with the end-of-turn token and is the label sequence.  ``image_index[b][k]``
    is the column's distinct image: each one is held once, in ``pixel_values`` (and, for
    dynamic-resolution families, ``image_grid_thw``); :meth:`images` gives them as
    :class:`Images`, from which a layout selects the ones it feeds the model.
    """

    objective: str
    columns: tuple[int, ...]
    prompt_ids: list[list[torch.Tensor | None]]
    response_ids: list[list[torch.Tensor | None]]
    image_index: list[list[int]]
    pixel_values: torch.Tensor
    """[num_images, C, H, W] float, each distinct image once; with ``image_grid_thw``, the flat
    [patches, C*T*p*p] patches of each distinct image one after the other (see :class:`Images`);
    empty for a text-only model."""
    image_token_id: int | None
    """The image placeholder id (None for a text-only model)."""
    pad_token_id: int
    record_keys: list[str]
    """sha256 per record over the objective, every used role's token ids, its image's bytes and
    its pixel values: the key of a reference log-prob cache."""
    num_dropped: int = 0
    num_truncated: int = 0
    recrop: tuple[int, ...] = ()
    """Entries of ``pixel_values`` that :meth:`forward_pixels` crops anew on every forward
    (``mdpo_crop="official"``)."""
    image_grid_thw: torch.Tensor | None = None
    """[num_images, 3] int64 host tensor, each distinct image's (t, h, w) patch grid, for
    dynamic-resolution processors (Qwen2-VL / Qwen2.5-VL / Qwen3-VL); None for fixed-size ones."""
    spatial_merge_size: int = 1
    """Patches merged into one placeholder token along each side: image i has
    ``t * h * w / merge**2`` placeholders laid out as a (t, h / merge, w / merge) grid, the grid
    that M-RoPE positions follow (:func:`symmpo_fast.packing.pack`)."""

    @property
    def num_records(self) -> int:
        return len(self.prompt_ids)

    @property
    def device(self) -> torch.device:
        return self.pixel_values.device

    @property
    def num_images(self) -> int:
        return len(Images(self.pixel_values, self.image_grid_thw))

    def images(self, device=None, generator: torch.Generator | None = None) -> Images:
        """The distinct images one forward sees (:meth:`forward_pixels`), as :class:`Images`."""
        return Images(self.forward_pixels(device, generator), self.image_grid_thw)

    def to(self, device, non_blocking: bool = False) -> "PreferenceBatch":
        """A copy with the pixels on ``device``; token ids stay on the host, where packing is planned."""
        return dataclasses.replace(self, pixel_values=self.pixel_values.to(device, non_blocking=non_blocking))

    def forward_pixels(self, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The pixels one forward sees: ``pixel_values``, with every :attr:`recrop` entry replaced
        by a fresh random resized crop (1-20 % of the area, resized back), as mDPO's code draws
        one for each forward of the policy and of the reference."""
        pixels = self.pixel_values if device is None else self.pixel_values.to(device)
        if not self.recrop:
            return pixels
        pixels = pixels.clone()
        for i in self.recrop:
            pixels[i] = random_resized_crop(pixels[i], CROP_AREA, generator)
        return pixels

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


def random_resized_crop(pixels: torch.Tensor, area: tuple[float, float] = CROP_AREA,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop(size=(H, W), scale=area)`` of a ``[C, H, W]`` tensor: a box
    of ``area`` of the image (aspect ratio log-uniform in [3/4, 4/3], 10 draws, else the centre
    crop) resized back to ``(H, W)`` bilinearly with antialiasing, as mDPO's ``crop_images``."""
    C, H, W = pixels.shape
    g = dict(generator=generator, device="cpu")

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), **g))

    for _ in range(10):
        target = H * W * uniform(*area)
        ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= W and 0 < h <= H:
            i = int(torch.randint(0, H - h + 1, (), **g))
            j = int(torch.randint(0, W - w + 1, (), **g))
            break
    else:  # torchvision's fallback: the centre crop, its aspect ratio clamped to [3/4, 4/3]
        w, h = (W, round(W * 4 / 3)) if W / H < 3 / 4 else (round(H * 4 / 3), H) if W / H > 4 / 3 else (W, H)
        i, j = (H - h) // 2, (W - w) // 2
    box = pixels[None, :, i:i + h, j:j + w].float()
    out = torch.nn.functional.interpolate(box, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
    return out[0].to(pixels.dtype)


def seeded_crop(image, seed: int):
    """mDPO's m_l of ``image`` as the collator draws it (``mdpo_crop="seeded"``): a function of the
    seed and the pixels only, so a record gets the same crop in every batch and epoch."""
    rng = random.Random(hashlib.sha256(f"{seed}:".encode() + _image_digest(image)).digest())
    return random_crop(image, rng)


def _image_digest(image) -> bytes:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).digest()


class PreferenceCollator:
    """``collator(records) -> PreferenceBatch``; see the module docstring for the layout and policies.

    ``processor``: a transformers processor with a tokenizer (fast: offsets are used), an image
    processor, ``image_token`` and a chat template.  ``prompt_format`` is one of
    :data:`symmpo_fast.prompts.PROMPT_FORMATS` (``auto``: the family's official input, for
    LLaVA-1.5 ``llava_v1``); a record whose ``prompt`` already holds the conversation (mDPO's
    JSON) is used as written instead.  ``system_prompt`` replaces the format's system text.
    ``seed`` fixes mDPO's crops (``mdpo_crop="seeded"``): the crop of a record depends only on
    ``seed`` and its image, so a reference log-prob cache stays valid across epochs;
    ``mdpo_crop="official"`` keeps the whole image and crops its pixels anew on every forward
    (:meth:`PreferenceBatch.forward_pixels`), as mDPO's code does.
    """

    def __init__(self, processor, objective: str = "symmpo", max_length: int = 2048, truncation: str = "drop",
                 seed: int = 0, system_prompt: str | None = None, prompt_format: str = "auto",
                 mdpo_crop: str = "seeded"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        if truncation not in TRUNCATION:
            raise ValueError(f"unknown truncation {truncation!r}; expected one of {TRUNCATION}")
        if mdpo_crop not in MDPO_CROPS:
            raise ValueError(f"unknown mdpo_crop {mdpo_crop!r}; expected one of {MDPO_CROPS}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.processor, self.objective, self.max_length = processor, objective, max_length
        self.truncation, self.seed, self.mdpo_crop = truncation, seed, mdpo_crop
        self.columns = COLUMNS[objective]
        # A text-only model's "processor" is its tokenizer: no image processor, no placeholder.
        self.has_images = hasattr(processor, "image_processor")
        self.tokenizer = tok = processor.tokenizer if self.has_images else processor
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: the end-of-turn label needs one")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Dynamic-resolution image processors (Qwen-VL) merge merge_size x merge_size patches per token.
        self.spatial_merge_size = getattr(getattr(processor, "image_processor", None), "merge_size", None) or 1
        if self.has_images:
            if mdpo_crop == "official" and objective == "mdpo" and self.spatial_merge_size > 1:
                raise ValueError("mdpo_crop='official' crops each image's processed [C, H, W] pixels anew on every "
                                 "forward; this processor (dynamic resolution) returns flattened patches of a "
                                 "size-dependent grid, which cannot be cropped that way: use mdpo_crop='seeded'")
            self.image_token = processor.image_token
            self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
            self.format = prompts.make_format(processor, prompt_format, system_prompt)
            self._as_written = prompts.AsWritten(tok, self.image_token, self.image_token_id)
        else:
            if objective != "dpo":
                raise ValueError(f"objective {objective!r} needs images (m, and m' or the crop m_l); a text-only "
                                 "model trains with objective dpo")
            if prompt_format not in ("auto", "chat_template"):
                raise ValueError(f"prompt_format={prompt_format!r} is for vision-language models; a text-only model "
                                 "uses its tokenizer's chat template ('auto' or 'chat_template')")
            self.image_token = self.image_token_id = None
            self.format = prompts.Conversation(tok, system_prompt) if tok.chat_template is not None else None
            self._as_written = prompts.Completion(tok)
        self.prompt_format = self.format.name if self.format is not None else "as_written"
        self._fixed_count: int | None = None  # placeholder counts, for measure()
        self._counts: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------------------------------

    def _check(self, records) -> None:
        if not isinstance(records, (list, tuple)) or not records:
            raise ValueError(f"the collator needs a non-empty list of records, got {type(records).__name__}")
        images = {c for c in ROLE_IMAGE[self.objective] if c not in (None, "crop")} if self.has_images else set()
        answers = {ROLE_TEXT[k] for k in self.columns}
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise TypeError(f"record {i} must be a dict, got {type(r).__name__}")
            lead = "prompt" if "prompt" in r and "question" not in r else "question"
            for f in sorted(images | answers | {lead}):
                if f not in r:
                    raise ValueError(f"record {i} has no field {f!r}, which objective {self.objective!r} needs "
                                     f"(fields: {sorted(images | answers | {lead})}; a record holding the whole "
                                     "conversation gives 'prompt' instead of 'question')")
            for f in images:
                if not isinstance(r[f], Image.Image):
                    raise TypeError(f"record {i}: {f!r} must be a PIL image, got {type(r[f]).__name__}")
            # Text models take conversational records (lists of messages) too, as TRL does.
            kinds = (str,) if self.has_images else (str, list)
            for f in answers | {lead}:
                if not isinstance(r[f], kinds):
                    raise TypeError(f"record {i}: {f!r} must be a str{'' if self.has_images else ' or a list of messages'}"
                                    f", got {type(r[f]).__name__}")
            if not self.has_images:
                if isinstance(r[lead], str) and lead == "question" and self.format is None:
                    raise ValueError(f"record {i}: a 'question' needs a chat template, which this tokenizer lacks; "
                                     "give a 'prompt' (used as written) instead")
                continue
            for f in answers | ({"question"} if lead == "question" else set()):
                if self.image_token in r[f]:
                    raise ValueError(f"record {i}: {f!r} contains the image token {self.image_token!r}")
            if lead == "prompt" and r["prompt"].count(self.image_token) != 1:
                other = (" (it is written with LLaVA's '<image>': an as-written conversation is in that model's "
                         "own format; give this model questions instead)") if "<image>" in r["prompt"] else ""
                raise ValueError(f"record {i}: 'prompt' must hold the image token {self.image_token!r} once{other}")

    def _encode(self, r: dict) -> prompts.Encoded:
        answers = {name: r[name] for name in {ROLE_TEXT[k] for k in self.columns}}
        if "question" in r:
            return self.format.encode(r["question"], answers)
        if not self.has_images and isinstance(r["prompt"], list):
            if self.format is None:
                raise ValueError("a conversational record needs a chat template, which this tokenizer lacks")
            return self.format.encode(r["prompt"], answers)
        return self._as_written.encode(r["prompt"], answers)

    def _images(self, records) -> tuple[list[list[int]], Images, list[int], list[bytes], set[int]]:
        """Per record the distinct-image index of each column, the distinct images (pixels, and
        patch grids for dynamic-resolution processors), each one's placeholder count, its digest
        (of the image's bytes and of the pixels the model sees, so that a cache key also changes
        with the image processor's settings), and the entries that
        :meth:`PreferenceBatch.forward_pixels` crops anew on every forward."""
        if not self.has_images:
            return [[-1] * NUM_ROLES for _ in records], Images(torch.zeros(0)), [], [], set()
        role_image = ROLE_IMAGE[self.objective]
        index: dict[bytes, int] = {}
        distinct, raw, per_record, recrop = [], [], [], set()
        for r in records:
            row = [-1] * NUM_ROLES
            for k in self.columns:
                name = role_image[k]
                if name == "crop" and self.mdpo_crop == "official":
                    image, key = r["image"], _image_digest(r["image"]) + b"crop on every forward"
                elif name == "crop":
                    image = self._crop(r["image"])
                    key = _image_digest(image)
                else:
                    image = r[name]
                    key = _image_digest(image)
                if key not in index:
                    index[key] = len(distinct)
                    distinct.append(image)
                    raw.append(key)
                    if name == "crop" and self.mdpo_crop == "official":
                        recrop.add(index[key])
                row[k] = index[key]
            per_record.append(row)
        # The processor itself expands the placeholder, so the token count per image is the
        # model family's own rule (fixed for LLaVA-1.5, size-dependent for Qwen-VL's dynamic
        # resolution, whose processor also returns each image's patch grid).
        out = self.processor(text=[self.image_token] * len(distinct), images=distinct, return_tensors="pt",
                             padding=True)
        counts = (out["input_ids"] == self.image_token_id).sum(1).tolist()
        images = Images(out["pixel_values"], out.get("image_grid_thw"))
        if images.grid_thw is not None:
            images.grid_thw = images.grid_thw.long().cpu()
            want = (images.grid_thw.prod(-1) // self.spatial_merge_size ** 2).tolist()
            if want != counts:
                m = self.spatial_merge_size
                raise ValueError(f"the processor expanded the images to {counts} placeholders, but their patch grids "
                                 f"{images.grid_thw.tolist()} with a {m}x{m} merge make {want}")
        grids = [b""] * len(raw) if images.grid_thw is None else [g.numpy().tobytes() for g in images.grid_thw]
        digests = [d + hashlib.sha256(images.select([i]).pixel_values.contiguous().numpy().tobytes() + g).digest()
                   for i, (d, g) in enumerate(zip(raw, grids, strict=True))]
        return per_record, images, counts, digests, recrop

    def _lengths(self, enc: prompts.Encoded, img: list[int], counts: list[int]) -> dict[int, int]:
        """Each column's sequence length, image placeholders expanded."""
        expand = self.has_images
        return {k: len(enc.prompt) + (counts[img[k]] - 1 if expand else 0) + len(enc.responses[ROLE_TEXT[k]])
                for k in self.columns}

    def _fit(self, enc: prompts.Encoded, img: list[int], counts: list[int]):
        """``(prompt ids, {column: response ids}, truncated)`` within ``max_length``, or None to drop."""
        ids, (q0, q1) = enc.prompt, enc.question_span
        at = ids.index(self.image_token_id) if self.has_images else None
        resp = {k: enc.responses[ROLE_TEXT[k]] for k in self.columns}
        lengths = self._lengths(enc, img, counts)
        over = max(lengths.values()) - self.max_length
        if over <= 0:
            return ids, at, resp, False
        if self.truncation == "right":
            # The official code cuts each embedded sequence (image expanded) on the right: the
            # response loses its tail, </s> first; a sequence left with no label is dropped.
            cut = {k: resp[k][: max(0, len(resp[k]) - (lengths[k] - self.max_length))] for k in self.columns}
            return (None if any(not r for r in cut.values()) else (ids, at, cut, True))
        if self.truncation == "drop" or q1 - q0 - over < 1:
            return None
        return ids[: q1 - over] + ids[q1:], at, resp, True

    def _count(self, image) -> int:
        """``image``'s placeholder count, from the processor, without keeping its pixels: one count
        for a fixed-size family (its processor returns no patch grid), one per image size for a
        dynamic-resolution one (the count is a function of the size)."""
        if self._fixed_count is not None:
            return self._fixed_count
        if image.size not in self._counts:
            out = self.processor(text=[self.image_token], images=[image], return_tensors="pt")
            n = int((out["input_ids"] == self.image_token_id).sum())
            if out.get("image_grid_thw") is None:
                self._fixed_count = n
            self._counts[image.size] = n
        return self._counts[image.size]

    def measure(self, record: dict) -> tuple[bool, int, int]:
        """``(kept, longest sequence, prompt tokens)`` of ``record`` as :meth:`__call__` would
        collate it (image tokens included), at the cost of its tokenization: no pixel is
        processed.  The read-time length check of the trainer and ``prepare-data``."""
        self._check([record])
        images, img = [], [-1] * NUM_ROLES
        for k in self.columns:
            name = ROLE_IMAGE[self.objective][k] if self.has_images else None
            if name is None:
                continue
            image = record["image"] if name == "crop" and self.mdpo_crop == "official" else (
                self._crop(record["image"]) if name == "crop" else record[name])
            img[k] = len(images)
            images.append(image)
        counts = [self._count(im) for im in images]
        enc = self._encode(record)
        lengths = self._lengths(enc, img, counts)
        prompt = max(lengths[k] - len(enc.responses[ROLE_TEXT[k]]) for k in self.columns)
        return self._fit(enc, img, counts) is not None, max(lengths.values()), prompt

    def _crop(self, image):
        return seeded_crop(image, self.seed)

    def __call__(self, records) -> PreferenceBatch:
        self._check(records)
        image_index, images, counts, digests, recrop = self._images(records)
        prompt_rows, responses, keys, kept_images = [], [], [], []
        dropped = truncated = 0
        for r, img in zip(records, image_index, strict=True):
            fit = self._fit(self._encode(r), img, counts)
            if fit is None:
                dropped += 1
                continue
            ids, at, resp, cut = fit
            truncated += cut
            # Columns with the same image share one prompt tensor (and, uncut, one tensor per answer).
            by_image = {i: torch.tensor(ids if at is None else ids[:at] + [self.image_token_id] * counts[i] + ids[at + 1:])
                        for i in {img[k] for k in self.columns}}
            by_answer: dict[tuple, torch.Tensor] = {}
            p_row: list[torch.Tensor | None] = [None] * NUM_ROLES
            r_row: list[torch.Tensor | None] = [None] * NUM_ROLES
            h = hashlib.sha256(self.objective.encode())
            for k in self.columns:
                p_row[k] = by_image[img[k]]
                r_row[k] = by_answer.setdefault(tuple(resp[k]), torch.tensor(resp[k]))
                h.update(f"{k}:{len(p_row[k])}:{len(r_row[k])}:".encode() + p_row[k].numpy().tobytes()
                         + r_row[k].numpy().tobytes() + (digests[img[k]] if img[k] >= 0 else b""))
            prompt_rows.append(p_row)
            responses.append(r_row)
            keys.append(h.hexdigest())
            kept_images.append(img)
        # Images of dropped records are not sent to the vision tower.
        used = sorted({i for img in kept_images for i in img if i >= 0})
        remap = {old: new for new, old in enumerate(used)}
        kept_images = [[remap.get(i, -1) for i in img] for img in kept_images]
        images = images.select(used)
        return PreferenceBatch(
            objective=self.objective, columns=self.columns, prompt_ids=prompt_rows, response_ids=responses,
            image_index=kept_images, pixel_values=images.pixel_values, image_token_id=self.image_token_id,
            pad_token_id=self.pad_token_id, record_keys=keys, num_dropped=dropped, num_truncated=truncated,
            recrop=tuple(sorted(remap[i] for i in recrop if i in remap)), image_grid_thw=images.grid_thw,
            spatial_merge_size=self.spatial_merge_size,
        )
