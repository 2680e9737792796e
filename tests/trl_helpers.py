"""Tiny models, data sets and comparisons for the TRL integration tests (tests/test_trl*.py and
the torchrun helper tests/trl_ddp_run.py).

The tiny models are random-init, built from configs, with the repository's offline byte-level
BPE tokenizer.  Their LM head is the input embedding scaled down, and the embeddings dominate the
residual stream, so each position's top logit is its own token: ``mean_token_accuracy`` is the
share of completion tokens that repeat the previous one (the records below make it neither 0 nor
1), and a comparison of that metric cannot pass by both sides being 0.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch

TOKENIZER = Path(__file__).resolve().parent.parent / "symmpo_fast" / "assets" / "tokenizer"

PROMPTS = ["The cat sat on", "Two plus two is", "Colour of the sky:", "Hello", "Name a fruit:", "Count to three:",
           "The capital of France is", "Say yes:"]
# Every chosen completion repeats a token (" four four", " a a"), so its top-1 accuracy is above 0.
CHOSEN = [" the mat a a", " four four four", " blue a a a", " world a a a", " an apple a a", " one two a a",
          " Paris a a", " yes yes"]
REJECTED = [" a dog", " five or six", " green green", " there", " a car car", " four", " Rome", " no"]


def text_records(n: int = 8):
    from datasets import Dataset

    k = [i % len(PROMPTS) for i in range(n)]
    return Dataset.from_dict({"prompt": [PROMPTS[i] for i in k], "chosen": [CHOSEN[i] for i in k],
                              "rejected": [REJECTED[i] for i in k]})


def _self_predicting(model, seed: int, sigma: float = 0.5, self_logit: float = 4.0):
    """Embeddings N(0, sigma) and an untied head ``embed * self_logit / (D * sigma)``: each
    position's own token scores about ``self_logit``, the others N(0, self_logit / sqrt(D))."""
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=g) * sigma)
        model.get_output_embeddings().weight.copy_(emb * self_logit / (emb.shape[1] * sigma))
    return model


def perturbed(model, seed: int, scale: float = 0.5):
    """A copy with every parameter moved by ``scale`` times its own std: a reference != the policy."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return ref


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def tiny_llama(tok, seed: int = 0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **config)
    torch.manual_seed(seed)
    return _self_predicting(LlamaForCausalLM(cfg), seed)


def tiny_llava_and_records(n: int = 4, seed: int = 0):
    """The repository's tiny LLaVA, its processor and ``n`` conversational records with an image each."""
    from datasets import Dataset
    from PIL import Image

    from symmpo_fast.models import build_tiny_llava

    model, processor = build_tiny_llava(seed=seed)
    _self_predicting(model, seed)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]

    def user(t):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]

    def assistant(t):
        return [{"role": "assistant", "content": [{"type": "text", "text": t}]}]

    k = [i % len(PROMPTS) for i in range(n)]
    data = Dataset.from_dict({"images": [[im] for im in images], "prompt": [user(PROMPTS[i]) for i in k],
                              "chosen": [assistant(CHOSEN[i]) for i in k],
                              "rejected": [assistant(REJECTED[i]) for i in k]})
    return model, processor, data


def dpo_config(out, **overrides):
    from trl import DPOConfig

    kw = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=3, logging_steps=1, report_to=[],
              bf16=False, gradient_checkpointing=False, use_cpu=True, learning_rate=0.1, optim="sgd",
              lr_scheduler_type="constant", save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOConfig(**kw)


def build(cls, model, ref, data, processing_class, out, trainer_kwargs=None, **config):
    """``cls`` (trl.DPOTrainer or FusedDPOTrainer) on copies of ``model`` and ``ref``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=copy.deepcopy(model), ref_model=None if ref is None else copy.deepcopy(ref),
                   args=dpo_config(out, **config), train_dataset=data, processing_class=processing_class,
                   **(trainer_kwargs or {}))


def one_batch(trainer):
    """Loss, TRL's metrics and every parameter gradient of the first training batch."""
    model = trainer.model
    model.train()
    if trainer.args.gradient_checkpointing:  # train() would turn it on; a lone compute_loss does not
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, grads


def train_log(trainer):
    """Per-step rows of ``log_history`` (loss and TRL's metrics) after ``trainer.train()``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]


def grad_errors(got: dict, want: dict) -> dict[str, float]:
    """Per parameter ``||got - want|| / max(||want||, 1e-4 * the largest ||want||)``."""
    assert got.keys() == want.keys()
    floor = 1e-4 * max(float(g.norm()) for g in want.values())
    return {n: float((got[n] - want[n]).norm()) / max(float(want[n].norm()), floor) for n in want}


# Metrics: 1e-4 relative, and 2e-6 absolute for near-zero rewards and margins: they are beta
# times differences of fp32 sums of ~30 nats, whose own resolution is 3.8e-6 (one ulp at 32), so
# one ulp of a sum moves a reward of 0.002 by 3.8e-7, a relative 2e-4.
METRIC_REL, METRIC_ABS = 1e-4, 2e-6


def assert_metrics_close(got: dict, want: dict):
    import pytest

    assert list(got) == list(want), f"metric names/order {list(got)} != TRL's {list(want)}"
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=METRIC_REL, abs=METRIC_ABS), (k, got[k], want[k])


# ----------------------------------------------------------------------------------------------
# SymMPOTrainer / MDPOTrainer (tests/test_trl_mpo.py, the DDP job of tests/trl_ddp_run.py)

def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def mpo_rows(records, objective: str = "symmpo"):
    """symmpo-fast records (image, contrast_image, question, chosen, rejected, contrast_chosen) as a
    ``datasets.Dataset`` in TRL's conversational columns, in the same order."""
    from datasets import Dataset

    columns = {"images": [[r["image"]] for r in records], "prompt": [user_turn(r["question"]) for r in records],
               "chosen": [assistant_turn(r["chosen"]) for r in records],
               "rejected": [assistant_turn(r["rejected"]) for r in records]}
    if objective == "symmpo":
        columns["contrast_images"] = [[r["contrast_image"]] for r in records]
        columns["contrast_chosen"] = [assistant_turn(r["contrast_chosen"]) for r in records]
    return Dataset.from_dict(columns)


def synthetic_records(n: int, split: str = "train") -> list[dict]:
    """The records symmpo-fast's trainer reads for ``data="synthetic"``, ``synthetic_records=n``."""
    from symmpo_fast.synthetic import build_split

    data = build_split(split, n)
    return [data[i] for i in range(n)]


def mpo_config(objective: str, out, **overrides):
    """SymMPOConfig / MDPOConfig for a few CPU steps: fp32, no checkpointing, rows in order."""
    from symmpo_fast.integrations.trl import MDPOConfig, SymMPOConfig

    kw = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=3, logging_steps=1, report_to=[],
              bf16=False, gradient_checkpointing=False, use_cpu=True, learning_rate=2e-3, optim="adamw_torch",
              lr_scheduler_type="constant", save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
              train_sampling_strategy="sequential")
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (SymMPOConfig if objective == "symmpo" else MDPOConfig)(**kw)


def mpo_trainer(objective: str, model, rows, processor, out, ref_model=None, peft_config=None, **config):
    from symmpo_fast.integrations.trl import MDPOTrainer, SymMPOTrainer

    cls = SymMPOTrainer if objective == "symmpo" else MDPOTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=model, ref_model=ref_model, args=mpo_config(objective, out, **config), train_dataset=rows,
                   processing_class=processor, peft_config=peft_config)


def mpo_lora(random_b: bool = False):
    """symmpo-fast's trainer's adapter on the tiny LLaVA (r 8, alpha 16, no dropout, the default
    linear layers of the language model); ``random_b``: B random too, so that the policy differs
    from its adapter-off reference from the first step."""
    from peft import LoraConfig

    from symmpo_fast.models import adapter_for, build_tiny_llava
    from symmpo_fast.train import TrainConfig

    regex = adapter_for(build_tiny_llava()[0]).lora_target_regex(TrainConfig().lora_target_modules)
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=regex,
                      **({"init_lora_weights": False} if random_b else {}))
