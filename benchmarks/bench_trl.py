"""Scenario ``trl``: one training step of stock TRL 1.16 ``DPOTrainer`` against ``FusedDPOTrainer``.

Same process, same random-init Llama-shaped model, same batch, same ``DPOConfig``: the step is
``trainer.training_step`` (TRL's ``compute_loss`` with the reference pass, the backward under
the trainer's autocast) then an optimizer step and the gradients freed.  The optimizer is SGD at
lr 0, so the weights stay put and every method sees the same model (the losses are compared:
``rel_err`` is ours against stock's on the batch).

Methods: ``trl DPOTrainer`` (stock: TRL's fused head ``ChunkedLogProbFunction``, with the
entropy / mean-logit / top-1 outputs its metrics use), ``symmpo-fast FusedDPOTrainer`` (the
fused loss plus the no-grad logit-metrics pass, TRL's metrics exactly) and ``... logit_metrics=off``
(the fused loss alone; entropy, mean_token_accuracy and logits/* not logged).

Reference: ``ref=model`` (a frozen copy, forward under no_grad each step; full fine-tuning) or
``ref=adapter`` (LoRA: the base model with its adapter off).  ``tokens_per_s`` counts the
batch's non-padding tokens (chosen and rejected rows).  On the CPU, TRL's head scores every
position (prompt and padding too, its non-Triton path); on CUDA only the completion tokens.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from symmpo_fast.bench import MiB, Run, Unavailable, free_memory, is_oom, peak_extra_bytes

from bench_step import _loop_time

WORDS = tuple(" " + c for c in "abcdefghijklmnopqrstuvwxyz")
"""Single-token words of the shipped byte-level BPE tokenizer: a prompt of P words is P tokens."""


@dataclass(frozen=True)
class TrlCase:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    records: int
    prompt: int
    response: int
    train: str = "full"
    """``full`` (reference: a frozen copy) or ``lora`` (r 16 on every linear layer; reference: adapter off)."""
    dtype: str = "float32"
    grad_ckpt: bool = False

    def label(self) -> str:
        return f"{self.name} {self.train} p{self.prompt} r{self.response} x{self.records}"


def trl_grid(preset: str) -> list[TrlCase]:
    if preset == "smoke":
        return [TrlCase("tiny", 64, 2, 4, 2, 128, 1000, 2, 12, 8)]
    if preset == "cpu":
        small = dict(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376, vocab=32000, records=4)
        return [TrlCase("small", **small, prompt=64, response=64),
                TrlCase("small", **small, prompt=64, response=64, train="lora")]
    if preset == "gpu":
        # Qwen2.5-0.5B's shape (vocabulary 151936, tied head not used: TRL reads lm_head.weight), bf16,
        # gradient checkpointing (TRL's default).
        qwen = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, dtype="bfloat16",
                    grad_ckpt=True)
        return [TrlCase("qwen2.5-0.5b-shaped", **qwen, records=8, prompt=512, response=256),
                TrlCase("qwen2.5-0.5b-shaped", **qwen, records=8, prompt=512, response=256, train="lora")]
    raise ValueError(f"unknown preset {preset!r}")


def _records(case: TrlCase, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def text(n):
        return "".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

    n = case.records
    return Dataset.from_dict({"prompt": [text(case.prompt) for _ in range(n)],
                              "chosen": [text(case.response) for _ in range(n)],
                              "rejected": [text(case.response) for _ in range(n)]})


def _model(case: TrlCase, tok, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                      num_hidden_layers=case.layers, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, case.dtype))


def _trainer(cls, case: TrlCase, model, ref, data, tok, device, out, **kwargs):
    from peft import LoraConfig
    from trl import DPOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=str(out), per_device_train_batch_size=case.records, max_length=None,
                         gradient_checkpointing=case.grad_ckpt, bf16=case.dtype == "bfloat16",
                         use_cpu=device.type == "cpu", report_to=[], save_strategy="no", disable_tqdm=True,
                         learning_rate=0.0, seed=0)
        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0) \
            if case.train == "lora" else None
        trainer = cls(model=copy.deepcopy(model), ref_model=None if ref is None else copy.deepcopy(ref), args=args,
                      train_dataset=data, processing_class=tok, peft_config=peft, **kwargs)
    if case.grad_ckpt:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    return trainer


def _step(trainer, batch):
    model = trainer.model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    # Set by Trainer.train() for each accumulation window; one step here is one window of 1.
    trainer.current_gradient_accumulation_steps = 1

    def step():
        trainer.training_step(model, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def methods():
    """(name, trainer class, its extra kwargs) for every method; raises Unavailable without TRL."""
    try:
        from trl import DPOTrainer

        from symmpo_fast.integrations.trl import FusedDPOTrainer, FusedOptions
    except ImportError as e:
        raise Unavailable(f"TRL not importable ({e}); pip install 'symmpo-fast[trl]'") from e
    return [("trl DPOTrainer", DPOTrainer, {}),
            ("symmpo-fast FusedDPOTrainer", FusedDPOTrainer, {}),
            ("symmpo-fast FusedDPOTrainer logit_metrics=off", FusedDPOTrainer,
             {"fused": FusedOptions(logit_metrics=False)})]


def run_case(run: Run, case: TrlCase, out) -> None:
    from transformers import AutoTokenizer

    from symmpo_fast.models.tiny import TOKENIZER_DIR

    device = run.device
    base = dict(scenario="trl", case=case.label(), dtype={"float32": "fp32", "bfloat16": "bf16"}[case.dtype],
                records=case.records, D=case.hidden, V=case.vocab, **{"pass": "train step"})
    try:
        ms = methods()
    except Unavailable as e:
        run.add(**base, method="*", status=f"n/a: {e}")
        return
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    data = _records(case)
    model = _model(case, tok, device)
    ref = copy.deepcopy(model) if case.train == "full" else None
    stock_loss, naive_row = None, None
    for name, cls, kwargs in ms:
        if not (cls.__name__ == "DPOTrainer" or run.wants(name)):
            continue
        row = dict(base, method=name)
        if run.time_left() <= 0:
            run.add(**row, status="skipped: time budget")
            continue
        trainer = step = None
        try:
            trainer = _trainer(cls, case, model, ref, data, tok, device, out / name.replace(" ", "_"), **kwargs)
            batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
            tokens = int(batch["attention_mask"].sum())
            with torch.no_grad():
                loss = float(trainer.compute_loss(trainer.model, batch))
            if cls.__name__ == "DPOTrainer":
                stock_loss = loss
            err = None if stock_loss is None else abs(loss - stock_loss) / max(abs(stock_loss), 1e-30)
            step = _step(trainer, batch)
            t = _loop_time(step, run)
            mem = peak_extra_bytes(step, device)
        except Exception as e:  # noqa: BLE001 - one method failing must not stop the others
            if is_oom(e):
                free_memory(device)
                run.add(**row, status="n/a: OOM")
                continue
            run.add(**row, status=f"error: {e.__class__.__name__}: {str(e)[:160]}")
            continue
        finally:
            del trainer, step
            free_memory(device)
        sec = t.median * 1e-3
        extra = (f"train={case.train} ref={'model' if case.train == 'full' else 'adapter'} layers={case.layers} "
                 f"prompt={case.prompt} response={case.response} tokens={tokens} grad_ckpt={int(case.grad_ckpt)}")
        out_row = run.add(**row, N=tokens, extra=extra, reps=t.reps, time_ms=t.median, time_ms_q1=t.q1,
                          time_ms_q3=t.q3, time_ms_min=t.lo, time_ms_max=t.hi, peak_mib=mem / MiB,
                          records_per_s=case.records / sec, tokens_per_s=tokens / sec, rel_err=err, status="ok",
                          **run.vs_naive(naive_row, t.median, mem / MiB, cls.__name__ == "DPOTrainer"))
        naive_row = naive_row or out_row
        print(f"  {case.label():40s} {name:46s} {t.median:9.1f} ms {case.records / sec:7.2f} rec/s "
              f"{mem / MiB:9.1f} MiB  loss rel diff {err if err is None else f'{err:.1e}'}", flush=True)
    del model, ref
    free_memory(device)


def run_trl(run: Run, preset: str) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as out:
        for case in trl_grid(preset):
            if run.time_left() <= 0:
                run.add(scenario="trl", case=case.label(), method="*", status="skipped: time budget")
                continue
            run_case(run, case, Path(out))
