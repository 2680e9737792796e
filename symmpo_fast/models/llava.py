"""LLaVA-1.5 (transformers' ``LlavaForConditionalGeneration``): the adapter and the loader.

The packed rows go through the model's own ``forward``: it runs the vision tower and projector
on the pixels it is given (each distinct image of the batch once; a forward hook on the
projector repeats the features for each prefix that uses the image), scatters the features into
the placeholders, and hands our position ids and tree mask to the Llama language model, which
passes a 4-D mask or a ``BlockMask`` straight to the attention.  ``logits_to_keep=1`` keeps its
LM head to one position per row (R x V, negligible): the fused head computes the log-probs
from the response positions' hidden states instead.
"""

from __future__ import annotations

import contextlib

import torch

from .base import Adapter, attn_implementations, prepare


class LlavaAdapter(Adapter):
    """:class:`Adapter` for ``LlavaForConditionalGeneration`` (``llava-hf/llava-1.5-*-hf`` layout)."""

    family = "llava"

    @staticmethod
    def accepts(model) -> bool:
        from transformers import LlavaForConditionalGeneration

        return isinstance(model, LlavaForConditionalGeneration)

    @classmethod
    def accepts_config(cls, config) -> bool:
        return config.model_type == "llava"

    @classmethod
    def load(cls, name_or_path, dtype, device, attn_implementation=None, **kwargs):
        return load_llava(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation, **kwargs)

    @classmethod
    def load_processor(cls, name_or_path: str):
        return llava_processor(name_or_path)

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def full_finetune_modules(self) -> list[torch.nn.Module]:
        return [self.model.model.language_model, self.model.model.multi_modal_projector, self.model.lm_head]

    def forward_kwargs(self, rows, images, attention_mask, image_index=None) -> dict:
        return dict(input_ids=rows.input_ids, pixel_values=images.pixel_values, attention_mask=attention_mask,
                    position_ids=self.position_ids(rows), logits_to_keep=1, use_cache=False)

    @contextlib.contextmanager
    def image_feature_hook(self, index: torch.Tensor):
        """The projector's output ``[images, tokens, D]`` is expanded to ``[len(index), tokens, D]``
        (``index_select``: a shared image's gradient is the sum over its uses)."""
        def expand(module, args, out):
            return out.index_select(0, index.to(out.device))

        handle = self.model.model.multi_modal_projector.register_forward_hook(expand)
        try:
            yield
        finally:
            handle.remove()


def clip_image_processor_pil():
    """The PIL-backed CLIP image processor class.

    The official LLaVA-1.5 / SymMPO code preprocessed images with the PIL CLIP processor; with
    torchvision installed, transformers 5 picks the torchvision one, whose resize gives other
    pixels (8.5 % of the values of a LLaVA-1.5 image differ by at least 1/255), so LLaVA-1.5 is
    pinned to PIL.  Its name changed in transformers 5.5 or so.
    """
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:  # older transformers 5: the plain class is the PIL one
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil


def load_llava(name_or_path: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
               attn_implementation: str | None = None, **kwargs):
    """``(model, processor)`` from a checkpoint in the ``llava-hf/llava-1.5-7b-hf`` layout (a hub id
    or a directory written by ``save_pretrained``).

    ``attn_implementation`` defaults to ``flex_attention`` on CUDA (block-sparse tree masks) and
    ``sdpa`` elsewhere; the vision tower always uses SDPA.  The image processor is the PIL one
    (:func:`clip_image_processor_pil`), whatever transformers would pick.  ``kwargs`` go to ``from_pretrained``.
    """
    from transformers import LlavaForConditionalGeneration

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if attn_implementation is None:
        attn_implementation = "flex_attention" if device.type == "cuda" else "sdpa"
    model = LlavaForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype,
        attn_implementation=attn_implementations(attn_implementation), **kwargs)
    return prepare(model.to(device)), llava_processor(name_or_path)


def llava_processor(name_or_path: str):
    """The checkpoint's processor with the PIL CLIP image processor (:func:`clip_image_processor_pil`)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    pil = clip_image_processor_pil()
    if type(processor.image_processor) is not pil:
        processor.image_processor = pil.from_pretrained(name_or_path)
    return processor
