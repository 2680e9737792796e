"""A Llama-2-style tokenizer built offline: a SentencePiece BPE model (byte fallback, split digits,
as Llama's ``tokenizer.model``) trained on a few hundred sentences, loaded as transformers'
``LlamaTokenizer`` with the ``legacy`` flag of choice, ``<image>`` and ``<pad>`` added as
llava-hf adds them; and a ``LlavaProcessor`` around it."""

from __future__ import annotations

import io
import json
from pathlib import Path

from vlm_records import WORDS

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def _corpus():
    words = list(WORDS)
    lines = [SYSTEM, "USER: ASSISTANT: What is the colour of the shape? How many are there? Yes, no."]
    for i in range(300):
        sentence = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(4 + i % 9))
        lines.append(sentence.capitalize() + ("?" if i % 3 else "."))
    return lines


def build_llama_tokenizer(directory: Path, legacy: bool):
    """A ``LlamaTokenizer`` saved under ``directory`` (tokenizer.model + tokenizer_config.json)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=512, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "padding_side": "right"}))
    tok = AutoTokenizer.from_pretrained(str(directory))
    assert type(tok).__name__ == "LlamaTokenizer" and tok.legacy is legacy
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def build_llava_processor(directory: Path, legacy: bool, image_size: int = 32, patch_size: int = 8):
    from transformers import LlavaProcessor

    from symmpo_fast.models.llava import clip_image_processor_pil
    from symmpo_fast.models.tiny import TOKENIZER_DIR

    tok = build_llama_tokenizer(directory, legacy)
    image_processor = clip_image_processor_pil()(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=(TOKENIZER_DIR / "chat_template.jinja").read_text())
