"""mDPO as a TRL trainer: full fine-tuning with the reference log-probs precomputed once.

    python examples/trl_mdpo.py                               # the tiny random LLaVA, offline, seconds on a CPU
    python examples/trl_mdpo.py llava-hf/llava-1.5-7b-hf      # a LLaVA-1.5 checkpoint (GPUs for a 7B)
"""

import sys

import torch
from datasets import Dataset
from PIL import Image, ImageDraw
from transformers import AutoProcessor, LlavaForConditionalGeneration

from symmpo_fast.integrations.trl import MDPOConfig, MDPOTrainer
from symmpo_fast.models import build_tiny_llava

if len(sys.argv) > 1:
    model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1])
    processor = AutoProcessor.from_pretrained(sys.argv[1])
else:
    model, processor = build_tiny_llava()
model.model.vision_tower.requires_grad_(False)  # frozen, as in the mDPO paper: the rest is trained


def circles(n):
    image = Image.new("RGB", (64, 64), "white")
    for i in range(n):
        ImageDraw.Draw(image).ellipse((4 + 20 * i, 24, 20 + 20 * i, 40), fill="black")
    return image


# TRL's columns; mDPO's conditional term compares y_w on m with y_w on a random crop of m, which
# the trainer makes (one crop per record and seed).  A plain-text prompt is the question.
words = ["one", "two", "three"]
data = Dataset.from_dict({
    "images": [[circles(n)] for n in (1, 2, 3, 2)],
    "prompt": ["How many circles are there?"] * 4,
    "chosen": [f"There are {words[n - 1]} circles." for n in (1, 2, 3, 2)],
    "rejected": [f"There are {words[n % 3]} circles." for n in (1, 2, 3, 2)],
})
args = MDPOConfig(output_dir="runs/trl-mdpo", max_steps=3, per_device_train_batch_size=2, learning_rate=1e-5,
                  logging_steps=1, report_to=[], save_strategy="no", bf16=torch.cuda.is_available(),
                  use_cpu=not torch.cuda.is_available(),
                  precompute_ref_log_probs=True)  # no reference model is kept during training
trainer = MDPOTrainer(model=model, args=args, train_dataset=data, processing_class=processor)
trainer.train()
last = [row for row in trainer.state.log_history if "loss/copo" in row][-1]
print({k: round(last[k], 4) for k in ("loss", "loss/dpo", "loss/copo", "loss/anchor", "accuracy/copo")})
