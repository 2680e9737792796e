"""DPO with TRL, symmpo-fast's fused head and loss underneath: swap DPOTrainer for FusedDPOTrainer.

    python examples/trl_dpo.py                              # a tiny random Llama, offline, seconds on a CPU
    python examples/trl_dpo.py Qwen/Qwen2.5-0.5B-Instruct   # any causal LM (or VLM) that trl.DPOTrainer takes
"""

import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig

from symmpo_fast.integrations.trl import FusedDPOTrainer, FusedOptions
from symmpo_fast.models.tiny import TOKENIZER_DIR

if len(sys.argv) > 1:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
else:
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))  # the repo's 1000-token byte-level BPE
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id))

# TRL's preference format: prompt, chosen, rejected (plain text or conversational messages).
data = Dataset.from_dict({
    "prompt": ["The capital of France is", "Two plus two is", "The sky is", "Water boils at"],
    "chosen": [" Paris.", " four.", " blue.", " 100 degrees Celsius."],
    "rejected": [" Rome.", " five.", " green.", " 50 degrees Celsius."],
})
args = DPOConfig(output_dir="runs/trl-dpo", max_steps=3, per_device_train_batch_size=2, learning_rate=1e-4,
                 logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available())
trainer = FusedDPOTrainer(
    model=model, args=args, train_dataset=data, processing_class=tokenizer,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),  # reference = the adapter off
    fused=FusedOptions(logit_metrics=True),  # the default: TRL's entropy / token accuracy too, one more head pass
)
trainer.train()
last = [row for row in trainer.state.log_history if "rewards/margins" in row][-1]
print({k: round(last[k], 4) for k in ("loss", "rewards/margins", "entropy", "mean_token_accuracy")})
