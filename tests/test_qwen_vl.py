"""Qwen2.5-VL and Qwen3-VL (and Qwen2-VL, the same code): M-RoPE positions against the model's own,
the packed layout against the official one (log-probs, fused loss, every gradient) with images
of different sizes and several records per row, the variants that must break it, vision tower
runs, the DeepStack features of a shared image, the prompt against the processor's chat
template, LoRA and full fine-tune targets, and the loader round trip."""

import numpy as np
import pytest
import torch
from flop_count import policy_flops
from PIL import Image
from vlm_records import make_records

import symmpo_fast as sf
from symmpo_fast import packing
from symmpo_fast.data import PreferenceCollator
from symmpo_fast.models import (
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    adapter_for,
    build_tiny,
    build_tiny_qwen2_5_vl,
    forward_preference,
    load_model,
    reference_logps,
    sequence_logps,
)

FAMILIES = ("tiny-qwen2.5-vl", "tiny-qwen3-vl")
OBJECTIVES = ("symmpo", "mdpo", "dpo")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return build_tiny(request.param, seed=0)


def _noise(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def records():
    """3 records, images from 10 x 14 px (below min_pixels) to 150 x 200 px (above max_pixels), so
    from 6 to 64 placeholder tokens; record 1's contrast image is record 0's image (one vision
    pass, features used by two prefixes)."""
    recs = make_records(3, seed=21, image_side=(12, 80))
    recs[1]["contrast_image"] = recs[0]["image"]
    recs[2]["image"], recs[0]["contrast_image"] = _noise(10, 14, 1), _noise(150, 200, 2)
    return recs


def _images_seen(model, fn):
    """Images that went through the vision tower while ``fn`` ran (a forward hook counts its grids)."""
    seen = []

    def count(module, args, kwargs, out):
        seen.append(len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]))

    handle = model.model.visual.register_forward_hook(count, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return sum(seen)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(got, want, what):
    """Every gradient within 1e-4 of its own norm, floored at 1e-4 of the largest one."""
    assert set(got) == set(want), what
    floor = 1e-4 * max(float(g.norm()) for g in want.values())
    for name, g in want.items():
        assert float((got[name] - g).norm()) <= 1e-4 * max(float(g.norm()), floor), (what, name)


def test_batch_carries_each_images_grid_and_patches(tiny, records):
    """Dynamic resolution: each distinct image's grid, its placeholder count and its run of flat
    patch rows are the processor's own for that image alone."""
    model, processor = tiny
    batch = PreferenceCollator(processor, "symmpo")(records)
    assert batch.num_images == 5 and batch.spatial_merge_size == 2  # 6 images, one shared
    grids = batch.image_grid_thw
    assert len({tuple(g) for g in grids.tolist()}) >= 4  # images of different sizes
    images = batch.images()
    for b, r in enumerate(records):
        for k, name in ((0, "image"), (3, "contrast_image")):
            alone = processor.image_processor(images=[r[name]], return_tensors="pt")
            one = images.select([batch.image_index[b][k]])
            assert torch.equal(one.grid_thw, alone["image_grid_thw"]) and torch.equal(one.pixel_values,
                                                                                    alone["pixel_values"])
            placeholders = int((batch.prompt_ids[b][k] == batch.image_token_id).sum())
            assert placeholders == int(alone["image_grid_thw"].prod()) // 4
    # The resolution range bounds the placeholders: 4 (min_pixels) to 64 (max_pixels) per image.
    tokens = (grids.prod(-1) // 4).tolist()
    assert min(tokens) == 6 and 48 <= max(tokens) <= 64, tokens


@pytest.mark.parametrize("row_tokens", [None, 10_000])
def test_packed_positions_are_the_models_own(tiny, records, row_tokens):
    """From the state that predicts a response's last label, the visible tokens carry exactly the
    [3, n] positions the model's get_rope_index gives that response's whole sequence, several
    records per row or one."""
    model, processor = tiny
    batch = PreferenceCollator(processor, "symmpo")(records)
    rows = packing.pack(batch, row_tokens)
    assert rows.mrope_position_ids.shape == (3, *rows.input_ids.shape)
    if row_tokens:
        assert rows.input_ids.shape[0] == 1  # every record in one row
    mask = packing.dense_mask(rows)
    L = rows.input_ids.shape[1]
    images = batch.images()
    for s in rows.seq_index.unique().tolist():
        b, k = divmod(s, 5)
        ids, _ = batch.sequence(b, k)
        want, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=(ids == batch.image_token_id)[None].int(),
                                             image_grid_thw=images.select([batch.image_index[b][k]]).grid_thw)
        last = int(rows.gather_index[rows.seq_index == s][-1])
        r, t = divmod(last, L)
        visible = mask[r, t].nonzero().squeeze(1)
        assert torch.equal(rows.input_ids[r, visible], ids[:-1])
        assert torch.equal(rows.mrope_position_ids[:, r, visible], want[:, 0, :-1])
        if k == 0:  # the image's grid positions and the text after them differ from 1-D ones
            assert not torch.equal(want[0, 0], want[1, 0]) and int(want.max()) < len(ids) - 1


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sequence_logps_and_gradients_match_the_official_layout(tiny, records, objective):
    """Packed (several records per row, one vision pass per distinct image) against the official
    layout (one padded sequence per record and role, the model's own positions, full logits):
    log-probs within 1e-5 relative and every parameter's gradient (vision tower, mergers and
    DeepStack mergers included) within 1e-4."""
    model, processor = tiny
    batch = PreferenceCollator(processor, objective)(records)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    out = {}
    for layout, row_tokens in (("shared_prefix", 10_000), ("padded", None), ("none", None)):
        model.zero_grad(set_to_none=True)
        logps = sequence_logps(model, batch, layout, row_tokens=row_tokens)
        (logps * weights).sum().backward()
        out[layout] = logps.detach(), _grads(model)
    want, want_grads = out["none"]
    assert any("visual.blocks" in n for n in want_grads) and any("merger" in n for n in want_grads)
    for layout in ("shared_prefix", "padded"):
        got, got_grads = out[layout]
        cols = list(batch.columns)
        assert float((got[:, cols] - want[:, cols]).abs().max()) <= 1e-5 * float(want[:, cols].abs().max()), layout
        _assert_close_grads(got_grads, want_grads, layout)


def test_fused_loss_matches_the_official_layout(tiny, records):
    """forward_preference: packed hidden states through the fused SymMPO loss == the official rows
    through preference_loss: loss, metrics and every gradient."""
    model, processor = tiny
    cfg = sf.ObjectiveConfig.symmpo()
    batch = PreferenceCollator(processor, "symmpo")(records)
    ref = reference_logps(model, batch) + 0.3 * torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    out = {}
    for layout in ("shared_prefix", "none"):
        model.zero_grad(set_to_none=True)
        loss, metrics = forward_preference(model, batch, cfg, ref, packing=layout, row_tokens=10_000)
        loss.backward()
        out[layout] = loss.detach(), metrics, _grads(model)
    (lp, mp, gp), (lu, mu, gu) = out["shared_prefix"], out["none"]
    assert abs(float(lp - lu)) <= 1e-5 * abs(float(lu))
    for key, value in mu.items():
        assert torch.allclose(mp[key], value, rtol=1e-4, atol=1e-6), key
    _assert_close_grads(gp, gu, "shared_prefix")


def _broken(model, batch, monkeypatch, what):
    with monkeypatch.context() as m:
        if what == "causal mask":
            m.setattr(packing, "dense_mask", lambda rows: torch.ones(rows.input_ids.shape[1], rows.input_ids.shape[1],
                                                                     dtype=torch.bool).tril().expand(
                rows.input_ids.shape[0], -1, -1))
        elif what == "positions along the row":
            def along_row(self, rows):
                R, L = rows.input_ids.shape
                return torch.arange(L).expand(3, R, L)
            m.setattr(Qwen2_5_VLAdapter, "position_ids", along_row)
        elif what == "1-D positions":  # restart per response, but ignore the image grid
            m.setattr(Qwen2_5_VLAdapter, "position_ids", lambda self, rows: rows.position_ids.expand(3, -1, -1))
        with torch.no_grad():
            return sequence_logps(model, batch, row_tokens=10_000)


@pytest.mark.parametrize("what", ["causal mask", "positions along the row", "1-D positions"])
def test_wrong_masks_and_positions_break_it(tiny, records, monkeypatch, what):
    """The equality above can fail: a plain causal mask over the packed row, positions that run
    along the row instead of restarting at each response's prefix, or text positions without the
    image grid's M-RoPE rule, each move the log-probs far beyond the tolerance."""
    model, processor = tiny
    batch = PreferenceCollator(processor, "symmpo")(records)
    with torch.no_grad():
        want = sequence_logps(model, batch, "none")
    got = _broken(model, batch, monkeypatch, what)
    assert float((got - want).abs().max()) > 1e-3 * float(want.abs().max())


@pytest.mark.parametrize("objective, packed, official", [("symmpo", 2, 5), ("mdpo", 2, 3), ("dpo", 1, 2)])
def test_vision_tower_runs_once_per_image(tiny, objective, packed, official):
    model, processor = tiny
    records = make_records(2, seed=5, image_side=(12, 80))
    batch = PreferenceCollator(processor, objective)(records)
    with torch.no_grad():
        assert _images_seen(model, lambda: sequence_logps(model, batch)) == packed * len(records)
        assert _images_seen(model, lambda: sequence_logps(model, batch, "none")) == official * len(records)


def test_a_shared_image_is_encoded_once_and_reaches_every_layer(tiny, records, monkeypatch):
    """The 5 distinct images of 6 prefixes go through the vision tower once each; without the
    feature hook they are repeated (6 images) and every log-prob is the same.  For Qwen3-VL the
    DeepStack features reach the first decoder layers at the shared image's positions in both
    prefixes: dropping them (zeroing what the hook repeats) changes both prefixes' log-probs."""
    model, processor = tiny
    batch = PreferenceCollator(processor, "symmpo")(records)
    with torch.no_grad():
        assert _images_seen(model, lambda: sequence_logps(model, batch)) == 5
        want = sequence_logps(model, batch)
        with monkeypatch.context() as m:
            m.setattr(Qwen2_5_VLAdapter, "image_feature_hook", lambda self, index: None)
            assert _images_seen(model, lambda: sequence_logps(model, batch)) == 6
            assert torch.allclose(sequence_logps(model, batch), want, rtol=1e-6, atol=0)
        if isinstance(adapter_for(model), Qwen3VLAdapter):
            def no_deepstack(module, args, out):
                out.deepstack_features = [torch.zeros_like(f) for f in out.deepstack_features]
                return out
            handle = model.model.visual.register_forward_hook(no_deepstack)
            try:
                without = sequence_logps(model, batch)
            finally:
                handle.remove()
            # record 0's image m (columns 0-2) and record 1's m' (columns 3-4) are the shared image
            assert (without[0, :3] - want[0, :3]).abs().min() > 1e-4
            assert (without[1, 3:] - want[1, 3:]).abs().min() > 1e-4


def _whole_conversation(processor, image, question, answer, system=None):
    """The ids of the whole conversation, as processor.apply_chat_template + processor(...) give them."""
    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0], text


@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_prompt_is_the_processors_chat_template(tiny, system):
    """Each role's prompt + response is, token for token, the processor's own rendering of the
    whole conversation (its default system turn included for Qwen2.5-VL, none for Qwen3-VL),
    and the labels are the answer and the template's end of turn."""
    model, processor = tiny
    records = make_records(4, seed=9, image_side=(12, 80))
    records[0]["chosen"] = ""
    batch = PreferenceCollator(processor, "symmpo", system_prompt=system)(records)
    assert batch.num_records == 4
    tok = processor.tokenizer
    for b, r in enumerate(records):
        for k, (image, answer) in {0: ("image", "chosen"), 1: ("image", "rejected"), 3: ("contrast_image", "chosen"),
                                   4: ("contrast_image", "contrast_chosen")}.items():
            ids, labels = batch.sequence(b, k)
            want, text = _whole_conversation(processor, r[image], r["question"], r[answer], system)
            assert torch.equal(ids, want), (b, k)
            assert tok.decode(ids[labels != -100]) == r[answer] + "<|im_end|>\n"
    if system is None:  # Qwen2.5-VL-Instruct's template adds its default system turn, Qwen3-VL's none
        default = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        assert text.startswith(default) == (adapter_for(model).family == "qwen2_5_vl")
    else:
        assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n")
    assert text.endswith(f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{r['question']}<|im_end|>\n"
                         f"<|im_start|>assistant\n{r['contrast_chosen']}<|im_end|>\n")


def test_offline_tokenizer_has_the_families_special_tokens(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer" and tok.bos_token is None
    assert (tok.eos_token, tok.pad_token, processor.image_token) == ("<|im_end|>", "<|endoftext|>", "<|image_pad|>")
    assert tok("a<|vision_start|><|image_pad|><|vision_end|>b")["input_ids"][1:4] == [
        model.config.vision_start_token_id, model.config.image_token_id, model.config.vision_end_token_id]
    assert not hasattr(processor, "video_processor")
    assert type(processor.image_processor).__name__ in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor")
    assert model.config.text_config.vocab_size % 128 == 0 and model.config.text_config.vocab_size > len(tok)


def test_lora_targets_the_language_model_only(tiny, records):
    """adapter.lora_target_regex picks q/k/v/o/gate/up/down of the language model, none of the vision
    tower's (whose MLPs have the same names in Qwen2.5-VL); the LoRA gradients packed equal the
    official layout's and the reference (adapters off) is the base model."""
    peft = pytest.importorskip("peft")
    name = "tiny-qwen3-vl" if isinstance(adapter_for(tiny[0]), Qwen3VLAdapter) else "tiny-qwen2.5-vl"
    model, processor = build_tiny(name, seed=3)
    adapter = adapter_for(model)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    batch = PreferenceCollator(processor, "symmpo")(records)
    with torch.no_grad():
        base = sequence_logps(model, batch)
    policy = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                        target_modules=adapter.lora_target_regex(modules)))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    layers = model.config.text_config.num_hidden_layers
    assert len(trainable) == 2 * 7 * layers and all("language_model" in n for n in trainable)
    assert all(f".{m}." in " ".join(trainable) for m in modules)
    assert torch.allclose(reference_logps(policy, batch), base, rtol=1e-5, atol=0)
    grads = {}
    for layout in ("shared_prefix", "none"):
        policy.zero_grad(set_to_none=True)
        loss, _ = forward_preference(policy, batch, sf.ObjectiveConfig.symmpo(), base, packing=layout)
        loss.backward()
        grads[layout] = {n: p.grad.clone() for n, p in trainable.items()}
    _assert_close_grads(grads["shared_prefix"], grads["none"], "lora")


def test_full_finetune_trains_language_model_mergers_and_head(tiny):
    """finetune=full: the language model, the patch merger (and Qwen3-VL's DeepStack mergers) and
    lm_head; the vision tower's blocks stay frozen."""
    model, _ = tiny
    adapter = adapter_for(model)
    trained = {id(p) for module in adapter.full_finetune_modules() for p in module.parameters()}
    want = {n for n, _ in model.named_parameters() if n.startswith(("model.language_model.", "lm_head."))
            or ".merger." in n or ".deepstack_merger_list." in n}
    assert {n for n, p in model.named_parameters() if id(p) in trained} == want
    assert any("deepstack" in n for n in want) == (adapter.family == "qwen3_vl")
    assert adapter.vision_tower is model.model.visual


def test_save_and_load_round_trip(tiny, records, tmp_path):
    """save_pretrained + load_model: the family comes from the config, the processor is rebuilt
    without a video processor (same tokens, pixels, chat template), the log-probs are the same."""
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    assert type(adapter_for(loaded)) is type(adapter_for(model))
    assert loaded.model.language_model.config._attn_implementation == "sdpa"
    assert loaded_processor.chat_template == processor.chat_template
    batch = PreferenceCollator(loaded_processor, "symmpo")(records)
    assert batch.record_keys == PreferenceCollator(processor, "symmpo")(records).record_keys
    with torch.no_grad():
        assert torch.equal(sequence_logps(loaded, batch), sequence_logps(model, batch))


def test_qwen2_vl_runs_on_the_same_code(records):
    """Qwen2-VL (no window attention, another vision tower) through the Qwen2.5-VL adapter."""
    model, processor = build_tiny("tiny-qwen2-vl", seed=0)
    assert type(adapter_for(model)) is Qwen2_5_VLAdapter
    batch = PreferenceCollator(processor, "symmpo")(records)
    with torch.no_grad():
        got, want = sequence_logps(model, batch, row_tokens=10_000), sequence_logps(model, batch, "none")
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_official_mdpo_crop_is_refused_for_flat_patches(tiny, records):
    _, processor = tiny
    with pytest.raises(ValueError, match="mdpo_crop='seeded'"):
        PreferenceCollator(processor, "mdpo", mdpo_crop="official")(records)


@pytest.mark.slow
def test_symmpo_step_flops(capsys):
    """Qwen2.5-VL-7B's geometry scaled down by 8 in width and 7-8 in depth (vision 160 wide x 4
    blocks, window 8 x 8 patches, full attention in the last block; language model 448 wide x 4
    layers, GQA 7:1, MLP 5.3x, vocabulary 152064 / 8 = 19008 rows), a 128 px image of 32 x 32
    patches = 256 placeholder tokens, a ~30-token question, 60-token responses: one SymMPO policy
    forward+backward packed costs at most 0.55x the official layout's FLOPs.  Eager attention
    everywhere, counted densely over the whole packed row (no block skipping): an upper bound."""
    model, processor = build_tiny_qwen2_5_vl(
        seed=0, patch_size=4, max_pixels=128 * 128, vision_hidden_size=160,
        vision_intermediate_size=428, vision_depth=4, vision_heads=2, window_size=32, hidden_size=448,
        intermediate_size=2368, num_hidden_layers=4, num_attention_heads=7, num_key_value_heads=1,
        mrope_section=(8, 12, 12), vocab_multiple=19008, initializer_range=0.02, attn_implementation="eager")
    model.model.visual.config._attn_implementation_internal = "eager"
    assert model.config.text_config.vocab_size == 19008
    records = make_records(1, seed=22, answer_words=(57, 57), question_words=(28, 28), image_side=(128, 129))
    batch = PreferenceCollator(processor, "symmpo")(records)
    image = int((batch.prompt_ids[0][0] == batch.image_token_id).sum())
    question = len(processor.tokenizer(records[0]["question"])["input_ids"])
    prefix, response = len(batch.prompt_ids[0][0]), len(batch.response_ids[0][0])
    assert image == 256 and 28 <= question <= 32 and 58 <= response <= 62, (question, response)
    flops = policy_flops(model, batch, sf.ObjectiveConfig.symmpo())
    ratio = flops["shared_prefix"] / flops["none"]
    with capsys.disabled():
        print(f"\nQwen2.5-VL-shaped SymMPO policy fwd+bwd, prefix {prefix} tokens ({image} image, {question} "
              f"question), responses "
              f"{response}: packed {flops['shared_prefix'] / 1e9:.1f} GFLOP, official {flops['none'] / 1e9:.1f} GFLOP, "
              f"ratio {ratio:.3f}")
    assert ratio <= 0.55


def test_settings_qwen_cannot_take_are_refused_at_construction():
    """mDPO's official crop (of [C, H, W] pixels) cannot apply to flattened patches: refused when
    the collator is built, not at the first batch; a LLaVA-format as-written prompt is named."""
    from symmpo_fast.models import build_tiny

    _, processor = build_tiny("tiny-qwen2.5-vl")
    with pytest.raises(ValueError, match="mdpo_crop='official'.*dynamic resolution"):
        PreferenceCollator(processor, "mdpo", mdpo_crop="official")
    rec = dict(make_records(1, seed=3)[0])
    rec.pop("question")
    rec["prompt"] = "A chat. USER: <image>\nWhat is it? ASSISTANT:"
    with pytest.raises(ValueError, match="written with LLaVA's '<image>'"):
        PreferenceCollator(processor, "dpo")([rec])
