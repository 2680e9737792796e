"""Shared-prefix packing: each (image, question) prefix once for all its responses.

The roles of one record form a prefix tree (:class:`symmpo_fast.data.PreferenceBatch` keeps a
prompt and a response per role; roles with the same image have the same prompt)::

    SymMPO   [text before the image] -> [m,  x] -> y_w, y_l, y_w'      (columns 0, 1, 2)
                                     -> [m', x] -> y_w, y_w'           (columns 3, 4)
    mDPO     [text before the image] -> [m,  x] -> y_w, y_l ;  -> [m_l, x] -> y_w
    DPO      [m, x] -> y_w, y_l

The text before the image (BOS, system prompt, ``USER: ``) is one root node shared by both
prefixes when the record has two.  Nodes are laid out depth first, several records per row,
rows balanced to a token budget.  A token's position id continues from its parent's end, so
every response sees exactly the positions it has as a separate sequence (for batches with image
grids, Qwen-VL's M-RoPE positions too, ``[3, R, L]``: :func:`mrope_positions`); a token attends to the
tokens of its ancestor nodes and to the earlier tokens of its own node.  The hidden state that
predicts a response's first token is its prefix's last one, gathered once per response; a
response's last token (its end of turn ``</s>``, or under ``truncation="right"`` its last kept
token) is a label only, never an input, since nothing attends to it.

With P prefix tokens and responses of R tokens, SymMPO feeds 2P + 5R tokens instead of
5(P + R), and the vision tower sees 2 images instead of 5.

Masks are built from the segment metadata (``node_ids [R, L]`` and ``ancestors [R, N, N]``):
:func:`dense_mask` (``[R, L, L]`` bool, for SDPA / eager on the CPU) and :func:`block_mask`
(a FlexAttention ``BlockMask`` for CUDA, built a band of query blocks at a time so no
``L x L`` tensor exists).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .objectives import NUM_ROLES

IGNORE_INDEX = -100


@dataclass
class _Node:
    ids: torch.Tensor  # [n] input ids of this segment
    parent: int  # index in the record's node list, -1 for a root
    image: int  # distinct image whose features fill this node's placeholders, -1 for none


@dataclass
class _Response:
    column: int
    node: int  # the node holding response[:-1]
    labels: torch.Tensor  # [n] the whole response, end-of-turn included


def record_tree(batch, b: int) -> tuple[list[_Node], list[_Response]]:
    """The prefix tree of record ``b``: nodes in depth-first order (parents before children)."""
    groups: dict[int, list[int]] = {}  # image -> columns with that image, in column order
    for k in batch.columns:
        groups.setdefault(batch.image_index[b][k], []).append(k)
    prompts = {img: batch.prompt_ids[b][cols[0]] for img, cols in groups.items()}
    nodes: list[_Node] = []
    shared = 0
    if len(groups) > 1:
        # Everything before the first image placeholder is the same text in every prompt.
        first = {img: int((p == batch.image_token_id).nonzero()[0]) for img, p in prompts.items()}
        shared = min(first.values())
        if shared:
            nodes.append(_Node(next(iter(prompts.values()))[:shared], -1, -1))
    responses: list[_Response] = []
    for img, cols in groups.items():
        nodes.append(_Node(prompts[img][shared:], 0 if shared else -1, img))
        prefix = len(nodes) - 1
        for k in cols:
            resp = batch.response_ids[b][k]
            nodes.append(_Node(resp[:-1], prefix, -1))
            responses.append(_Response(k, len(nodes) - 1, resp))
    return nodes, responses


def balance_rows(sizes: list[int], budget: int) -> list[list[int]]:
    """Items -> rows of at most ``budget`` tokens (an item larger than it gets a row of its own),
    in as few rows as the largest-first greedy fit allows, loads balanced across them."""
    budget = max(budget, max(sizes))
    n = max(1, math.ceil(sum(sizes) / budget))
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    while True:
        loads, rows = [0] * n, [[] for _ in range(n)]
        for i in order:
            r = min(range(n), key=loads.__getitem__)
            if loads[r] + sizes[i] > budget:
                break
            loads[r] += sizes[i]
            rows[r].append(i)
        else:
            return [sorted(r) for r in rows]
        n += 1


@dataclass
class PackedRows:
    """The packed layout of a batch; every tensor on one device."""

    input_ids: torch.Tensor
    """[R, L] int64, image placeholders in place, ``pad_token_id`` after each row's end."""
    position_ids: torch.Tensor
    """[R, L] int64, each node's positions continue from its parent's end."""
    mrope_position_ids: torch.Tensor | None
    """[3, R, L] int64 M-RoPE (temporal, height, width) positions when the batch has image grids
    (Qwen2-VL / Qwen2.5-VL / Qwen3-VL), else None: see :func:`mrope_positions`."""
    node_ids: torch.Tensor
    """[R, L] int64, row-local node of each token; padding belongs to node ``N - 1``."""
    ancestors: torch.Tensor
    """[R, N, N] bool, ``ancestors[r, i, j]``: node j is node i or one of its ancestors."""
    image_order: list[int]
    """The distinct image behind each run of placeholders, in row-major order."""
    gather_index: torch.Tensor
    """[T] int64 into the flattened [R * L] hidden states: the state predicting each label."""
    labels: torch.Tensor
    """[T] int64 response tokens, end-of-turn included."""
    seq_index: torch.Tensor
    """[T] int64 ``b * 5 + column`` of each label."""
    num_tokens: int
    """Tokens before padding."""

    def to(self, device) -> "PackedRows":
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


def mrope_positions(ids: torch.Tensor, pos0: int, image_token_id: int, grid: tuple[int, int, int] | None):
    """``(positions [3, n], next)``: the M-RoPE positions of one node of ``ids [n]`` starting at
    ``pos0``, and the position its children start from.

    Qwen2-VL's rule, as transformers' ``get_rope_index`` applies it to a whole sequence: a text
    token has the same position on the three axes, one more than the previous token's; the
    image's placeholders, ``grid = (t, h, w)`` of them in row-major order, are at
    ``start + (i_t, i_h, i_w)`` where ``start`` is the position after the preceding text, and the
    text after the image continues from ``start + max(h, w)`` (the image's largest position + 1,
    for a still image's t = 1).  A node holds at most one image, as one contiguous run.
    """
    n = len(ids)
    if grid is None:
        return torch.arange(pos0, pos0 + n).expand(3, n), pos0 + n
    t, h, w = grid
    where = (ids == image_token_id).nonzero().squeeze(1)
    a = int(where[0]) if len(where) else 0
    if len(where) != t * h * w or (len(where) and int(where[-1]) - a + 1 != len(where)):
        raise ValueError(f"a prefix's image placeholders must be one run of {t}x{h}x{w} = {t * h * w} tokens; "
                         f"found {len(where)} at positions {where.tolist()[:3]}...")
    start = pos0 + a
    grid_pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    after = start + max(h, w)
    rest = n - a - t * h * w
    positions = torch.cat([torch.arange(pos0, start).expand(3, a), grid_pos.reshape(3, -1) + start,
                           torch.arange(after, after + rest).expand(3, rest)], dim=1)
    return positions, after + rest


def pack(batch, row_tokens: int | None = None, pad_to: int = 8) -> PackedRows:
    """Plan the packed rows of ``batch`` (host work, on the CPU tensors the batch keeps).

    ``row_tokens``: the token budget of a row (default: the largest record, i.e. about one
    record per row; FlexAttention skips masked blocks, so it can take several thousand).
    ``pad_to``: row length rounded up to a multiple of it (FlexAttention's block size on CUDA).
    """
    trees = [record_tree(batch, b) for b in range(batch.num_records)]
    sizes = [sum(len(n.ids) for n in nodes) for nodes, _ in trees]
    rows = balance_rows(sizes, row_tokens or max(sizes))
    R = len(rows)
    L = -(-max(sum(sizes[b] for b in row) for row in rows) // pad_to) * pad_to
    N = max(sum(len(trees[b][0]) for b in row) for row in rows) + 1
    input_ids = torch.full((R, L), batch.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(R, L, dtype=torch.long)
    # M-RoPE: each distinct image's placeholder grid (t, h / merge, w / merge).
    grids = batch.image_grid_thw
    if grids is not None:
        merge = batch.spatial_merge_size
        grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grids.tolist()]
        mrope = torch.zeros(3, R, L, dtype=torch.long)
    node_ids = torch.full((R, L), N - 1, dtype=torch.long)
    ancestors = torch.zeros(R, N, N, dtype=torch.bool)
    ancestors[:, N - 1, N - 1] = True  # padding sees itself, so no softmax row is empty
    image_order: list[int] = []
    gather, labels, seq = [], [], []
    for r, row in enumerate(rows):
        t = n0 = 0  # next free token and node of the row
        for b in row:
            nodes, responses = trees[b]
            start, end = [0] * len(nodes), [0] * len(nodes)  # token span of each node in the row
            pos_end = [0] * len(nodes)  # position id after each node's last token
            mrope_end = [0] * len(nodes)  # the same for M-RoPE, where an image advances it by max(h, w)
            for i, node in enumerate(nodes):
                n = len(node.ids)
                pos0 = 0 if node.parent < 0 else pos_end[node.parent]
                start[i], end[i], pos_end[i] = t, t + n, pos0 + n
                input_ids[r, t:t + n] = node.ids
                position_ids[r, t:t + n] = torch.arange(pos0, pos0 + n)
                if grids is not None:
                    mrope[:, r, t:t + n], mrope_end[i] = mrope_positions(
                        node.ids, 0 if node.parent < 0 else mrope_end[node.parent], batch.image_token_id,
                        grids[node.image] if node.image >= 0 else None)
                node_ids[r, t:t + n] = n0 + i
                ancestors[r, n0 + i, n0 + i] = True
                if node.parent >= 0:
                    ancestors[r, n0 + i] |= ancestors[r, n0 + node.parent]
                if node.image >= 0:
                    image_order.append(node.image)
                t += n
            for resp in responses:
                parent_end = end[nodes[resp.node].parent]
                # label j is predicted by the state before it: the prefix's last token, then the node's own
                idx = torch.cat([torch.tensor([parent_end - 1]), torch.arange(start[resp.node], end[resp.node])])
                gather.append(r * L + idx)
                labels.append(resp.labels)
                seq.append(torch.full_like(resp.labels, b * NUM_ROLES + resp.column))
            n0 += len(nodes)
    return PackedRows(
        input_ids=input_ids, position_ids=position_ids, mrope_position_ids=mrope if grids is not None else None,
        node_ids=node_ids, ancestors=ancestors,
        image_order=image_order, gather_index=torch.cat(gather), labels=torch.cat(labels).long(),
        seq_index=torch.cat(seq).long(), num_tokens=sum(sizes),
    )


def _visible(rows: PackedRows, q: slice) -> torch.Tensor:
    """[R, len(q), L] bool: may query token q attend to key token k."""
    node = rows.node_ids
    R, L = node.shape
    seen = torch.gather(rows.ancestors, 1, node[:, q, None].expand(-1, -1, rows.ancestors.shape[2]))  # [R, q, N]
    mask = torch.gather(seen, 2, node[:, None, :].expand(-1, seen.shape[1], -1))  # [R, q, L]
    qi = torch.arange(L, device=node.device)[q]
    return mask & (torch.arange(L, device=node.device)[None, :] <= qi[:, None])


def dense_mask(rows: PackedRows) -> torch.Tensor:
    """[R, L, L] bool attention mask (True: attend), for SDPA or eager attention."""
    return _visible(rows, slice(None))


def mask_mod(rows: PackedRows):
    """The FlexAttention ``mask_mod`` of ``rows``: the same predicate as :func:`dense_mask`."""
    node, anc = rows.node_ids, rows.ancestors

    def tree_mask(b, h, q, kv):
        return (kv <= q) & anc[b, node[b, q], node[b, kv]]

    return tree_mask


def block_mask(rows: PackedRows, block_size: int = 128, band_tokens: int = 2**24):
    """A FlexAttention ``BlockMask`` for ``rows`` (whose length must be a multiple of ``block_size``).

    Block classes come from the segment metadata one band of query blocks at a time (a band holds
    about ``band_tokens`` mask entries), so the mask never exists as an ``L x L`` tensor; the
    partial blocks keep :func:`mask_mod`, full blocks skip it and empty ones are never visited.
    """
    from torch.nn.attention.flex_attention import BlockMask

    R, L = rows.node_ids.shape
    if L % block_size:
        raise ValueError(f"row length {L} is not a multiple of block_size {block_size}; pack with pad_to={block_size}")
    nb = L // block_size
    per_band = max(1, band_tokens // (R * block_size * L))
    any_, all_ = [], []
    for q0 in range(0, nb, per_band):
        q1 = min(nb, q0 + per_band)
        m = _visible(rows, slice(q0 * block_size, q1 * block_size)).view(R, q1 - q0, block_size, nb, block_size)
        any_.append(m.any(4).any(2))
        all_.append(m.all(4).all(2))
    full = torch.cat(all_, 1)  # [R, nb, nb]
    partial = torch.cat(any_, 1) & ~full

    def as_indices(blocks: torch.Tensor):
        # BlockMask wants, per query block, the count of kv blocks and their indices listed first.
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_idx = as_indices(partial)
    full_num, full_idx = as_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod(rows), seq_lengths=(L, L))


@dataclass
class UnpackedRows:
    """The official layout: one right-padded full sequence per record and used column."""

    input_ids: torch.Tensor
    """[S, L] int64."""
    attention_mask: torch.Tensor
    """[S, L] int64, 1 on real tokens."""
    labels: torch.Tensor
    """[S, L] int64, the response tokens at their own positions, -100 elsewhere (shift before use)."""
    image_index: torch.Tensor
    """[S] int64 into the batch's ``pixel_values``: each row re-encodes its image."""
    seq_index: torch.Tensor
    """[S] int64 ``b * 5 + column`` of each row."""

    @property
    def position_ids(self) -> torch.Tensor:
        """[S, L] int64: 0, 1, ... on each row's real tokens (right padding reads its last position)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def response_positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gather_index [T], labels [T], seq_index [T])``: for every response label, the flat
        index ``s * L + t`` of the position that predicts it (the one before it), the label, and
        its sequence ``b * 5 + column``; in row-major order."""
        L = self.labels.shape[1]
        s, t = (self.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        return s * L + t, self.labels[s, t + 1], self.seq_index[s]

    def to(self, device) -> "UnpackedRows":
        return UnpackedRows(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def unpack(batch) -> UnpackedRows:
    """The ``packing="none"`` baseline layout, as the official SymMPO / mDPO code batches it."""
    seqs = [(b, k, *batch.sequence(b, k)) for b in range(batch.num_records) for k in batch.columns]
    L = max(len(ids) for _, _, ids, _ in seqs)
    S = len(seqs)
    input_ids = torch.full((S, L), batch.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(S, L, dtype=torch.long)
    labels = torch.full((S, L), IGNORE_INDEX, dtype=torch.long)
    for s, (_, _, ids, lab) in enumerate(seqs):
        input_ids[s, :len(ids)], attention_mask[s, :len(ids)], labels[s, :len(ids)] = ids, 1, lab
    image_index = torch.tensor([batch.image_index[b][k] for b, k, _, _ in seqs])
    seq_index = torch.tensor([b * NUM_ROLES + k for b, k, _, _ in seqs])
    return UnpackedRows(input_ids, attention_mask, labels, image_index, seq_index)
