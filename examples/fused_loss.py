"""symmpo-fast's fused DPO loss in a plain PyTorch loop and in a Hugging Face Trainer.

    python examples/fused_loss.py        # a tiny random Llama, offline, seconds on a CPU

No [tokens x vocab] logits: the hidden states of the response positions and the LM head's weight
go to sf.fused_preference_loss, which computes the token log-probs, the per-sequence sums, the
loss and every gradient in one pass.  cfg = sf.ObjectiveConfig.symmpo() / .mdpo() take five
sequences per record instead of two (see the README's table of roles).
"""

import copy
from functools import partial

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import symmpo_fast as sf
from symmpo_fast.integrations import call_in_forward, inner_module
from symmpo_fast.models.tiny import TOKENIZER_DIR

tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
reference = copy.deepcopy(model).requires_grad_(False)
cfg = sf.ObjectiveConfig.dpo(beta=0.1)
RECORDS = [("The capital of France is", " Paris.", " Rome."), ("Two plus two is", " four.", " five."),
           ("The sky is", " blue.", " green."), ("Water boils at", " 100 C.", " 50 C.")]


def collate(records):
    """Rows chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}, right-padded: input_ids and
    attention_mask [2B, T]; labels [2B, T-1] (the next token of each position) and seq_index
    [2B, T-1] (b * 5 + 0 for record b's chosen response, b * 5 + 1 for its rejected one, -1 on
    the prompt and the padding)."""
    rows, seqs = [], []
    for column in (0, 1):
        for b, (prompt, *responses) in enumerate(records):
            p = tokenizer(prompt).input_ids
            r = tokenizer(responses[column] + tokenizer.eos_token, add_special_tokens=False).input_ids
            rows.append(p + r)
            seqs.append([-1] * len(p) + [b * 5 + column] * len(r))
    T = max(map(len, rows))
    ids = torch.tensor([x + [tokenizer.pad_token_id] * (T - len(x)) for x in rows])
    seq = torch.tensor([s + [-1] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids[:, 1:], "seq_index": seq[:, 1:]}


def dpo_loss(model, input_ids, attention_mask, labels, seq_index, ref_logps):
    """(loss, metrics): the backbone, then the fused head + DPO on the response positions only."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    keep = seq_index >= 0
    return sf.fused_preference_loss(hidden[keep], model.lm_head.weight, labels[keep], seq_index[keep], ref_logps,
                                    cfg)


@torch.no_grad()
def reference_logps(batch):
    """[B, 5] summed response log-probs of the frozen reference (unused columns 0)."""
    hidden = reference.model(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
    keep = batch["seq_index"] >= 0
    logps = sf.token_logps(hidden[keep], reference.lm_head.weight, batch["labels"][keep])
    return sf.sequence_sums(logps, batch["seq_index"][keep], batch["input_ids"].shape[0] // 2)


# 1. Plain PyTorch.
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch = collate(RECORDS)
ref = reference_logps(batch)
for step in range(3):
    loss, metrics = dpo_loss(model, **batch, ref_logps=ref)
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f} reward margin {metrics['margin/dpo'].item():.4f}")


# 2. Hugging Face Trainer.  call_in_forward runs dpo_loss as the forward of the model that DDP /
# FSDP / DeepSpeed wraps, so the wrapper reduces its gradients and gathers its parameters; calling
# model.module.model(...) from compute_loss instead would leave each replica training alone.
class FusedDPOLossTrainer(Trainer):
    loss_is_scaled_for_ga = False  # compute_loss returns a mean: Trainer divides it for accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ref_logps = reference_logps(inputs)
        loss, metrics = call_in_forward(model, partial(dpo_loss, inner_module(model)), **inputs, ref_logps=ref_logps)
        return (loss, metrics) if return_outputs else loss


args = TrainingArguments(output_dir="runs/fused-loss", max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                         logging_steps=1, report_to=[], save_strategy="no", remove_unused_columns=False,
                         use_cpu=not torch.cuda.is_available())
trainer = FusedDPOLossTrainer(model=model, args=args, train_dataset=RECORDS, data_collator=collate)
trainer.model_accepts_loss_kwargs = False  # the same, for transformers < 5.19
reference.to(args.device)
trainer.train()
print("Trainer losses:", [round(row["loss"], 4) for row in trainer.state.log_history if "loss" in row])
