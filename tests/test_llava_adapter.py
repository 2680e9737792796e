"""The LLaVA adapter: vision tower runs, the fused loss, LoRA and the reference pass, loading a
saved checkpoint, and the FLOPs of the packed SymMPO step against the official layout."""

import pytest
import torch
from flop_count import policy_flops
from vlm_records import make_records

import symmpo_fast as sf
from symmpo_fast.data import PreferenceCollator
from symmpo_fast.models import (
    LlavaAdapter,
    adapter_for,
    build_tiny_llava,
    forward_preference,
    load_llava,
    reference_logps,
    sequence_logps,
)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0)


@pytest.fixture(scope="module")
def records():
    return make_records(3, seed=21)


def _images_seen(model, fn):
    """Images that went through the vision tower while ``fn`` ran (a forward hook counts them)."""
    seen = []
    handle = model.model.vision_tower.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return sum(seen)


@pytest.mark.parametrize("objective, packed, unpacked", [("symmpo", 2, 5), ("mdpo", 2, 3), ("dpo", 1, 2)])
def test_vision_tower_runs_once_per_image(tiny, records, objective, packed, unpacked):
    model, processor = tiny
    batch = PreferenceCollator(processor, objective)(records)
    with torch.no_grad():
        assert _images_seen(model, lambda: sequence_logps(model, batch)) == packed * len(records)
        assert _images_seen(model, lambda: sequence_logps(model, batch, "none")) == unpacked * len(records)


def test_a_family_without_the_feature_hook_repeats_the_images(tiny, records, monkeypatch):
    """The fallback of Adapter.hidden_states: one image per prefix through the vision tower, same
    log-probs."""
    model, processor = tiny
    shared = [dict(r) for r in records]
    shared[1]["contrast_image"] = shared[0]["image"]
    batch = PreferenceCollator(processor, "symmpo")(shared)
    with torch.no_grad():
        want = sequence_logps(model, batch)
        monkeypatch.setattr(LlavaAdapter, "image_feature_hook", lambda self, index: None)
        assert _images_seen(model, lambda: sequence_logps(model, batch)) == 6  # 2 prefixes x 3 records
        assert torch.allclose(sequence_logps(model, batch), want, rtol=1e-6, atol=0)


def test_an_image_records_share_is_encoded_once(tiny, records):
    """Record 1's contrast image is record 0's image and record 2 reuses record 0's contrast image:
    4 distinct images for 3 SymMPO records go through the vision tower once each, and the
    log-probs and every gradient (the shared image's features get the sum over their uses) equal
    the official layout's."""
    model, processor = tiny
    shared = [dict(r) for r in records]
    shared[1]["contrast_image"] = shared[0]["image"]
    shared[2]["contrast_image"] = shared[0]["contrast_image"]
    batch = PreferenceCollator(processor, "symmpo")(shared)
    assert batch.pixel_values.shape[0] == 4
    with torch.no_grad():
        assert _images_seen(model, lambda: sequence_logps(model, batch)) == 4
        assert _images_seen(model, lambda: sequence_logps(model, batch, "none")) == 15
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    out = {}
    for packing in ("shared_prefix", "none"):
        model.zero_grad(set_to_none=True)
        logps = sequence_logps(model, batch, packing)
        (logps * weights).sum().backward()
        out[packing] = logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (lp, gp), (lu, gu) = out["shared_prefix"], out["none"]
    assert float((lp - lu).abs().max()) <= 1e-5 * float(lu.abs().max())
    floor = 1e-3 * max(float(g.norm()) for g in gu.values())
    assert any("vision_tower" in n for n in gu)
    for name, g in gu.items():
        assert float((gp[name] - g).norm()) <= 1e-4 * max(float(g.norm()), floor), name


CONFIGS = {"symmpo": sf.ObjectiveConfig.symmpo(), "symmpo-mean": sf.ObjectiveConfig.symmpo(average_logps=True),
           "mdpo": sf.ObjectiveConfig.mdpo(), "dpo": sf.ObjectiveConfig.dpo()}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_forward_preference_matches_the_official_layout(tiny, records, cfg):
    """Packed hidden states through the fused loss == official rows through preference_loss: loss,
    metrics and every gradient."""
    model, processor = tiny
    objective = "symmpo" if cfg.pair_weight else "mdpo" if cfg.copo_weight else "dpo"
    batch = PreferenceCollator(processor, objective)(records)
    ref = reference_logps(model, batch, average=cfg.average_logps)
    ref = ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))  # a policy that moved
    out = {}
    for packing in ("shared_prefix", "padded", "none"):
        model.zero_grad(set_to_none=True)
        loss, metrics = forward_preference(model, batch, cfg, ref, packing=packing)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[packing] = loss.detach(), metrics, grads
    lu, mu, gu = out["none"]
    floor = 1e-3 * max(float(g.norm()) for g in gu.values())
    for packing in ("shared_prefix", "padded"):
        lp, mp, gp = out[packing]
        assert abs(float(lp - lu)) <= 1e-5 * abs(float(lu)), packing
        for key, value in mu.items():
            assert torch.allclose(mp[key], value, rtol=1e-4, atol=1e-6), (packing, key)
        for name, g in gu.items():
            assert float((gp[name] - g).norm()) <= 1e-4 * max(float(g.norm()), floor), (packing, name)
    assert float(out["shared_prefix"][1]["packing/fill"]) > 0.5 and float(out["shared_prefix"][1]["packing/rows"]) >= 1
    rows = len(batch.columns) * batch.num_records
    assert float(out["padded"][1]["packing/rows"]) == rows and 0 < float(out["padded"][1]["packing/fill"]) <= 1


def test_forward_preference_rejects_an_empty_batch(tiny, records):
    """Every record dropped for length: a clear error from every layout, not an internal one."""
    model, processor = tiny
    batch = PreferenceCollator(processor, "symmpo", max_length=10)(records)
    assert batch.num_records == 0 and batch.num_dropped == len(records)
    for packing in ("shared_prefix", "padded", "none"):
        with pytest.raises(ValueError, match=r"holds no record \(3 dropped"):
            forward_preference(model, batch, sf.ObjectiveConfig.symmpo(), torch.zeros(0, 5), packing=packing)
    assert sequence_logps(model, batch, "padded").shape == (0, 5)


def test_forward_preference_rejects_a_batch_without_its_columns(tiny, records):
    model, processor = tiny
    batch = PreferenceCollator(processor, "dpo")(records)
    with pytest.raises(ValueError, match=r"reads columns \[2, 3, 4\]"):
        forward_preference(model, batch, sf.ObjectiveConfig.symmpo(), torch.zeros(3, 5))


def test_lora_policy_and_reference(records):
    """A peft LoRA policy: packed gradients of the adapters equal the official layout's, and the
    reference pass with adapters disabled is the base model."""
    peft = pytest.importorskip("peft")
    model, processor = build_tiny_llava(seed=3)
    batch = PreferenceCollator(processor, "symmpo")(records)
    with torch.no_grad():
        base = sequence_logps(model, batch)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    policy = peft.get_peft_model(model, config)
    with torch.no_grad():  # LoRA starts as a no-op; move it so the reference must disable it
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    ref = reference_logps(policy, batch)
    assert not ref.requires_grad
    assert float((ref - base).abs().max()) <= 1e-5 * float(base.abs().max())
    ref_unpacked = reference_logps(policy, batch, packing="none")
    assert float((ref_unpacked - base).abs().max()) <= 1e-5 * float(base.abs().max())
    with torch.no_grad():
        kept = reference_logps(policy, batch, disable_adapter=False)
    assert float((kept - base).abs().max()) > 1e-3  # the adapters do change the policy

    grads = {}
    for packing in ("shared_prefix", "none"):
        policy.zero_grad(set_to_none=True)
        loss, _ = forward_preference(policy, batch, sf.ObjectiveConfig.symmpo(), ref, packing=packing)
        loss.backward()
        grads[packing] = {n: p.grad.clone() for n, p in trainable.items()}
    for name, g in grads["none"].items():
        assert float((grads["shared_prefix"][name] - g).norm()) <= 1e-4 * float(g.norm()), name


def test_lora_on_the_lm_head_is_refused(records):
    peft = pytest.importorskip("peft")
    model, processor = build_tiny_llava(seed=4)
    policy = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    batch = PreferenceCollator(processor, "dpo")(records)
    with pytest.raises(NotImplementedError, match="lm_head"):
        sequence_logps(policy, batch)


def test_attention_without_tree_masks_is_refused(records):
    model, processor = build_tiny_llava(seed=5)
    model.model.language_model.config._attn_implementation_internal = "flash_attention_2"
    batch = PreferenceCollator(processor, "dpo")(records)
    with pytest.raises(ValueError, match="flash_attention_2.*packing='padded'"):
        sequence_logps(model, batch)


def test_padded_layout_takes_any_attention(tiny, records):
    """``packing="padded"`` hands the model a plain padding mask: eager attention gives the same
    log-probs as SDPA, and sequences of different lengths share the rows."""
    model, processor = tiny
    batch = PreferenceCollator(processor, "symmpo")(records)
    lengths = {len(batch.sequence(b, k)[0]) for b in range(batch.num_records) for k in batch.columns}
    assert len(lengths) > 1  # right padding is exercised
    eager, _ = build_tiny_llava(attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = sequence_logps(model, batch, "none")
        got = sequence_logps(eager, batch, "padded")
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_load_llava_round_trip(tiny, records, tmp_path):
    """``load_llava`` on a ``save_pretrained`` directory (the llava-hf layout) gives the same model."""
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_llava(str(tmp_path), dtype=torch.float32, device="cpu")
    assert type(adapter_for(loaded)).__name__ == "LlavaAdapter"
    assert loaded.model.language_model.config._attn_implementation == "sdpa"
    assert loaded.model.vision_tower.config._attn_implementation == "sdpa"
    batch = PreferenceCollator(loaded_processor, "symmpo")(records)
    assert batch.record_keys == PreferenceCollator(processor, "symmpo")(records).record_keys
    with torch.no_grad():
        assert torch.equal(sequence_logps(loaded, batch), sequence_logps(model, batch))


def test_tiny_builder_is_seeded_and_checks_overrides():
    state = torch.random.get_rng_state()
    a, _ = build_tiny_llava(seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    b, _ = build_tiny_llava(seed=7)
    c, _ = build_tiny_llava(seed=8)
    wa, wb, wc = (m.model.language_model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(TypeError, match="unknown overrides"):
        build_tiny_llava(hidden=3)


def test_symmpo_step_flops(capsys):
    """With LLaVA-1.5's geometry scaled down (144 image tokens from a 96 px image in 8 px patches, a
    short question, responses ~1/6 of the prefix), one SymMPO policy forward+backward packed costs
    at most 0.55x the official layout's FLOPs.  Eager attention is counted densely over the whole
    packed row (no block skipping), so the packed count is an upper bound."""
    model, processor = build_tiny_llava(
        seed=0, image_size=96, patch_size=8, vision_hidden_size=128, vision_intermediate_size=512, vision_heads=4,
        hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
        attn_implementation="eager")
    records = make_records(2, seed=22, answer_words=(32, 32), question_words=(8, 8), image_side=(96, 97))
    batch = PreferenceCollator(processor, "symmpo")(records)
    prefix, response = len(batch.prompt_ids[0][0]), len(batch.response_ids[0][0])
    assert prefix >= 150 and 5 * response <= prefix <= 7 * response
    flops = policy_flops(model, batch, sf.ObjectiveConfig.symmpo())
    ratio = flops["shared_prefix"] / flops["none"]
    with capsys.disabled():
        print(f"\nSymMPO policy fwd+bwd, prefix {prefix} tokens, responses {response}: packed "
              f"{flops['shared_prefix'] / 1e9:.2f} GFLOP, official {flops['none'] / 1e9:.2f} GFLOP, ratio {ratio:.3f}")
    assert ratio <= 0.55
