"""Shared-prefix packing is exact: the packed layout reproduces every separate sequence, and the
tiny LLaVA gives the same log-probs and gradients packed as in the official unpacked layout."""

import pytest
import torch
from vlm_records import make_records

import symmpo_fast as sf
from symmpo_fast import packing
from symmpo_fast.data import PreferenceCollator
from symmpo_fast.models import build_tiny_llava, sequence_logps

OBJECTIVES = ("symmpo", "mdpo", "dpo")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0)


@pytest.fixture(scope="module")
def batches(tiny):
    _, processor = tiny
    records = make_records(5, seed=11)
    records[2]["contrast_chosen"] = ""  # a response that is only </s>
    return {obj: PreferenceCollator(processor, obj)(records) for obj in OBJECTIVES}


def test_record_tree_shares_text_and_prefixes(batches):
    b = batches["symmpo"]
    nodes, responses = packing.record_tree(b, 0)
    first_image = int((b.prompt_ids[0][0] == b.image_token_id).nonzero()[0])
    # [<s>USER: ] -> [m, x] -> 3 responses ; -> [m', x] -> 2 responses
    assert [n.parent for n in nodes] == [-1, 0, 1, 1, 1, 0, 5, 5]
    assert len(nodes[0].ids) == first_image and nodes[0].image == -1
    assert [r.column for r in responses] == [0, 1, 2, 3, 4]
    assert [nodes[n.node].parent for n in responses] == [1, 1, 1, 5, 5]
    nodes, responses = packing.record_tree(batches["dpo"], 0)
    assert [n.parent for n in nodes] == [-1, 0, 0]  # one image: the whole prompt is one node
    nodes, responses = packing.record_tree(batches["mdpo"], 0)
    assert [n.parent for n in nodes] == [-1, 0, 1, 1, 0, 4] and [r.column for r in responses] == [0, 1, 3]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("row_tokens", [None, 250, 10_000])
def test_each_response_sees_exactly_its_own_sequence(batches, objective, row_tokens):
    """From the state that predicts a response's last label, the visible tokens in row order are
    the separate sequence (minus its last token), at the separate sequence's positions."""
    batch = batches[objective]
    rows = packing.pack(batch, row_tokens)
    mask = packing.dense_mask(rows)
    R, L = rows.input_ids.shape
    largest = max(sum(len(n.ids) for n in packing.record_tree(batch, b)[0]) for b in range(batch.num_records))
    loads = (rows.input_ids != batch.pad_token_id).sum(1)
    assert L % 8 == 0 and (loads <= max(row_tokens or 0, largest)).all()
    if row_tokens is None:  # the budget is the largest record: about one record per row
        assert R > 1
    elif row_tokens == 10_000:
        assert R == 1
    flat_ids, flat_pos = rows.input_ids.reshape(-1), rows.position_ids.reshape(-1)
    for s in rows.seq_index.unique().tolist():
        b, k = divmod(s, 5)
        ids, _ = batch.sequence(b, k)
        where = (rows.seq_index == s).nonzero().squeeze(1)
        assert torch.equal(rows.labels[where], batch.response_ids[b][k])
        last = int(rows.gather_index[where[-1]])
        r, t = divmod(last, L)
        visible = mask[r, t].nonzero().squeeze(1)
        assert torch.equal(rows.input_ids[r, visible], ids[:-1])
        assert torch.equal(rows.position_ids[r, visible], torch.arange(len(ids) - 1))
        # every gathered state sits at the position of the token it reads
        assert torch.equal(flat_pos[rows.gather_index[where]], torch.arange(len(ids) - len(where) - 1, len(ids) - 1))
        assert torch.equal(flat_ids[rows.gather_index[where]], ids[len(ids) - len(where) - 1: -1])


def test_packed_token_count(batches):
    """Each record feeds its shared text once, each distinct prefix once, each response but its
    last token once: SymMPO 2P + 5R - shared - 5 tokens instead of 5(P + R)."""
    for objective, prefixes in (("symmpo", 2), ("mdpo", 2), ("dpo", 1)):
        batch = batches[objective]
        expected = 0
        for b in range(batch.num_records):
            prompt = batch.prompt_ids[b][0]
            shared = int((prompt == batch.image_token_id).nonzero()[0]) if prefixes > 1 else 0
            expected += shared + prefixes * (len(prompt) - shared)
            expected += sum(len(batch.response_ids[b][k]) - 1 for k in batch.columns)
        rows = packing.pack(batch)
        separate = sum(len(batch.sequence(b, k)[0]) for b in range(batch.num_records) for k in batch.columns)
        assert rows.num_tokens == expected < separate
        assert int((rows.input_ids != batch.pad_token_id).sum()) == expected


def test_balance_rows():
    sizes = [50, 40, 40, 30, 30, 20, 10, 5]
    rows = packing.balance_rows(sizes, 90)
    assert sorted(i for r in rows for i in r) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in r) for r in rows]
    assert max(loads) <= 90 and len(rows) == 3 and max(loads) - min(loads) <= 10
    assert packing.balance_rows([500, 10, 10], 100) == [[0], [1, 2]]  # oversized item alone
    assert packing.balance_rows([5, 5, 5], 1000) == [[0, 1, 2]]


@pytest.mark.parametrize("block", [16, 32])
def test_block_mask_equals_flex_reference(batches, block):
    """Our band-wise BlockMask equals FlexAttention's own create_block_mask over the same mask_mod,
    and the mask_mod equals the dense mask element by element."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    rows = packing.pack(batches["symmpo"], row_tokens=400, pad_to=block)
    R, L = rows.input_ids.shape
    ours = packing.block_mask(rows, block, band_tokens=R * block * L * 2)  # several bands
    ref = create_block_mask(packing.mask_mod(rows), R, None, L, L, device="cpu", BLOCK_SIZE=block)
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(ref, name))
    assert torch.equal(ours.to_dense(), ref.to_dense())
    dense = packing.dense_mask(rows)
    assert torch.equal(create_mask(packing.mask_mod(rows), R, 1, L, L, device="cpu")[:, 0], dense)
    assert int(ours.kv_num_blocks.sum() + ours.full_kv_num_blocks.sum()) < R * (L // block) * (L // block + 1) // 2
    with pytest.raises(ValueError, match="multiple of block_size"):
        packing.block_mask(packing.pack(batches["dpo"], pad_to=8), 128)


def _weighted_grads(model, batch, packing_, weights, **kw):
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, batch, packing_, **kw)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rtol: float):
    """Per parameter ||got - want|| <= rtol ||want||.  Some gradients are zero in exact arithmetic
    (CLIP's key biases: softmax ignores a constant shift), so a norm floor of 1e-3 x the largest
    gradient norm keeps their float noise from counting as a relative error."""
    assert got.keys() == want.keys()
    floor = 1e-3 * max(float(g.norm()) for g in want.values())
    for name, g in want.items():
        err = float((got[name] - g).norm())
        assert err <= rtol * max(float(g.norm()), floor), f"{name}: |diff| {err:.3g} vs |grad| {float(g.norm()):.3g}"


def assert_logps_close(got, want, rtol):
    err = float((got - want).abs().max())
    assert err <= rtol * float(want.abs().max()), f"max |diff| {err:.3g} vs max |logp| {float(want.abs().max()):.3g}"


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("row_tokens", [None, 10_000])
def test_packed_equals_unpacked(tiny, batches, objective, row_tokens):
    model, _ = tiny
    batch = batches[objective]
    weights = torch.randn(batch.num_records, 5, generator=torch.Generator().manual_seed(0))
    packed, g_packed = _weighted_grads(model, batch, "shared_prefix", weights, row_tokens=row_tokens)
    unpacked, g_unpacked = _weighted_grads(model, batch, "none", weights)
    unused = [k for k in range(5) if k not in batch.columns]
    assert (packed[:, unused] == 0).all() and (unpacked[:, unused] == 0).all()
    assert (packed[:, list(batch.columns)] < 0).all()
    assert_logps_close(packed, unpacked, 1e-5)
    assert_grads_close(g_packed, g_unpacked, 1e-4)
    assert len(g_packed) > 20  # the language model, the projector and the vision tower all get gradients


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_padded_rows_with_the_fused_head_equal_the_official_layout(tiny, batches, objective):
    """``packing="padded"``: the official rows' hidden states at the response positions through
    ``token_logps`` give the official full-logits log-probs and gradients."""
    model, _ = tiny
    batch = batches[objective]
    weights = torch.randn(batch.num_records, 5, generator=torch.Generator().manual_seed(1))
    padded, g_padded = _weighted_grads(model, batch, "padded", weights)
    unpacked, g_unpacked = _weighted_grads(model, batch, "none", weights)
    unused = [k for k in range(5) if k not in batch.columns]
    assert (padded[:, unused] == 0).all()
    assert_logps_close(padded, unpacked, 1e-5)
    assert_grads_close(g_padded, g_unpacked, 1e-4)


def test_response_positions_of_padded_rows(batches):
    """Each gathered position is the one just before its label, inside its row, in row order."""
    batch = batches["symmpo"]
    u = packing.unpack(batch)
    gather, labels, seq = u.response_positions()
    S, L = u.input_ids.shape
    s, t = gather // L, gather % L
    assert torch.equal(u.labels[s, t + 1], labels) and (labels >= 0).all()
    assert torch.equal(u.seq_index[s], seq)
    assert (u.attention_mask[s, t + 1] == 1).all()
    want = sum(len(batch.response_ids[b][k]) for b in range(batch.num_records) for k in batch.columns)
    assert len(labels) == want and bool((gather[1:] > gather[:-1]).all())
    assert torch.equal(u.position_ids[0, :4], torch.arange(4))


def test_average_logps(tiny, batches):
    model, _ = tiny
    batch = batches["symmpo"]
    with torch.no_grad():
        mean = sequence_logps(model, batch, average=True)
        total = sequence_logps(model, batch)
        assert_logps_close(mean, sequence_logps(model, batch, "none", average=True), 1e-5)
    lengths = torch.tensor([[len(r) for r in row] for row in batch.response_ids], dtype=torch.float32)
    assert_logps_close(mean * lengths, total, 1e-5)


def test_plain_forward_on_the_kept_ids(tiny, batches):
    """Log-probs equal a plain ``model(input_ids, pixel_values)`` on each role's kept ids."""
    model, _ = tiny
    batch = batches["symmpo"]
    with torch.no_grad():
        packed = sequence_logps(model, batch, row_tokens=10_000)
        for b in range(2):
            for k in batch.columns:
                ids, labels = batch.sequence(b, k)
                pixels = batch.pixel_values[batch.image_index[b][k]][None]
                logits = model(input_ids=ids[None], pixel_values=pixels).logits[0, :-1]
                keep = labels[1:] != -100
                want = torch.log_softmax(logits, -1)[keep].gather(1, labels[1:][keep, None]).sum()
                assert abs(float(packed[b, k] - want)) <= 1e-5 * abs(float(want))


def test_wrong_mask_shows_a_mismatch(tiny, batches, monkeypatch):
    """Plain causal attention over the packed row lets responses see their siblings: the equality
    tests above would catch it."""
    model, _ = tiny
    batch = batches["symmpo"]
    with torch.no_grad():
        right = sequence_logps(model, batch, row_tokens=10_000)

        def causal(rows):
            L = rows.input_ids.shape[1]
            return torch.ones(L, L, dtype=torch.bool).tril().expand(rows.input_ids.shape[0], L, L)

        monkeypatch.setattr(packing, "dense_mask", causal)
        wrong = sequence_logps(model, batch, row_tokens=10_000)
    assert float((wrong - right).abs().max()) > 1e-2


def test_eager_attention_takes_an_additive_mask(batches):
    model, _ = build_tiny_llava(seed=1, attn_implementation="eager")
    batch = batches["mdpo"]
    with torch.no_grad():
        assert_logps_close(sequence_logps(model, batch, row_tokens=10_000), sequence_logps(model, batch, "none"), 1e-5)


def test_flex_attention_forward_on_cpu(tiny, batches):
    """The FlexAttention path end to end through transformers (CPU: forward only, compiled once)."""
    model, _ = tiny
    flex, _ = build_tiny_llava(seed=0, attn_implementation="flex_attention")
    batch = batches["symmpo"]
    with torch.no_grad():
        want = sequence_logps(model, batch, row_tokens=10_000)
        got = sequence_logps(flex, batch, row_tokens=10_000)
    assert_logps_close(got, want, 1e-5)


def test_empty_batch(tiny):
    model, processor = tiny
    batch = PreferenceCollator(processor, "dpo", max_length=8)(make_records(1))
    assert sequence_logps(model, batch).shape == (0, 5)


def test_sequence_logps_is_the_package_entry_point(tiny, batches):
    assert sf.sequence_logps is sequence_logps
    with pytest.raises(ValueError, match="unknown packing"):
        sequence_logps(tiny[0], batches["dpo"], packing="tree")
