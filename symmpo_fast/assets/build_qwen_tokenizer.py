"""Builds the tiny Qwen-VL tokenizers shipped in ``symmpo_fast/assets/qwen2_5_vl/`` and
``symmpo_fast/assets/qwen3_vl/``, offline.

    python symmpo_fast/assets/build_qwen_tokenizer.py      # rewrites the tokenizer files; commit them

The real Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizer (``Qwen2Tokenizer``) is a byte-level BPE
whose pre-tokenizer splits with Qwen2's regex (digits one by one, a letter run with at most one
leading non-letter) and normalises to NFC; it adds no BOS, and its special tokens follow the BPE
vocabulary in a fixed order.  This one has the same pipeline and the same special tokens in the
same order, with a BPE of about 1000 tokens trained on the shapes corpus of
``build_tokenizer.py``, so that the demo's words are single tokens.  Token *ids* differ from the
real ones (151643 is ``<|endoftext|>`` there): nothing here depends on them.

``chat_template.jinja`` in each directory is the family's official template, not written by
this script: Qwen2.5-VL-Instruct's (the same as Qwen2-VL-Instruct's: a default system turn
"You are a helpful assistant.") and Qwen3-VL-Instruct's (no default system turn).  The
instruct checkpoints end a turn with ``<|im_end|>``, which is their EOS; ``<|endoftext|>`` pads.

Training is deterministic (one thread, a fixed corpus), so a rebuild gives the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 1000
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# (token, special) in the order of the real tokenizer's added tokens.
QWEN2_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN3_ADDED = QWEN2_ADDED + [("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
                             ("</think>", False)]
FAMILIES = {"qwen2_5_vl": (QWEN2_ADDED, 131072), "qwen3_vl": (QWEN3_ADDED, 262144)}


def corpus() -> list[str]:
    """The shapes corpus, with Qwen's chat turns instead of LLaVA's."""
    from symmpo_fast.assets.build_tokenizer import corpus as llava_corpus

    lines = []
    for line in llava_corpus():
        if line.startswith("USER: <image>\n"):
            question, answer = line[len("USER: <image>\n"):].removesuffix("</s>").split(" ASSISTANT: ")
            lines += ["system\nYou are a helpful assistant.", f"user\n{question}", f"assistant\n{answer}"]
        else:
            lines.append(line)
    return lines


def _bpe():
    os.environ["RAYON_NUM_THREADS"] = "1"  # BPE merges tie-break by order of discovery: keep it fixed
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def build() -> None:
    from tokenizers import AddedToken, Tokenizer

    bpe = _bpe().to_str()
    for family, (added, max_length) in FAMILIES.items():
        tok = Tokenizer.from_str(bpe)
        for token, special in added:
            (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(token, special=special,
                                                                                normalized=False)])
        out = HERE / family
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "add_prefix_space": False,
            "additional_special_tokens": [t for t, special in added[1:] if special],
            "model_max_length": max_length, "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    build()
