"""Builds the tiny tokenizer shipped in ``symmpo_fast/assets/tokenizer/``, offline.

    python symmpo_fast/assets/build_tokenizer.py      # rewrites the files; commit them

A byte-level BPE (GPT-2 style: every byte has a token, so any text encodes) trained on the
small built-in corpus below, about 1000 tokens, so that the words of the demo data set
(rendered shapes: colours, shapes, counts, positions, yes/no) are single tokens and the tiny
test models stay small.  Special tokens ``<s> </s> <pad> <unk> <image>``; a ``<s>`` is added
in front of every encoded text, as the Llama tokenizer of LLaVA-1.5 does.  The chat template
is LLaVA-1.5's ``USER: <image>\\n{question} ASSISTANT: {answer}</s>``.

Training is deterministic (one thread, a fixed corpus), so a rebuild gives the same files.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tokenizer"
VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<image>"]

# LLaVA-1.5's conversation format (llava-hf's template, plus an optional system turn and the
# assistant's answer closed by </s> as in the original LLaVA v1 conversation).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'USER: ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' ' }}"
    "{% else %}"
    "{{ 'ASSISTANT: ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
           "grey", "cyan", "magenta"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "ellipse", "oval", "hexagon", "pentagon",
          "diamond", "cross", "heart", "line", "dot", "shape", "object"]
COUNTS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "a", "an",
          "single", "several", "many", "both", "each", "every"] + [str(i) for i in range(11)]
POSITIONS = ["top left", "top right", "bottom left", "bottom right", "top", "bottom", "left", "right",
             "center", "centre", "middle", "upper", "lower", "corner", "above", "below", "next to",
             "beside", "between", "near", "far from", "inside", "outside", "on the left of", "on the right of"]
SIZES = ["small", "large", "big", "tiny", "medium", "huge", "smaller", "larger", "bigger"]
TEMPLATES = [
    "What color is the {shape}?",
    "What colour is the {shape} in the {pos}?",
    "How many {colour} {shapes} are there?",
    "How many {shapes} are in the image?",
    "Is there a {colour} {shape} in the image?",
    "Is the {colour} {shape} {pos2} the {shape2}?",
    "Where is the {size} {colour} {shape}?",
    "Which shape is in the {pos}?",
    "Describe the image.",
    "Describe the image in detail.",
    "Yes, there is a {colour} {shape} in the {pos}.",
    "No, there is no {colour} {shape} in the image.",
    "There are {count} {colour} {shapes} in the image.",
    "There is one {size} {colour} {shape} in the {pos} of the image.",
    "The {shape} is {colour}.",
    "The {colour} {shape} is in the {pos} corner.",
    "The image shows {count} {shapes}: a {colour} {shape} and a {colour2} {shape2}.",
    "The {size} {colour} {shape} is {pos2} the {colour2} {shape2}.",
    "I see {count} {shapes} on a {colour2} background.",
    "Yes.", "No.", "yes", "no", "Yes", "No",
]
QUESTIONS = [t for t in TEMPLATES if t.endswith("?") or t.startswith("Describe")]
ANSWERS = [t for t in TEMPLATES if t not in QUESTIONS]
# A little ordinary English so that common words are not spelt byte by byte.
ENGLISH = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. The image contains some objects and a background.
Please answer the question about the picture with a short answer. Look at the photo and tell me what
you see. It is not possible to tell from this image. The answer is correct, the other answer is wrong.
There is nothing else in the scene. This is a simple drawing with colored shapes on a plain background.
Count the objects, name their colors and say where they are. Is it true that the picture has more than
one object? The first one is at the top and the second one is at the bottom, while the third is near
the edge. Both of them have the same size, but they have different colors. Here is what I found: the
shapes were placed at random positions, and some of them overlap each other. Which one is closest to the
center? Neither of them. My best guess would be that there should be only two; otherwise, please explain
your reasoning step by step. Because the image is blurry, I am not sure, but probably the answer is no.
I think that it looks like
a picture of shapes that are drawn by hand; however, it could also be a computer image. What about the
rest of the items? Answer with yes or no. Can you see any text, a person, an animal, a car, a house,
a tree, a table, a cat, a dog, a man, a woman, a street, a sign, a window? The color of the sky is blue
and the grass is green. He said: "Thank you for your help!" We would like to know how many there are.
"""


def corpus() -> list[str]:
    plural = {s: (s + "es" if s.endswith(("ss", "x")) else s + "s") for s in SHAPES}
    pos2 = ["above", "below", "next to", "left of", "right of", "beside", "near"]

    def fill(tpl: str, i: int, colour: str, shape: str) -> str:
        shape2 = SHAPES[(i * 7 + 3) % len(SHAPES)]
        return tpl.format(
            shape=shape, shapes=plural[shape], colour=colour, colour2=COLOURS[(i * 5 + 1) % len(COLOURS)],
            shape2=shape2, count=COUNTS[i % len(COUNTS)], pos=POSITIONS[i % len(POSITIONS)],
            pos2=pos2[i % len(pos2)], size=SIZES[i % len(SIZES)])

    lines = [ln.strip() for ln in ENGLISH.strip().splitlines()]
    for i, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES)):
        q = fill(QUESTIONS[i % len(QUESTIONS)], i, colour, shape)
        a = fill(ANSWERS[i % len(ANSWERS)], i + 1, colour, shape)
        # Whole turns, so that the template's words and answers after "ASSISTANT: " become tokens.
        lines.append(f"USER: <image>\n{q} ASSISTANT: {a}</s>")
        lines += [fill(t, i, colour, shape) for t in TEMPLATES]
    # Capitalised words start sentences.
    lines += [w.capitalize() for w in COLOURS + SHAPES + COUNTS + SIZES]
    return lines


def build(out: Path = OUT) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # BPE merges tie-break by order of discovery: keep it fixed
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "image_token": "<image>", "extra_special_tokens": {"image_token": "<image>"},
        "model_max_length": 4096, "padding_side": "right", "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    build()
