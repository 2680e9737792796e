"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, the dense checkpoints ``Qwen/Qwen3-VL-{2,4,8,32}B-*``):
the adapter.  Loading, the processor and the packed forward are Qwen2.5-VL's
(:mod:`symmpo_fast.models.qwen2_5_vl`); what Qwen3-VL adds:

* **DeepStack.**  Besides the merged features that replace the placeholders, the vision tower
  returns one merged feature tensor per ``deepstack_visual_indexes`` block (``deepstack_features``,
  each ``[tokens, D]``), which the language model adds to the hidden states at the image
  positions after its first decoder layers.  The feature hook repeats the rows of every one of
  them with the main features, so each prefix's image positions receive its own image's
  features in every layer, as in its own sequence.
* **Interleaved M-RoPE.**  The rotary frequencies of the three axes are interleaved
  (t, h, w, t, h, w, ...) instead of Qwen2.5-VL's contiguous sections; the model does this
  itself from the same ``[3, R, L]`` positions, whose rule (and so our packed positions) is
  unchanged.
* **Prompt.**  Qwen3-VL-Instruct's chat template adds no default system turn.

The projector a full fine-tune trains is the main merger and the DeepStack mergers.
"""

from __future__ import annotations

import torch

from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """:class:`Adapter` for ``Qwen3VLForConditionalGeneration``."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def projector(self) -> list[torch.nn.Module]:
        visual = self.model.model.visual
        return [visual.merger, visual.deepstack_merger_list]
