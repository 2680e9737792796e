"""Text-only causal LMs (DPO): the tokenization is TRL's, the shared prefix is exact against the
unpacked layout (the model's own forward and head), Gemma's soft-capped head goes through the
fused head, and the trainer runs end to end (LoRA, full, resume) and refuses mDPO / SymMPO."""

import copy
import json

import pytest
import torch
from flop_count import policy_flops

from symmpo_fast import formats, packing
from symmpo_fast.data import PreferenceCollator
from symmpo_fast.layouts import sequence_logps
from symmpo_fast.models import CausalLMAdapter, adapter_for, build_tiny, build_tiny_text, load_model
from symmpo_fast.synthetic import build_text_split

FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-gemma2")
RECORDS = [
    dict(question="What colour is the sky on a clear day?", chosen="Blue.", rejected="Green, mostly green."),
    dict(prompt="The capital of France is", chosen=" Paris", rejected=" Lyon, I think"),
    dict(prompt=[{"role": "user", "content": "Count to three."}],
         chosen=[{"role": "assistant", "content": "1 2 3"}], rejected=[{"role": "assistant", "content": "1 2"}]),
    dict(question="Is a square round?", chosen="No, a square has four corners.", rejected="Yes."),
    dict(prompt=[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."},
                 {"role": "user", "content": "Again?"}],
         chosen=[{"role": "assistant", "content": "Hi again."}], rejected=[{"role": "assistant", "content": "No."}]),
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, tokenizer = build_tiny(request.param)
    return request.param, model, tokenizer


def test_tokenization_is_trls(family):
    """Prompt and completion ids equal what trl.DPOTrainer 1.16 makes of the same rows (its own
    dataset preparation, run here), for plain, question-as-conversation and conversational rows."""
    pytest.importorskip("trl")
    import datasets
    from trl import DPOConfig, DPOTrainer

    name, model, tok = family
    rows = []
    for r in RECORDS:  # (Gemma's template: no system turn, alternating roles: all fit)
        prompt = r.get("prompt", [{"role": "user", "content": r.get("question")}])
        if "question" in r:
            row = dict(prompt=prompt, chosen=[{"role": "assistant", "content": r["chosen"]}],
                       rejected=[{"role": "assistant", "content": r["rejected"]}])
        else:
            row = dict(prompt=prompt, chosen=r["chosen"], rejected=r["rejected"])
        rows.append(row)
    batch = PreferenceCollator(tok, "dpo")(RECORDS)
    for i, row in enumerate(rows):
        # TRL prepares a data set of one format at a time (plain or conversational)
        args = DPOConfig(output_dir="/tmp/unused", report_to=[], max_length=None, use_cpu=True,
                         per_device_train_batch_size=1, dataset_num_proc=None)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list([row]))
        prepared = trainer.train_dataset[0]
        assert batch.prompt_ids[i][0].tolist() == prepared["prompt_ids"], (name, i)
        assert batch.response_ids[i][0].tolist() == prepared["chosen_ids"], (name, i)
        assert batch.response_ids[i][1].tolist() == prepared["rejected_ids"], (name, i)


def _weighted(model, batch, layout, weights, **kw):
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, batch, layout, **kw)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(got, want, rtol=1e-4):
    """Per parameter ||got - want|| <= rtol ||want||, floored at 1e-4 of the largest gradient norm."""
    assert got.keys() == want.keys() and len(want) > 5
    floor = 1e-4 * max(float(g.norm()) for g in want.values())
    for n, g in want.items():
        err = float((got[n] - g).norm())
        assert err <= rtol * max(float(g.norm()), floor), f"{n}: {err:.3g} vs {float(g.norm()):.3g}"


@pytest.mark.parametrize("row_tokens", [None, 10_000])
def test_shared_prefix_equals_unpacked(family, row_tokens):
    name, model, tok = family
    batch = PreferenceCollator(tok, "dpo")(RECORDS)
    assert batch.columns == (0, 1) and batch.pixel_values.numel() == 0
    weights = torch.randn(batch.num_records, 5, generator=torch.Generator().manual_seed(0))
    packed, g_packed = _weighted(model, batch, "shared_prefix", weights, row_tokens=row_tokens)
    unpacked, g_unpacked = _weighted(model, batch, "none", weights)
    padded, g_padded = _weighted(model, batch, "padded", weights)
    assert float((packed - unpacked).abs().max()) <= 1e-5 * float(unpacked.abs().max())
    assert float((padded - unpacked).abs().max()) <= 1e-5 * float(unpacked.abs().max())
    _close(g_packed, g_unpacked)
    _close(g_padded, g_unpacked)
    if row_tokens:
        assert packing.pack(batch, row_tokens).input_ids.shape[0] == 1  # several records in one row


def test_wrong_mask_or_positions_break_it(family, monkeypatch):
    name, model, tok = family
    batch = PreferenceCollator(tok, "dpo")(RECORDS)
    with torch.no_grad():
        right = sequence_logps(model, batch, row_tokens=10_000)
        real_pack = packing.pack

        def no_restart(*a, **kw):  # positions that run on through the row instead of restarting
            rows = real_pack(*a, **kw)
            rows.position_ids = torch.arange(rows.position_ids.shape[1]).expand_as(rows.position_ids).clone()
            return rows

        monkeypatch.setattr(packing, "pack", no_restart)
        shifted = sequence_logps(model, batch, row_tokens=10_000)
        monkeypatch.setattr(packing, "pack", real_pack)
        monkeypatch.setattr(packing, "dense_mask", lambda rows: torch.ones(
            rows.input_ids.shape[1], rows.input_ids.shape[1], dtype=torch.bool).tril().expand(
            rows.input_ids.shape[0], -1, -1))
        causal = sequence_logps(model, batch, row_tokens=10_000)
    assert float((shifted - right).abs().max()) > 1e-3
    assert float((causal - right).abs().max()) > 1e-3


def test_gemma_softcap_goes_through_the_fused_head():
    """With logits large enough for Gemma 2's final soft-capping (30) to bite, the fused head
    (softcap from the config) equals the model's own capped head; without the cap it does not."""
    model, tok = build_tiny("tiny-gemma2")
    with torch.no_grad():
        model.lm_head.weight.mul_(400.0)  # tied: the embeddings grow too, logits reach the cap
    batch = PreferenceCollator(tok, "dpo")(RECORDS[:3])
    adapter = adapter_for(model)
    assert adapter.logit_softcap == 30.0
    with torch.no_grad():
        logits = model(input_ids=batch.sequence(0, 0)[0][None]).logits
        assert float(logits.abs().max()) > 20.0
        fused = sequence_logps(model, batch)
        official = sequence_logps(model, batch, "none")
        assert float((fused - official).abs().max()) <= 1e-5 * float(official.abs().max())
        type(adapter).logit_softcap = property(lambda self: None)
        try:
            uncapped = sequence_logps(model, batch)
        finally:
            del type(adapter).logit_softcap
        assert float((uncapped - official).abs().max()) > 1e-2


def test_objectives_that_need_images_are_refused():
    _, tok = build_tiny("tiny-llama")
    for objective in ("mdpo", "symmpo"):
        with pytest.raises(ValueError, match="needs images"):
            PreferenceCollator(tok, objective)
    with pytest.raises(ValueError, match="vision-language"):
        PreferenceCollator(tok, "dpo", prompt_format="llava_v1")


def test_text_data_formats(tmp_path):
    rows = [{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
            {"question": "Colour of grass?", "chosen": "Green.", "rejected": "Red."},
            {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "assistant", "content": "Go away"}]},
            # implicit prompt (TRL's extract_prompt): the messages both answers start with
            {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}]}]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = formats.load_dataset(str(path), objective="dpo", text_only=True)
    assert ds[0] == {"id": ds[0]["id"], "prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5", "digest": ds[0]["digest"]}
    assert ds[1]["question"] == "Colour of grass?"
    assert ds[3]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert ds[3]["chosen"] == [{"role": "assistant", "content": "Hello"}]
    _, tok = build_tiny("tiny-qwen2")
    batch = PreferenceCollator(tok, "dpo")([ds[i] for i in range(4)])
    assert batch.num_records == 4 and torch.equal(batch.prompt_ids[2][0], batch.prompt_ids[3][0])
    # bad text records are named; an image record is not silently trained without its image
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"}) + "\n"
                   + json.dumps({"prompt": "x", "chosen": "", "rejected": "z"}) + "\n"
                   + json.dumps({"image": "a.png", "question": "q", "chosen": "y", "rejected": "z"}) + "\n")
    with pytest.raises(formats.BadRecordError, match="line 1: field 'chosen' has a message of role 'user'"):
        formats.load_dataset(str(bad), objective="dpo", text_only=True)
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(formats.BadRecordError, match="line 1: field 'chosen' is empty"):
        formats.load_dataset(str(bad), objective="dpo", text_only=True)
    bad.write_text(lines[2] + "\n")
    with pytest.raises(formats.BadRecordError, match="has an image, which a text-only model cannot see"):
        formats.load_dataset(str(bad), objective="dpo", text_only=True)
    with pytest.raises(ValueError, match="needs images"):
        formats.load_dataset(str(path), objective="symmpo", text_only=True)


def test_sliding_window_is_checked():
    model, tok = build_tiny("tiny-gemma2")
    model.config.sliding_window = 8
    batch = PreferenceCollator(tok, "dpo")(RECORDS[:2])
    with pytest.raises(ValueError, match="sliding window"):
        sequence_logps(model, batch)


def test_save_and_load_round_trip(tmp_path):
    model, tok = build_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    assert isinstance(adapter_for(loaded), CausalLMAdapter)
    batch = PreferenceCollator(tok, "dpo")(RECORDS)
    assert PreferenceCollator(loaded_tok, "dpo")(RECORDS).record_keys == batch.record_keys
    with torch.no_grad():
        assert torch.allclose(sequence_logps(loaded, batch), sequence_logps(model, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,finetune", [("tiny-llama", "lora"), ("tiny-qwen2", "full"), ("tiny-gemma2", "lora")])
def test_trainer_end_to_end_with_resume(tmp_path, name, finetune):
    from train_helpers import config, losses, run

    from symmpo_fast.train import TrainConfig, train

    kw = dict(model=name, objective="dpo", finetune=finetune, max_steps=4, save_steps=2, synthetic_records=32,
              eval_data="synthetic", synthetic_eval_records=16)
    run(tmp_path / "straight", **kw)
    run(tmp_path / "resumed", interrupt=2, **kw)
    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "resumed"), rel=1e-6)
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "straight"))))
    assert (tmp_path / "straight" / "final" / "train_config.yaml").exists()
    with pytest.raises(ValueError, match="text-only model: train it with --objective dpo"):
        train(config(tmp_path / "no", **{**kw, "objective": "mdpo"}))
    assert TrainConfig.from_yaml(tmp_path / "straight" / "config.yaml").model == name


def test_synthetic_text_task():
    ds = build_text_split("train", 8)
    assert len(ds) == 8 and all(r["chosen"] != r["rejected"] for r in ds.records)
    assert build_text_split("train", 8).fingerprint() == ds.fingerprint() != build_text_split("heldout", 8).fingerprint()


def test_text_dpo_step_flops(capsys):
    """A Llama-shaped but scaled-down text model, prompt 512 tokens, responses 128: one DPO policy
    forward+backward packed (one prompt, two responses) against the official layout (two full
    sequences, full logits).  Attention is counted densely over the packed row."""
    import symmpo_fast as sf

    model, tok = build_tiny_text("tiny-llama", hidden_size=256, num_hidden_layers=2)
    words = "red green blue circle square the a of".split()
    gen = torch.Generator().manual_seed(0)

    def text(n):  # exactly n tokens of the tiny vocabulary
        ids = [tok.convert_tokens_to_ids("Ġ" + words[int(i)]) for i in torch.randint(len(words), (n,), generator=gen)]
        return tok.decode(ids)

    records = [dict(prompt=text(511), chosen=text(127), rejected=text(127)) for _ in range(2)]
    batch = PreferenceCollator(tok, "dpo", max_length=10**6)(records)
    prompt, response = len(batch.prompt_ids[0][0]), len(batch.response_ids[0][0])
    assert prompt == 512 and response == 128
    flops = policy_flops(model, batch, sf.ObjectiveConfig.dpo())
    ratio = flops["shared_prefix"] / flops["none"]
    with capsys.disabled():
        print(f"\ntext DPO policy fwd+bwd, prompt {prompt}, responses {response}: packed "
              f"{flops['shared_prefix'] / 1e9:.2f} GFLOP, official {flops['none'] / 1e9:.2f} GFLOP, ratio {ratio:.3f}")
    assert ratio <= 0.65


def test_a_logit_multiplier_reaches_the_fused_head():
    """Granite divides its logits by logits_scaling: the fused head reads it from the config (as TRL
    does), so packed log-probs equal the model's own head; ignoring it would not."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from symmpo_fast.models.tiny_text import build_tiny_tokenizer

    tok = build_tiny_tokenizer("tiny-llama")
    config = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=0.25,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GraniteForCausalLM(config).eval()
    assert adapter_for(model).logit_temperature == 0.25
    batch = PreferenceCollator(tok, "dpo")(RECORDS)
    with torch.no_grad():
        fused, official = sequence_logps(model, batch), sequence_logps(model, batch, "none")
        assert float((fused - official).abs().max()) <= 1e-5 * float(official.abs().max())
        model.config.logits_scaling = 1.0  # what a head reading no multiplier would compute
        assert float((sequence_logps(model, batch) - official).abs().max()) > 1e-2


def test_review_cases_for_text_data(tmp_path, capsys):
    """A setting the collator refuses is the run's error, raised once, not every record's; a plain
    prompt with conversational answers is a named bad record; prepare-data writes text data."""
    from symmpo_fast import cli
    from symmpo_fast.train.prepare import record_check

    _, tok = build_tiny("tiny-qwen2")
    with pytest.raises(ValueError, match="prompt_format='llava_v1' is for vision-language models"):
        record_check(tok, 0, crop=False, objective="dpo", collate=dict(max_length=256, prompt_format="llava_v1"))
    path = tmp_path / "text.jsonl"
    mixed = {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "No"}
    path.write_text(json.dumps({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}) + "\n" + json.dumps(mixed) + "\n")
    with pytest.raises(formats.BadRecordError, match="line 2: a plain-text 'prompt' takes plain-text answers"):
        formats.load_dataset(str(path), objective="dpo", text_only=True)
    path.write_text(json.dumps({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}) + "\n")
    assert cli.main(["prepare-data", str(path), "--objective", "dpo", "--model", "tiny-qwen2", "--output",
                     str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == 1 and (tmp_path / "out" / "data.jsonl").exists()
