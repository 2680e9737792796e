"""Tiny random-init Qwen2-VL / Qwen2.5-VL / Qwen3-VL models for tests and benchmarks: no download,
built from configs, with the offline tokenizers and official chat templates shipped in
``symmpo_fast/assets/qwen2_5_vl/`` and ``symmpo_fast/assets/qwen3_vl/``.

The same architectures as ``Qwen/Qwen2.5-VL-7B-Instruct`` (window-attention vision tower, 2x2
patch merger, M-RoPE language model) and ``Qwen/Qwen3-VL-8B-Instruct`` (learned vision position
grid, DeepStack mergers feeding the first decoder layers, interleaved M-RoPE, QK-norm), scaled
down: 4 px patches, 2x2 merge, so an image of H x W pixels gives about H*W/64 placeholder tokens
(between ``min_pixels`` and ``max_pixels``: dynamic resolution), hidden 64, 2 layers.

    model, processor = build_tiny_qwen2_5_vl(seed=0)          # fp32, CPU, SDPA
    model, processor = build_tiny_qwen3_vl(hidden_size=128)   # any spec field by name
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyQwenVLSpec:
    """Sizes of a tiny Qwen-VL; any field can be overridden by name in the builders."""

    patch_size: int = 4
    """Vision patch side in pixels (14 in Qwen2.5-VL, 16 in Qwen3-VL)."""
    merge_size: int = 2
    """Patches merged per placeholder token along each side (2 in every released checkpoint)."""
    min_pixels: int = 8 * 8 * 4
    """The image processor resizes each image to at least this many pixels (4 placeholder tokens)."""
    max_pixels: int = 64 * 64
    """... and at most this many (64 placeholder tokens)."""
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_depth: int = 3
    vision_heads: int = 2
    window_size: int = 16
    """Qwen2.5-VL's attention window in pixels (112 in the 7B: 4 x 4 merged tokens); smaller than
    most test images, so the window and the full-attention blocks differ."""
    deepstack_visual_indexes: tuple[int, ...] = (0, 1)
    """Qwen3-VL: the vision blocks whose features are added after decoder layers 0, 1, ..."""
    num_position_embeddings: int = 64
    """Qwen3-VL: the learned vision position grid (8 x 8), interpolated to each image's grid."""
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """Fewer than the query heads, so grouped-query attention is exercised."""
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    """Rotary frequencies per axis (t, h, w): they sum to head_dim / 2 = 8 (16, 24, 24 in the 7B)."""
    vocab_multiple: int = 128
    """The embedding rows are rounded up to a multiple of this, as the real checkpoints pad theirs
    (151665 tokens, 152064 rows in Qwen2.5-VL-7B): the head's log-softmax covers the unused rows."""
    max_position_embeddings: int = 4096
    initializer_range: float = 0.1
    """Larger than the checkpoints' 0.02: at hidden 64, weights that small leave attention nearly
    uniform, and the log-probs would hardly depend on positions or masks (a wrong M-RoPE rule or
    a plain causal mask then moves them by 3e-5 relative instead of 2e-2)."""
    attn_implementation: str = "sdpa"
    """Of the language model: ``sdpa`` (dense masks) or ``eager``."""
    dtype: torch.dtype = torch.float32


def _spec(builder: str, overrides: dict) -> TinyQwenVLSpec:
    fields = [f.name for f in dataclasses.fields(TinyQwenVLSpec)]
    unknown = set(overrides) - set(fields)
    if unknown:
        raise TypeError(f"{builder} got unknown overrides {sorted(unknown)}; fields are {fields}")
    return dataclasses.replace(TinyQwenVLSpec(), **overrides)


def _vocab_size(tokenizer, spec: TinyQwenVLSpec) -> int:
    return -(-len(tokenizer) // spec.vocab_multiple) * spec.vocab_multiple


def _text_kwargs(spec: TinyQwenVLSpec, tokenizer) -> dict:
    return dict(
        vocab_size=_vocab_size(tokenizer, spec), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings, initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def _top_kwargs(spec: TinyQwenVLSpec, tokenizer) -> dict:
    """The top-level config's fields: the special token ids and the initialisation."""
    ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{token}|>") for name, token in (
        ("vision_start", "vision_start"), ("vision_end", "vision_end"), ("image", "image_pad"), ("video", "video_pad"))}
    return dict(ids, tie_word_embeddings=False, initializer_range=spec.initializer_range)


def tiny_qwen2_5_vl_config(spec: TinyQwenVLSpec, tokenizer, family: str = "qwen2_5_vl"):
    """The ``Qwen2_5_VLConfig`` (``family="qwen2_vl"``: ``Qwen2VLConfig``) of ``spec``."""
    text = dict(_text_kwargs(spec, tokenizer), rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": list(spec.mrope_section)})
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden_size, hidden_size=spec.hidden_size,
                      mlp_ratio=spec.vision_intermediate_size // spec.vision_hidden_size, num_heads=spec.vision_heads,
                      patch_size=spec.patch_size, spatial_merge_size=spec.merge_size, temporal_patch_size=2,
                      initializer_range=spec.initializer_range)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **_top_kwargs(spec, tokenizer))
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                  intermediate_size=spec.vision_intermediate_size, num_heads=spec.vision_heads,
                  patch_size=spec.patch_size, spatial_merge_size=spec.merge_size, temporal_patch_size=2,
                  window_size=spec.window_size, out_hidden_size=spec.hidden_size,
                  fullatt_block_indexes=[spec.vision_depth - 1], tokens_per_second=2,
                  initializer_range=spec.initializer_range)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_top_kwargs(spec, tokenizer))


def tiny_qwen3_vl_config(spec: TinyQwenVLSpec, tokenizer):
    """The ``Qwen3VLConfig`` of ``spec``."""
    from transformers import Qwen3VLConfig

    head_dim = spec.hidden_size // spec.num_attention_heads
    text = dict(_text_kwargs(spec, tokenizer), head_dim=head_dim, rope_parameters={
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": list(spec.mrope_section),
        "mrope_interleaved": True})
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
                  intermediate_size=spec.vision_intermediate_size, num_heads=spec.vision_heads,
                  patch_size=spec.patch_size, spatial_merge_size=spec.merge_size, temporal_patch_size=2,
                  out_hidden_size=spec.hidden_size, num_position_embeddings=spec.num_position_embeddings,
                  deepstack_visual_indexes=list(spec.deepstack_visual_indexes),
                  initializer_range=spec.initializer_range)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **_top_kwargs(spec, tokenizer))


def _build(model_cls, config, spec: TinyQwenVLSpec, seed: int):
    from .base import attn_implementations

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls._from_config(config, attn_implementation=attn_implementations(spec.attn_implementation),
                                      dtype=spec.dtype)


def _image_processor(spec: TinyQwenVLSpec, family: str):
    from .qwen2_5_vl import qwen_image_processor_class

    # Qwen3-VL normalises with mean = std = 0.5, Qwen2-VL / Qwen2.5-VL with CLIP's statistics.
    stats = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if family == "qwen3_vl" else {}
    return qwen_image_processor_class()(patch_size=spec.patch_size, merge_size=spec.merge_size,
                                        temporal_patch_size=2, min_pixels=spec.min_pixels,
                                        max_pixels=spec.max_pixels, **stats)


def build_tiny_qwen2_5_vl(seed: int = 0, family: str = "qwen2_5_vl", **overrides):
    """``(model, processor)``: a random-init ``Qwen2_5_VLForConditionalGeneration`` (``family="qwen2_vl"``:
    ``Qwen2VLForConditionalGeneration``, the same code path) and its image-only processor with the
    Qwen2.5-VL chat template.  ``overrides`` are :class:`TinyQwenVLSpec` fields; the weights depend
    on ``seed`` only (the global RNG is left as it was)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from .base import prepare
    from .qwen2_5_vl import ASSETS, image_only_processor

    spec = _spec("build_tiny_qwen2_5_vl", overrides)
    processor = image_only_processor(family, ASSETS / "qwen2_5_vl", _image_processor(spec, family))
    config = tiny_qwen2_5_vl_config(spec, processor.tokenizer, family)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    return prepare(_build(cls, config, spec, seed)), processor


def build_tiny_qwen2_vl(seed: int = 0, **overrides):
    """:func:`build_tiny_qwen2_5_vl` with ``family="qwen2_vl"``."""
    return build_tiny_qwen2_5_vl(seed, family="qwen2_vl", **overrides)


def build_tiny_qwen3_vl(seed: int = 0, **overrides):
    """``(model, processor)``: a random-init ``Qwen3VLForConditionalGeneration`` and its image-only
    processor with the Qwen3-VL chat template; as :func:`build_tiny_qwen2_5_vl`."""
    from transformers import Qwen3VLForConditionalGeneration

    from .base import prepare
    from .qwen2_5_vl import ASSETS, image_only_processor

    spec = _spec("build_tiny_qwen3_vl", overrides)
    processor = image_only_processor("qwen3_vl", ASSETS / "qwen3_vl", _image_processor(spec, "qwen3_vl"))
    config = tiny_qwen3_vl_config(spec, processor.tokenizer)
    return prepare(_build(Qwen3VLForConditionalGeneration, config, spec, seed)), processor
