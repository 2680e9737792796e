"""SymMPOTrainer and MDPOTrainer (TRL DPOTrainer subclasses) on the tiny LLaVA.

* Against symmpo-fast's own trainer (``symmpo_fast.train.train``) on the same records in the same
  order, seeds and settings (AdamW, gradient accumulation, 3 steps): every logged loss, metric and
  gradient norm within 1e-4, and the same final weights; for LoRA (reference: the adapter off; once
  with gradient checkpointing), full fine-tuning (reference: a frozen copy) and precomputed
  reference log-probs.  A run given other records per step misses by far.
* One batch against a direct ``sf.layouts.forward_preference``: loss and every gradient, for each
  kind of reference; a deliberately wrong objective is caught by the same comparison.
* TRL's conversational rows become exactly the collator's records (llava_v1 input), each image
  goes through the vision tower once per forward, and what the trainers refuse raises, named.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trl import DPOTrainer  # noqa: E402

import symmpo_fast as sf  # noqa: E402
from symmpo_fast.data import PreferenceCollator  # noqa: E402
from symmpo_fast.integrations.trl import MDPOTrainer, SymMPOTrainer, UnsupportedOptionError  # noqa: E402
from symmpo_fast.layouts import forward_preference, reference_logps  # noqa: E402
from symmpo_fast.prompts import LLAVA_V1_SYSTEM  # noqa: E402
from symmpo_fast.models import adapter_for, build_tiny, build_tiny_llava, unwrap  # noqa: E402
from symmpo_fast.train import TrainConfig, train  # noqa: E402
from symmpo_fast.train.loop import StepSchedule  # noqa: E402
from trl_helpers import (assistant_turn, grad_errors, mpo_config, mpo_lora, mpo_rows, mpo_trainer,  # noqa: E402
                         perturbed, synthetic_records, user_turn)

STEPS, GLOBAL, MICRO = 3, 4, 2
# Metrics: 1e-4 relative; rewards and margins near 0 (beta times differences of fp32 sums of
# ~50 nats, whose resolution is 3.8e-6) within 2e-6 absolute, as for FusedDPOTrainer.
REL, ABS = 1e-4, 2e-6


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0)


# ----------------------------------------------------------------------------------------------
# the same run as symmpo-fast's own trainer

CASES = {  # id: (objective, finetune, our trainer's reference (cache: TRL's precompute), gradient checkpointing)
    "symmpo-lora-adapter": ("symmpo", "lora", "adapter", False),
    "symmpo-full-copy": ("symmpo", "full", "copy", False),
    "symmpo-full-precomputed": ("symmpo", "full", "cache", False),
    "mdpo-lora-adapter-checkpointing": ("mdpo", "lora", "adapter", True),
    "mdpo-full-copy": ("mdpo", "full", "copy", False),
}


def _ours(tmp_path: Path, objective: str, finetune: str, reference: str, checkpointing: bool):
    cfg = TrainConfig(output_dir=str(tmp_path / "ours"), model="tiny", data="synthetic", objective=objective,
                      finetune=finetune, reference=reference, gradient_checkpointing=checkpointing,
                      synthetic_records=STEPS * GLOBAL, max_steps=STEPS,
                      global_batch_size=GLOBAL, micro_batch_size=MICRO, learning_rate=2e-3, lr_scheduler="constant",
                      warmup_ratio=0.0, lora_r=8, lora_alpha=16, lora_dropout=0.0, max_grad_norm=1.0, seed=0,
                      progress=False, tensorboard=False)
    if reference == "cache":
        from symmpo_fast.train.refcache import precompute

        precompute(cfg)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    return rows, tmp_path / "ours" / "final"


def _theirs(tmp_path: Path, objective: str, finetune: str, reference: str, checkpointing: bool, shift: bool = False):
    """The TRL trainer on the same records, in the order our trainer's schedule takes them
    (``shift``: each step gets the next step's records, a deliberate mismatch)."""
    schedule = StepSchedule(STEPS * GLOBAL, GLOBAL, MICRO, world=1, rank=0, seed=0)
    order = [i for s in range(STEPS) for mb in schedule.micro_batches(s) for i in mb]
    order = order[GLOBAL:] + order[:GLOBAL] if shift else order
    records = synthetic_records(STEPS * GLOBAL)
    rows = mpo_rows([records[i] for i in order], objective)
    model, processor = build_tiny_llava(seed=0)
    if finetune == "full":  # what our trainer trains: language model, projector, LM head
        model.requires_grad_(False)
        for module in adapter_for(model).full_finetune_modules():
            module.requires_grad_(True)
    trainer = mpo_trainer(objective, model, rows, processor, tmp_path / ("shifted" if shift else "theirs"),
                          peft_config=mpo_lora() if finetune == "lora" else None,
                          precompute_ref_log_probs=reference == "cache", gradient_checkpointing=checkpointing,
                          per_device_train_batch_size=MICRO,
                          gradient_accumulation_steps=GLOBAL // MICRO, max_steps=STEPS)
    trainer.train()
    return trainer, [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_equals_our_trainer(tmp_path, case):
    want, final = _ours(tmp_path, *CASES[case])
    trainer, got = _theirs(tmp_path, *CASES[case])
    objective, finetune, reference, checkpointing = CASES[case]
    assert trainer.model.is_gradient_checkpointing == checkpointing
    assert trainer.precompute_ref_logps == (reference == "cache")
    assert (trainer.ref_model is not None) == (reference == "copy")
    assert len(want) == len(got) == STEPS
    assert len({round(r["loss"], 5) for r in want}) == STEPS  # the steps did change the model
    skip = {"step", "lr", "records", "tokens_per_s"}
    for w, g in zip(want, got):
        names = set(w) - skip
        assert names <= set(g), sorted(names - set(g))
        for k in sorted(names):
            assert g[k] == pytest.approx(w[k], rel=REL, abs=ABS), (k, g[k], w[k])
    # The same weights at the end: the exported adapters, or the exported full model.
    if finetune == "lora":
        theirs = get_peft_model_state_dict(trainer.model)
        ours = load_file(str(final / "adapter_model.safetensors"))
    else:
        from transformers import LlavaForConditionalGeneration

        theirs = dict(trainer.model.named_parameters())
        ours = dict(LlavaForConditionalGeneration.from_pretrained(str(final)).named_parameters())
    assert theirs.keys() == ours.keys()
    worst = max(float((theirs[k].detach() - ours[k]).abs().max() / ours[k].abs().max().clamp(min=1e-12))
                for k in ours)  # measured: 0 (bit-identical) in every case
    assert worst < 1e-4, worst
    if case == "symmpo-full-copy":  # the comparison can fail: other records in each step miss by far
        _, wrong = _theirs(tmp_path, *CASES[case], shift=True)
        assert all(abs(g["loss"] - w["loss"]) / w["loss"] > 1e-3 for w, g in zip(want[1:], wrong[1:])), wrong


# ----------------------------------------------------------------------------------------------
# one batch against a direct forward_preference


def _first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))["preference_batch"]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _trainer_step(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, {"preference_batch": batch})
    loss.backward()
    return loss.item(), _grads(trainer.model), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _direct(policy, batch, cfg, ref):
    policy.train()
    policy.zero_grad(set_to_none=True)
    loss, metrics = forward_preference(policy, batch, cfg, ref)
    loss.backward()
    return loss.item(), _grads(policy), {k: float(v) for k, v in metrics.items() if k != "loss"}


REFERENCES = ["adapter", "copy", "ref_model", "precomputed"]


@pytest.mark.parametrize("objective", ["symmpo", "mdpo"])
@pytest.mark.parametrize("reference", REFERENCES)
def test_one_batch_equals_forward_preference(tiny, tmp_path, objective, reference):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    rows = mpo_rows(synthetic_records(4), objective)
    ref_model = perturbed(model, seed=1) if reference == "ref_model" else None
    original = copy.deepcopy(model)
    trainer = mpo_trainer(objective, model, rows, processor, tmp_path, ref_model=ref_model,
                          peft_config=mpo_lora(random_b=True) if reference == "adapter" else None,
                          precompute_ref_log_probs=reference == "precomputed")
    assert trainer.precompute_ref_logps == (reference == "precomputed")
    assert (trainer.ref_model is None) == (reference in ("adapter", "precomputed"))
    if reference in ("copy", "precomputed"):  # the policy moves away from the reference it started as
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.3 * p.std() * torch.randn_like(p))
    batch = _first_batch(trainer)
    # The direct pass: its own copy of the policy, and the reference computed here.  TRL's fused
    # head is an instance forward whose closure holds the original model: the copy drops it.
    policy = copy.deepcopy(trainer.model)
    del unwrap(policy).forward
    if reference == "adapter":
        ref = reference_logps(policy, batch)  # adapters disabled
    else:
        ref = reference_logps(ref_model if reference == "ref_model" else original, batch)
    if reference == "precomputed":
        table = torch.stack([trainer._sf_ref_logps[k] for k in batch.record_keys])
        torch.testing.assert_close(table, ref, rtol=1e-6, atol=1e-5)
    _check_one_batch(trainer, policy, batch, ref, objective)


def _check_one_batch(trainer, policy, batch, ref, objective):
    """The trainer's loss, metrics and gradients on ``batch`` against forward_preference on ``policy``
    (a copy of the trainer's) with ``ref``; measured bit-identical."""
    cfg = trainer._sf_cfg
    l0, g0, m0 = _direct(policy, batch, cfg, ref)
    l1, g1, m1 = _trainer_step(trainer, batch)
    assert abs(l0 - (4 if objective == "symmpo" else 3) * math.log(2)) > 1e-3, "policy == reference: too weak"
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert m1.pop("dropped") == m1.pop("truncated") == 0
    assert m1.keys() == m0.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    errs = grad_errors(g1, g0)
    assert len(errs) > 0 and max(errs.values()) < 1e-5, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    # A deliberately wrong objective (beta 0.2) misses by far more than those tolerances.
    l2, g2, _ = _direct(policy, batch, sf.ObjectiveConfig(**{**vars(cfg), "beta": 0.2}), ref)
    assert abs(l2 - l0) / l0 > 1e-4 and max(grad_errors(g2, g0).values()) > 1e-3


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_qwen_vl_one_batch_equals_forward_preference(tmp_path, name):
    """The other families through the same trainer: the prompt is the processor's chat template
    (the same ids as the collator gives the records), LoRA on the language model, adapter off."""
    model, processor = build_tiny(name)
    records = synthetic_records(3)
    regex = adapter_for(model).lora_target_regex(TrainConfig().lora_target_modules)
    trainer = mpo_trainer("symmpo", model, mpo_rows(records), processor, tmp_path,
                          peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=regex, init_lora_weights=False),
                          per_device_train_batch_size=3)
    batch = _first_batch(trainer)
    assert batch.record_keys == PreferenceCollator(processor, "symmpo")(records).record_keys
    assert processor.tokenizer.decode(batch.prompt_ids[0][0]).endswith(
        f"<|vision_end|>{records[0]['question']}<|im_end|>\n<|im_start|>assistant\n")
    policy = copy.deepcopy(trainer.model)
    del unwrap(policy).forward  # as above
    _check_one_batch(trainer, policy, batch, reference_logps(policy, batch), "symmpo")


# ----------------------------------------------------------------------------------------------
# data, vision tower, configs


def test_rows_become_the_collators_records(tiny, tmp_path):
    """A conversational prompt (and a plain-text one) gives the question's llava_v1 input, the same
    batch as the collator on the records themselves; a prompt holding the image token is used as
    written."""
    records = synthetic_records(3)
    processor = tiny[1]
    trainer = mpo_trainer("symmpo", copy.deepcopy(tiny[0]), mpo_rows(records), processor, tmp_path)
    want = PreferenceCollator(processor, "symmpo")(records)
    rows = mpo_rows(records)
    plain = rows.map(lambda r: {"prompt": r["prompt"][0]["content"][1]["text"], "chosen": r["chosen"][0]["content"][0][
        "text"]})
    for ds in (rows, plain):
        got = trainer.data_collator([ds[i] for i in range(len(ds))])["preference_batch"]
        assert got.record_keys == want.record_keys
        assert all(torch.equal(a, b) for ra, rb in zip(got.prompt_ids, want.prompt_ids) for a, b in zip(ra, rb)
                   if a is not None)
        assert torch.equal(got.pixel_values, want.pixel_values)
    def text(ids):  # the 16 placeholders of the tiny model's image as one
        return re.sub("(<image>)+", "<image>", processor.tokenizer.decode(ids))

    question = records[0]["question"]
    assert text(want.prompt_ids[0][0]) == f"<s>{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    assert text(want.response_ids[0][0]) == f" {records[0]['chosen']}</s>"
    written = f"USER: <image>\n{question} Answer briefly. ASSISTANT:"
    got = trainer.data_collator([{**rows[0], "prompt": written}])["preference_batch"]
    assert text(got.prompt_ids[0][0]) == "<s>" + written


@pytest.mark.parametrize("objective", ["symmpo", "mdpo"])
@pytest.mark.parametrize("packing", ["shared_prefix", "none"])
def test_vision_tower_runs_each_image_once_per_forward(tiny, tmp_path, objective, packing):
    """Shared prefix: each record's two images (m and m', or m and mDPO's crop) once per forward,
    reference and policy; the official layout (packing="none") re-encodes one per sequence."""
    B = 3
    trainer = mpo_trainer(objective, copy.deepcopy(tiny[0]), mpo_rows(synthetic_records(B), objective), tiny[1],
                          tmp_path, per_device_train_batch_size=B, packing=packing)
    seen = []
    handles = [adapter_for(m).vision_tower.register_forward_hook(
        lambda module, args, out, who=who: seen.append((who, args[0].shape[0])))
        for who, m in (("reference", trainer.ref_model), ("policy", trainer.model))]
    try:
        batch = _first_batch(trainer)
        trainer.compute_loss(trainer.model, {"preference_batch": batch}).backward()
    finally:
        for h in handles:
            h.remove()
    n = B * (2 if packing == "shared_prefix" else len(sf.data.COLUMNS[objective]))
    assert seen == [("reference", n), ("policy", n)]


def test_configs_default_to_the_official_objectives(tmp_path):
    assert mpo_config("symmpo", tmp_path).objective_config() == sf.ObjectiveConfig.symmpo()
    assert mpo_config("mdpo", tmp_path).objective_config() == sf.ObjectiveConfig.mdpo()
    cfg = mpo_config("symmpo", tmp_path, beta=0.2, pair_weight=0.25, average_logps=True)
    assert cfg.objective_config() == sf.ObjectiveConfig.symmpo(beta=0.2, pair_weight=0.25, average_logps=True)
    assert mpo_config("mdpo", tmp_path).collator_kwargs()["mdpo_crop"] == "seeded"
    assert mpo_config("symmpo", tmp_path, max_length=None).collator_kwargs()["max_length"] > 10**9


@pytest.mark.parametrize("config, option", [
    (dict(loss_type=["ipo"]), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"]), "loss_type"),
    (dict(loss_weights=[0.5]), "loss_weights"),
    (dict(label_smoothing=0.1), "label_smoothing"),
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(use_weighting=True), "use_weighting"),
    (dict(padding_free=True), "padding_free"),
    (dict(pad_to_multiple_of=8), "pad_to_multiple_of"),
    (dict(truncation_mode="keep_end"), "truncation_mode"),
    (dict(torch_compile=True), "torch_compile"),
])
@pytest.mark.parametrize("objective", ["symmpo", "mdpo"])
def test_unsupported_options_raise_naming_them(tiny, tmp_path, monkeypatch, objective, config, option):
    name = "SymMPOTrainer" if objective == "symmpo" else "MDPOTrainer"
    with pytest.raises(UnsupportedOptionError, match=rf"{name} does not implement {option}=") as e:
        mpo_config(objective, tmp_path, **config)
    assert e.value.option == option
    # Set after the config was made: the trainer checks again, before TRL runs.
    args = mpo_config(objective, tmp_path)
    for k, v in config.items():
        setattr(args, k, v)

    def never(*a, **k):
        raise AssertionError("DPOTrainer.__init__ ran: the option was not checked first")

    monkeypatch.setattr(DPOTrainer, "__init__", never)
    cls = SymMPOTrainer if objective == "symmpo" else MDPOTrainer
    with pytest.raises(UnsupportedOptionError, match=rf"{option}="):
        cls(model=copy.deepcopy(tiny[0]), args=args, train_dataset=mpo_rows(synthetic_records(2), objective),
            processing_class=tiny[1])


def test_bad_settings_and_rows_raise_naming_them(tiny, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match=r"roles \['pair_rejected', 'contrast_chosen'\].*SymMPOConfig"):
        mpo_config("mdpo", tmp_path, pair_weight=0.5)
    with pytest.raises(ValueError, match="mdpo_crop='official' draws a new crop"):
        mpo_config("mdpo", tmp_path, mdpo_crop="official", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match=r"SymMPOConfig.truncation must be one of"):
        mpo_config("symmpo", tmp_path, truncation="left")
    with pytest.raises(ValueError, match="ObjectiveConfig.pair_weight must be >= 0"):
        mpo_config("symmpo", tmp_path, pair_weight=-1.0)
    with pytest.raises(TypeError, match="SymMPOTrainer takes a SymMPOConfig"):
        SymMPOTrainer(model=copy.deepcopy(model), args=mpo_config("mdpo", tmp_path),
                      train_dataset=mpo_rows(synthetic_records(2)), processing_class=processor)
    with pytest.raises(TypeError, match="processing_class must be the model's processor"):
        mpo_trainer("symmpo", copy.deepcopy(model), mpo_rows(synthetic_records(2)), processor.tokenizer, tmp_path)
    for option in ("data_collator", "compute_metrics"):
        with pytest.raises(UnsupportedOptionError, match=rf"SymMPOTrainer does not implement {option}="):
            SymMPOTrainer(model=copy.deepcopy(model), args=mpo_config("symmpo", tmp_path),
                          train_dataset=mpo_rows(synthetic_records(2)), processing_class=processor,
                          **{option: lambda *a: None})
    rows = mpo_rows(synthetic_records(3))
    with pytest.raises(ValueError, match=r"train has no 'contrast_chosen' column, which symmpo needs"):
        mpo_trainer("symmpo", copy.deepcopy(model), rows.remove_columns("contrast_chosen"), processor, tmp_path)
    with pytest.raises(ValueError, match=r"train has no 'contrast_images' column"):
        mpo_trainer("symmpo", copy.deepcopy(model), rows.remove_columns("contrast_images"), processor, tmp_path)
    two_turns = rows.map(lambda r, i: {"prompt": user_turn("Hi?") + assistant_turn("Hello.") + r["prompt"]}
                         if i == 2 else {}, with_indices=True)
    with pytest.raises(ValueError, match=r"train row 2: 'prompt': a conversational prompt must be one user turn"):
        mpo_trainer("symmpo", copy.deepcopy(model), two_turns, processor, tmp_path)
    trainer = mpo_trainer("symmpo", copy.deepcopy(model), rows, processor, tmp_path)
    with pytest.raises(ValueError, match=r"row 1 of the batch: 'images' holds 2 images"):
        trainer.data_collator([rows[0], {**rows[1], "images": rows[1]["images"] * 2}])


def test_evaluate_with_a_precomputed_reference(tiny, tmp_path):
    """The eval set's reference is precomputed with the training set's; evaluate() logs the loss
    and metrics of forward_preference over it; a data set given to evaluate() is precomputed then."""
    records = synthetic_records(6)
    trainer = SymMPOTrainer(model=copy.deepcopy(tiny[0]), args=mpo_config(
        "symmpo", tmp_path, precompute_ref_log_probs=True, per_device_eval_batch_size=2),
        train_dataset=mpo_rows(records[:4]), eval_dataset=mpo_rows(records[4:]), processing_class=tiny[1],
        peft_config=mpo_lora(random_b=True))
    assert len(trainer._sf_ref_logps) == 6
    got = trainer.evaluate()
    policy = copy.deepcopy(trainer.model).eval()
    del unwrap(policy).forward  # TRL's fused head: see test_one_batch_equals_forward_preference
    batch = PreferenceCollator(tiny[1], "symmpo")(records[4:])
    with torch.no_grad():
        loss, metrics = forward_preference(policy, batch, trainer._sf_cfg, reference_logps(policy, batch))
    assert got["eval_loss"] == pytest.approx(float(loss), rel=1e-6)
    for k in ("loss/pair", "rewards/contrast_chosen", "accuracy/dpo"):
        assert got[f"eval_{k}"] == pytest.approx(float(metrics[k]), rel=1e-5, abs=1e-6), k
    more = trainer.evaluate(mpo_rows(synthetic_records(2, split="heldout")))
    assert len(trainer._sf_ref_logps) == 8 and math.isfinite(more["eval_loss"])
    with pytest.raises(ValueError, match="returns no logits"):
        trainer.predict(mpo_rows(records[4:]))


def test_records_longer_than_max_length_are_refused_before_training(tiny, tmp_path):
    """As our trainer reads its data: a row the collator would drop is named at construction (a
    step whose records were all dropped would raise mid-run, and under DDP leave the other
    processes waiting); truncation="right" keeps it, cut, and counts it."""
    records = synthetic_records(4)
    records[1] = {**records[1], "chosen": "yes " * 200}  # ~400 tokens: longer than max_length
    with pytest.raises(ValueError, match=r"train row 1: its longest sequence is \d+ tokens, above max_length=256"):
        mpo_trainer("symmpo", copy.deepcopy(tiny[0]), mpo_rows(records), tiny[1], tmp_path, max_length=256,
                    max_steps=2)
    trainer = mpo_trainer("symmpo", copy.deepcopy(tiny[0]), mpo_rows(records), tiny[1], tmp_path, max_length=256,
                          max_steps=2, truncation="right")
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
    assert [r["dropped"] for r in rows] == [0, 0] and sum(r["truncated"] for r in rows) >= 1


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_bf16_mixed_precision(tiny, tmp_path, finetune):
    """bf16=True (fp32 weights): the model's body runs under the accelerator's autocast in both
    passes, the fused head outside it in the weights' dtype; the losses stay within 1e-3 of the fp32
    run's (measured 1.3e-4).  With the head left under autocast, full fine-tuning fails."""
    rows = mpo_rows(synthetic_records(4))

    def run(bf16, out):
        trainer = mpo_trainer("symmpo", copy.deepcopy(tiny[0]), rows, tiny[1], out, bf16=bf16, max_steps=2,
                              peft_config=mpo_lora(random_b=True) if finetune == "lora" else None)
        seen = []
        models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
        handles = [adapter_for(m).language_model.layers[0].mlp.register_forward_hook(
            lambda module, args, out: seen.append(out.dtype)) for m in models]
        try:
            trainer.train()
        finally:
            for h in handles:
                h.remove()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r and "train_loss" not in r], seen

    want, dtypes = run(False, tmp_path / "fp32")
    got, dtypes16 = run(True, tmp_path / "bf16")
    assert set(dtypes) == {torch.float32} and set(dtypes16) == {torch.bfloat16} and len(dtypes16) == 4
    assert got == pytest.approx(want, rel=1e-3) and got != want


def test_a_model_given_by_its_directory(tiny, tmp_path):
    """As TRL: a hub id or a directory loads the policy and the reference (a second load); the
    processor comes from the same place; the first step is the policy == reference value."""
    tiny[0].save_pretrained(tmp_path / "model")
    tiny[1].save_pretrained(tmp_path / "model")
    trainer = SymMPOTrainer(model=str(tmp_path / "model"), args=mpo_config("symmpo", tmp_path / "out", max_steps=1),
                            train_dataset=mpo_rows(synthetic_records(2)))
    assert type(trainer.ref_model).__name__ == "LlavaForConditionalGeneration"
    assert type(trainer.processing_class).__name__ == "LlavaProcessor"
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(4 * math.log(2), abs=1e-5)


def test_a_peft_model_passed_in_is_referenced_by_trls_ref_adapter(tiny, tmp_path):
    """As TRL: a PeftModel without ref_model gets a frozen "ref" copy of its adapter, and the
    reference is that adapter (the policy as it starts), not the base model."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(tiny[0]), mpo_lora(random_b=True))  # an adapter != the base
    trainer = mpo_trainer("symmpo", model, mpo_rows(synthetic_records(2)), tiny[1], tmp_path)
    assert "ref" in trainer.model.peft_config and trainer.ref_model is None
    batch = _first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, {"preference_batch": batch})
        off = forward_preference(trainer.model, batch, trainer._sf_cfg, reference_logps(trainer.model, batch))[0]
    assert float(loss) == pytest.approx(4 * math.log(2), abs=1e-5)
    assert abs(float(off) - 4 * math.log(2)) > 1e-3  # the base model as the reference would differ


def test_a_string_prompt_is_read_as_our_readers_read_it():
    """A LLaVA-style "<image>\\nQ" is the question Q (our prompt format adds the system text and the
    turns), a whole conversation is used as written, an image token mid-text is refused."""
    from symmpo_fast.integrations._trl_mpo import _prompt

    conversation = "A chat. USER: <image>\nWhat is it? ASSISTANT:"
    assert _prompt("<image>\nWhat is it?", "<image>", "row 0") == {"question": "What is it?"}
    assert _prompt("What is it?", "<image>", "row 0") == {"question": "What is it?"}
    assert _prompt(conversation, "<image>", "row 0") == {"prompt": conversation}
    assert _prompt("<|image_pad|>What?", "<|image_pad|>", "row 0") == {"question": "What?"}
    with pytest.raises(ValueError, match="row 3: field 'question' holds '<image>' inside its text"):
        _prompt("Left <image> right", "<image>", "row 3")
