"""SymMPO as a TRL trainer: symmpo-fast's collator, shared-prefix batching and fused loss underneath.

    python examples/trl_symmpo.py                             # the tiny random LLaVA, offline, seconds on a CPU
    python examples/trl_symmpo.py llava-hf/llava-1.5-7b-hf    # a LLaVA-1.5 checkpoint (a GPU for a 7B)
"""

import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image, ImageDraw
from transformers import AutoProcessor, LlavaForConditionalGeneration

from symmpo_fast.integrations.trl import SymMPOConfig, SymMPOTrainer
from symmpo_fast.models import build_tiny_llava

if len(sys.argv) > 1:
    model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(sys.argv[1])
else:
    model, processor = build_tiny_llava()


def square(colour):
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=colour)
    return image


def user(question):  # TRL's conversational prompt: one user turn, the image then the question
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def assistant(answer):
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


# TRL's columns plus SymMPO's: m' (contrast_images), a similar image on which y_w' is right.
pairs = [("red", "blue"), ("green", "yellow"), ("blue", "red"), ("yellow", "green")]
data = Dataset.from_dict({
    "images": [[square(c)] for c, _ in pairs],                           # m
    "prompt": [user("What colour is the square?")] * len(pairs),         # x
    "chosen": [assistant(f"The square is {c}.") for c, _ in pairs],      # y_w, right on m
    "rejected": [assistant("The square is purple.")] * len(pairs),       # y_l
    "contrast_images": [[square(d)] for _, d in pairs],                  # m'
    "contrast_chosen": [assistant(f"The square is {d}.") for _, d in pairs],  # y_w', right on m'
})
args = SymMPOConfig(output_dir="runs/trl-symmpo", max_steps=3, per_device_train_batch_size=2, learning_rate=1e-4,
                    logging_steps=1, report_to=[], save_strategy="no", bf16=torch.cuda.is_available(),
                    use_cpu=not torch.cuda.is_available())  # objective: the official SymMPO weights
trainer = SymMPOTrainer(
    model=model, args=args, train_dataset=data, processing_class=processor,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"),
)  # reference = the base model (the adapter off); the prompt is LLaVA-1.5's official llava_v1 input
trainer.train()
last = [row for row in trainer.state.log_history if "loss/pair" in row][-1]
print({k: round(last[k], 4) for k in ("loss", "loss/dpo", "loss/pair", "loss/anchor", "accuracy/dpo")})
