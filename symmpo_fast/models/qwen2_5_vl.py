"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) and Qwen2-VL (``Qwen2VLForConditionalGeneration``,
the same model code): the adapter, the loader and the image-only processor.

What differs from LLaVA, and how the packed forward handles it:

* **Dynamic resolution.**  The processor resizes each image to a multiple of 28 px between
  ``min_pixels`` and ``max_pixels`` and returns its flattened 14 px patches (``pixel_values
  [patches, 1176]``, all images one after the other) with each image's patch grid
  (``image_grid_thw [images, 3]``); an image of t x h x w patches has t*h*w / 4 placeholders.
  :class:`symmpo_fast.data.Images` keeps the two together and selects an image's run of patch
  rows.
* **M-RoPE.**  Positions are ``[3, R, L]`` (temporal, height, width): text tokens share one
  position on the three axes, an image's placeholders follow its (t, h/2, w/2) grid, and the text
  after it continues from the image's largest position + 1.  We compute them from the packed
  segments (:func:`symmpo_fast.packing.mrope_positions`), so each response continues from its
  own prefix's last position, exactly as in its own sequence; the model's ``get_rope_index``
  runs on the official layout's whole sequences only (``mm_token_type_ids`` marks the
  placeholders there), which is what the tests compare against.
* **One vision pass per distinct image.**  The vision tower takes the flat patches with their
  grids and returns the merged features flat (``pooler_output [tokens, D]``).  Under
  :meth:`Qwen2_5_VLAdapter.image_feature_hook` the model is given each distinct image's patches
  once but the grid of every placeholder image: a pre-hook hands the vision tower the distinct
  grids, and a forward hook repeats each image's rows of ``pooler_output`` (and, for Qwen3-VL,
  of every DeepStack feature) for each prefix that uses it, before the model splits them per
  placeholder image.
* **Processor.**  transformers' ``Qwen2_5_VLProcessor`` also wants a video processor, which needs
  torchvision; images are all this trainer reads, so :func:`image_only_processor` builds the
  same processor without it (same tokenizer, chat template and image expansion), with the PIL
  image processor ``Qwen2VLImageProcessorPil`` wherever it runs (with torchvision installed,
  transformers 5 would pick a torchvision one, whose resize gives other pixels).

The prompt is the checkpoint's own chat template (``prompt_format=auto`` is ``chat_template``
for Qwen): Qwen2-VL / Qwen2.5-VL-Instruct add the system turn "You are a helpful assistant."
when a conversation has none; the labels are the answer and the template's end of turn
``<|im_end|>\\n``.  The language model takes the tree mask with ``sdpa`` or ``eager`` attention;
transformers does not enable FlexAttention for these models, so ``sdpa`` is also the CUDA default
(a dense boolean tree mask per row).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..data import run_rows
from ..packing import PackedRows
from .base import Adapter, attn_implementations, prepare

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def qwen_image_processor_class():
    """``Qwen2VLImageProcessorPil``, the PIL one of the Qwen2-VL image processors (transformers
    5.17 and 5.24 have it; Qwen2.5-VL and Qwen3-VL use the same class with other settings), else
    the plain ``Qwen2VLImageProcessor``, which is the PIL one where the backends are not split."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil


def _image_only(base: type) -> type:
    """``base`` (a Qwen-VL processor class) without its video processor: its ``__init__`` takes
    the image processor, the tokenizer and the chat template only, so ``ProcessorMixin`` neither
    asks for nor saves a video processor.  Same name as ``base``, so that a saved
    ``processor_config.json`` names the real class."""
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__,
                                         "__doc__": f"``{base.__name__}`` for images only: no video processor."})


def image_only_processor(family: str, name_or_path, image_processor=None, chat_template: str | None = None, **kwargs):
    """The family's processor (``family``: a key of :data:`PROCESSORS`) without a video processor,
    from a checkpoint (a Hub id or a directory): its tokenizer, its image processor read by the
    PIL class (unless ``image_processor`` is given), its chat template (``chat_template.jinja``,
    ``chat_template.json`` or the tokenizer's).  ``kwargs`` (e.g. ``min_pixels``, ``max_pixels``)
    go to the image processor."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if image_processor is None:
        image_processor = qwen_image_processor_class().from_pretrained(str(name_or_path), **kwargs)
    if chat_template is None:
        chat_template = _read_chat_template(str(name_or_path)) or tokenizer.chat_template
    if chat_template is None:
        raise ValueError(f"{name_or_path}: no chat template (chat_template.jinja, chat_template.json or the "
                         "tokenizer's); the Qwen-VL prompt is built from it")
    cls = _image_only(getattr(transformers, PROCESSORS[family]))
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _read_chat_template(name_or_path: str) -> str | None:
    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if filename.endswith(".json") else text
    return None


def load_qwen_vl(name_or_path: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
                 attn_implementation: str | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, **kwargs):
    """``(model, processor)`` of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (``Qwen/Qwen2.5-VL-7B-Instruct``
    or a directory written by ``save_pretrained``); the family is read from its config.

    ``attn_implementation`` defaults to ``sdpa`` (the vision tower always uses SDPA);
    ``min_pixels`` / ``max_pixels`` override the image processor's resolution range (the
    placeholder count per image follows).  ``kwargs`` go to ``from_pretrained``.
    """
    import transformers
    from transformers import AutoConfig

    family = AutoConfig.from_pretrained(name_or_path).model_type
    if family not in MODEL_CLASSES:
        raise ValueError(f"{name_or_path}: model type {family!r} is not a Qwen-VL family ({sorted(MODEL_CLASSES)})")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    model = getattr(transformers, MODEL_CLASSES[family]).from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementations(attn_implementation or "sdpa"), **kwargs)
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = image_only_processor(family, name_or_path, **pixels)
    return prepare(model.to(device)), processor



class Qwen2_5_VLAdapter(Adapter):
    """:class:`Adapter` for ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen2VLForConditionalGeneration``."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl", "qwen2_vl")

    @classmethod
    def _model_classes(cls) -> tuple[type, ...]:
        import transformers

        return tuple(getattr(transformers, MODEL_CLASSES[t]) for t in cls.model_types)

    @classmethod
    def accepts(cls, model) -> bool:
        return isinstance(model, cls._model_classes())

    @classmethod
    def accepts_config(cls, config) -> bool:
        return config.model_type in cls.model_types

    @classmethod
    def load(cls, name_or_path, dtype, device, attn_implementation=None, **kwargs):
        return load_qwen_vl(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                            **kwargs)

    @classmethod
    def load_processor(cls, name_or_path: str):
        from transformers import AutoConfig

        return image_only_processor(AutoConfig.from_pretrained(name_or_path).model_type, name_or_path)

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    def projector(self) -> list[torch.nn.Module]:
        """The vision tower's parts that map its features into the language model's space."""
        return [self.model.model.visual.merger]

    def full_finetune_modules(self) -> list[torch.nn.Module]:
        return [self.model.model.language_model, *self.projector(), self.model.lm_head]

    def position_ids(self, rows) -> torch.Tensor:
        """``[3, R, L]`` M-RoPE positions of packed rows, computed by :func:`symmpo_fast.packing.pack`."""
        if rows.mrope_position_ids is None:
            raise ValueError("a Qwen-VL model needs M-RoPE positions, which pack() computes from the batch's image "
                             "grids; this batch has none (collate with the model's own Qwen-VL processor)")
        return rows.mrope_position_ids

    def _grid(self, images, image_index) -> torch.Tensor:
        grid = images.grid_thw if image_index is None else images.grid_thw[image_index.cpu()]
        return grid.to(self.device)

    def sequence_kwargs(self, rows, images) -> dict:
        return dict(input_ids=rows.input_ids, attention_mask=rows.attention_mask, pixel_values=images.pixel_values,
                    image_grid_thw=images.grid_thw.to(self.device),
                    mm_token_type_ids=(rows.input_ids == self.image_token_id).int())

    def forward_kwargs(self, rows, images, attention_mask, image_index=None) -> dict:
        if images.grid_thw is None:
            raise ValueError("Qwen-VL models take flattened patches with their grids (image_grid_thw); these images "
                             "have none: collate with the model's own Qwen-VL processor")
        if not isinstance(rows, PackedRows):  # the official rows (packing="padded"): the model's own positions
            return dict(self.sequence_kwargs(rows, images), logits_to_keep=1, use_cache=False)
        # image_grid_thw: the grid of every placeholder image, as the model splits the features
        # per image; under the feature hook the vision tower sees each distinct one once.
        return dict(input_ids=rows.input_ids, attention_mask=attention_mask, position_ids=self.position_ids(rows),
                    pixel_values=images.pixel_values, image_grid_thw=self._grid(images, image_index),
                    logits_to_keep=1, use_cache=False)

    @contextlib.contextmanager
    def image_feature_hook(self, index: torch.Tensor):
        """The vision tower runs on each distinct image once; its flat outputs are expanded to the
        placeholder images ``index`` (``index_select`` over token rows: a shared image's
        gradient is the sum over its uses).

        The model hands the vision tower the placeholder images' grids (``image_grid_thw[index]``,
        which it also splits the features by); the pre-hook swaps in the distinct images' grids
        (``distinct[index] = placeholder``) and the forward hook repeats the rows of
        ``pooler_output [tokens, D]`` and of every ``deepstack_features[k] [tokens, D]``.
        """
        visual = self.vision_tower
        merge = visual.spatial_merge_size
        token_rows = {}

        def swap_grid(module, args, kwargs):
            placeholder = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            distinct = placeholder.new_zeros(int(index.max()) + 1, 3)
            distinct[index.to(placeholder.device)] = placeholder
            tokens = distinct.prod(-1) // merge**2  # [distinct] placeholder tokens of each image
            token_rows["index"] = run_rows(tokens, index.to(tokens.device))
            if "grid_thw" in kwargs:
                return args, dict(kwargs, grid_thw=distinct)
            return (args[0], distinct, *args[2:]), kwargs

        def expand(module, args, kwargs, out):
            rows = token_rows.pop("index").to(out.pooler_output.device)
            out.pooler_output = out.pooler_output.index_select(0, rows)
            if getattr(out, "deepstack_features", None) is not None:
                out.deepstack_features = [f.index_select(0, rows) for f in out.deepstack_features]
            return out

        handles = [visual.register_forward_pre_hook(swap_grid, with_kwargs=True),
                   visual.register_forward_hook(expand, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
