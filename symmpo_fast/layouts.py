"""The forward layouts of a preference batch, for every model family.

    batch = PreferenceCollator(processor, "symmpo")(records)
    policy = sequence_logps(model, batch)                        # [B, 5] fp32, differentiable
    ref = reference_logps(model, batch)                          # no grad; LoRA adapters disabled
    loss, metrics = forward_preference(model, batch, cfg, ref)  # hidden states -> sf.fused_preference_loss

``packing="shared_prefix"`` (default) runs each distinct image through the vision tower once and
each (image, question) prefix through the language model once for all its responses
(:mod:`symmpo_fast.packing`), and sends only the response positions' hidden states to the
fused head.  ``packing="none"`` is the official SymMPO / mDPO layout: one padded full sequence
per record and role, each image re-encoded for every row, full logits -> log_softmax -> gather.
It is the baseline of the benchmarks and the oracle of the tests; all layouts compute the same
numbers.  ``packing="padded"`` keeps the official rows (and their cost in the model body) but
sends only the response positions' hidden states to the fused head: the head's share of the
gain on its own, and the layout for an attention that takes no tree mask (``flash_attention_2``).

What differs between families (how pixels, positions and masks enter the model, where its
hidden states and LM head are) is the :class:`symmpo_fast.models.Adapter`'s; nothing here
names a family.  Unused columns of the objective are never computed and read 0.
"""

from __future__ import annotations

import contextlib

import torch

from . import packing as _packing
from .head import fused_preference_loss, token_logps
from .models import Adapter, adapter_for, find_peft
from .objectives import NUM_ROLES, ObjectiveConfig, preference_loss
from .reference import sequence_logps as _sequence_sums

__all__ = ["sequence_logps", "reference_logps", "forward_preference", "PACKINGS"]

PACKINGS = ("shared_prefix", "padded", "none")
MASK_KINDS = ("sdpa", "eager", "flex_attention")
FLEX_BLOCK = 128
FLEX_ROW_TOKENS = 16384
"""Default row budget with FlexAttention: masked blocks cost nothing, so long rows only save padding."""


def _tree_mask(adapter: Adapter, rows, dtype: torch.dtype):
    impl = adapter.attn_implementation
    if impl == "flex_attention":
        return _packing.block_mask(rows, FLEX_BLOCK)
    mask = _packing.dense_mask(rows)[:, None]  # [R, 1, L, L]
    if impl == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _images(batch, device, index):
    """The distinct images ``index`` as one forward sees them (:class:`symmpo_fast.data.Images`);
    None for a text-only batch."""
    if batch.image_token_id is None:
        return None
    return batch.images(device).select(index)


def _packed_hidden(model, adapter: Adapter, batch, row_tokens: int | None):
    """``(hidden [T, D], rows)``: the hidden state that predicts each response label, packed."""
    impl = adapter.attn_implementation
    if impl not in MASK_KINDS:
        raise ValueError(f"packing='shared_prefix' needs a tree mask, which attn_implementation {impl!r} cannot take; "
                         f"use one of {MASK_KINDS} (flex_attention on CUDA), or packing='padded' (one row per "
                         f"sequence, any attention, fused head)")
    flex = impl == "flex_attention"
    rows = _packing.pack(batch, row_tokens or (FLEX_ROW_TOKENS if flex else None), pad_to=FLEX_BLOCK if flex else 8)
    adapter.check_rows(rows)
    device = adapter.device
    rows = rows.to(device)
    # One image per prefix, in the rows' placeholder order; an image that several prefixes share
    # (records of the batch with the same picture) goes through the vision tower once, the
    # distinct images in order of first use.
    first = {i: n for n, i in enumerate(dict.fromkeys(rows.image_order))}
    images = _images(batch, device, list(first))
    index = None
    if len(first) < len(rows.image_order):
        index = torch.tensor([first[i] for i in rows.image_order], device=device)
    hidden = adapter.hidden_states(model, rows, images, _tree_mask(adapter, rows, adapter.dtype), image_index=index)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.gather_index), rows


def _padded_hidden(model, adapter: Adapter, batch):
    """``(hidden [T, D], labels [T], seq_index [T], rows)``: the official rows (one padded sequence
    per record and column, each image re-encoded) through the model, and the hidden state that
    predicts each response label."""
    u = _packing.unpack(batch)
    gather, labels, seq = u.response_positions()  # on the host, where the ids are
    device = adapter.device
    u = u.to(device)
    images = _images(batch, device, u.image_index)
    hidden = adapter.hidden_states(model, u, images, u.attention_mask)  # [S, L, D]
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather.to(device))
    return hidden, labels.to(device), seq.to(device), u


def _unpacked_logps(model, adapter: Adapter, batch, average: bool) -> torch.Tensor:
    """The official layout and head: full rows through ``model.forward``, full-vocabulary log-softmax."""
    device = adapter.device
    u = _packing.unpack(batch).to(device)
    images = _images(batch, device, u.image_index)  # every row re-encodes its image
    logits = model(**adapter.sequence_kwargs(u, images), use_cache=False).logits[:, :-1]  # [S, L-1, V]: the model's own head
    labels = u.labels[:, 1:]
    valid = labels != _packing.IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid  # [S, L-1]
    seq = tok.sum(-1)
    if average:
        seq = seq / valid.sum(-1)
    return seq.new_zeros(batch.num_records * NUM_ROLES).index_copy(0, u.seq_index, seq).view(-1, NUM_ROLES)


def sequence_logps(model, batch, packing: str = "shared_prefix", backend: str = "auto",
                   row_tokens: int | None = None, average: bool = False) -> torch.Tensor:
    """Sequence log-probs ``[B, 5]`` float32 of every used role of ``batch`` (unused columns 0).

    ``sum_t log p(y_t | prompt, y_<t)`` over the response tokens, end-of-turn included (the mean
    with ``average``).  Differentiable in the model's parameters.  ``backend`` is the head's
    (:func:`symmpo_fast.token_logps`; ``packing="none"`` uses full logits instead); ``row_tokens``
    the packed row budget (:func:`symmpo_fast.packing.pack`).  ``packing`` is one of
    :data:`PACKINGS`.  ``model`` may be wrapped in peft, DDP or torch.compile.
    """
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
    adapter = adapter_for(model)
    if batch.num_records == 0:
        return torch.zeros(0, NUM_ROLES, device=adapter.device)
    if packing == "none":
        return _unpacked_logps(model, adapter, batch, average)
    if packing == "padded":
        hidden, labels, seq, _ = _padded_hidden(model, adapter, batch)
    else:
        hidden, rows = _packed_hidden(model, adapter, batch, row_tokens)
        labels, seq = rows.labels, rows.seq_index
    weight, bias = adapter.output_head()
    # Under autocast (bf16 compute, fp32 master weights: a full fine-tune) the body hands over bf16
    # hidden states; the head takes them in its weight's dtype and decides its own precision.
    tok = token_logps(hidden.to(weight.dtype), weight, labels, bias=bias, softcap=adapter.logit_softcap,
                      temperature=adapter.logit_temperature, backend=backend)  # [T] fp32
    return _sequence_sums(tok, seq, batch.num_records, average)


def reference_logps(model_or_ref, batch, packing: str = "shared_prefix", backend: str = "auto",
                    row_tokens: int | None = None, average: bool = False, disable_adapter: bool = True) -> torch.Tensor:
    """The reference model's ``[B, 5]`` sequence log-probs, under ``torch.no_grad``.

    Pass the policy ``PeftModel`` itself: its LoRA adapters are disabled for the pass (the
    reference is the base model, no second copy in memory).  Pass any other model (a frozen copy
    of the policy) and it is used as it is; ``disable_adapter=False`` keeps a peft model's
    adapters on.  ``average`` must match the objective's ``average_logps``.
    """
    ctx = contextlib.nullcontext()
    peft_model = find_peft(model_or_ref)
    if disable_adapter and peft_model is not None:
        ctx = peft_model.disable_adapter()
    with torch.no_grad(), ctx:
        return sequence_logps(model_or_ref, batch, packing, backend, row_tokens, average)


def forward_preference(model, batch, cfg: ObjectiveConfig, ref_logps: torch.Tensor, packing: str = "shared_prefix",
                       backend: str = "auto", row_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """``loss, metrics`` of one policy forward: the packed hidden states of the response positions,
    the LM head weight, labels and ``seq_index`` go to :func:`symmpo_fast.fused_preference_loss`
    (``packing="padded"``: the official rows' hidden states, same fused loss; ``packing="none"``:
    official layout and head -> :func:`symmpo_fast.preference_loss`).

    ``ref_logps [B, 5]`` from :func:`reference_logps` or a cache keyed by ``batch.record_keys``.
    ``metrics`` adds ``packing/rows`` and ``packing/fill`` (real tokens / row slots).
    """
    if batch.num_records == 0:
        raise ValueError(f"the batch holds no record ({batch.num_dropped} dropped as longer than the collator's "
                         f"max_length): there is no loss to compute; skip the batch or raise max_length")
    missing = sorted(set(cfg.used_columns) - set(batch.columns))
    if missing:
        raise ValueError(f"the objective reads columns {missing}, which a {batch.objective!r} batch does not hold; "
                         f"collate with the matching objective")
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
    adapter = adapter_for(model)
    ref_logps = ref_logps.to(adapter.device)
    if packing == "none":
        policy = sequence_logps(model, batch, "none", average=cfg.average_logps)
        return preference_loss(policy, ref_logps.to(policy.dtype), cfg)
    if packing == "padded":
        hidden, labels, seq, rows = _padded_hidden(model, adapter, batch)
        real_tokens = int(rows.attention_mask.sum())
    else:
        hidden, rows = _packed_hidden(model, adapter, batch, row_tokens)
        labels, seq, real_tokens = rows.labels, rows.seq_index, rows.num_tokens
    weight, bias = adapter.output_head()
    loss, metrics = fused_preference_loss(hidden.to(weight.dtype), weight, labels, seq, ref_logps, cfg,  # see above
                                          backend=backend, bias=bias, softcap=adapter.logit_softcap,
                                          temperature=adapter.logit_temperature)
    metrics["packing/rows"] = torch.tensor(float(rows.input_ids.shape[0]), device=loss.device)
    metrics["packing/fill"] = torch.tensor(real_tokens / rows.input_ids.numel(), device=loss.device)
    return loss, metrics
