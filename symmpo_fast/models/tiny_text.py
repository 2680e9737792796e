"""Tiny random-init text LMs for tests and benchmarks: no download, built from configs.

Three families with their own conventions, each with a shipped byte-level BPE given that family's
special tokens, BOS rule and chat template (``assets/build_tokenizer.py``'s; for Qwen2 the tiny
Qwen tokenizer of ``assets/build_qwen_tokenizer.py``):

=================  ============================  ===================================================
name               architecture                  what it exercises
=================  ============================  ===================================================
``tiny-llama``     ``LlamaForCausalLM``          Llama 3's template (``<|start_header_id|>``,
                                                 ``<|eot_id|>``), BOS in the template and on encode
``tiny-qwen2``     ``Qwen2ForCausalLM``          ChatML with Qwen2.5's default system turn, no BOS,
                                                 q/k/v biases, tied input/output embeddings
``tiny-gemma2``    ``Gemma2ForCausalLM``         Gemma's ``<start_of_turn>`` template, the final
                                                 logit soft-capping (the fused head's ``softcap``)
=================  ============================  ===================================================

The templates are those of ``meta-llama/Meta-Llama-3-8B-Instruct``, ``Qwen/Qwen2.5-*-Instruct``
(without its tool-calling branches) and ``google/gemma-2-*-it``.

    model, tokenizer = build_tiny_text("tiny-qwen2", seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tiny import TOKENIZER_DIR

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclass(frozen=True)
class _Family:
    specials: tuple[str, ...]  # added to the shipped vocabulary
    bos: str | None  # prepended on encode (None: no BOS)
    eos: str
    pad: str
    template: str


FAMILIES = {
    "tiny-llama": _Family(("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                          "<|begin_of_text|>", "<|eot_id|>", "<pad>", LLAMA3_TEMPLATE),
    "tiny-qwen2": _Family((), None, "<|im_end|>", "<|endoftext|>", QWEN2_TEMPLATE),  # the shipped Qwen tokenizer
    "tiny-gemma2": _Family(("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", "<pad>",
                           GEMMA2_TEMPLATE),
}


def build_tiny_tokenizer(name: str):
    """The shipped BPE with family ``name``'s special tokens, BOS rule and chat template.

    ``tiny-qwen2``'s is the shipped tiny Qwen tokenizer (``assets/qwen2_5_vl``: a transformers
    ``Qwen2Tokenizer`` with Qwen's pre-tokenizer and special tokens) with the text template:
    transformers loads any tokenizer saved beside a Qwen2 config as that class, so a tiny model
    that saves and loads back must use it.
    """
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fam = FAMILIES[name]
    if name == "tiny-qwen2":
        from .qwen2_5_vl import ASSETS

        tok = AutoTokenizer.from_pretrained(str(ASSETS / "qwen2_5_vl"))
        tok.chat_template = fam.template
        return tok
    backend = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    backend.add_special_tokens(list(fam.specials))
    if fam.bos is None:
        backend.post_processor = None
    else:
        bos_id = backend.token_to_id(fam.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=fam.bos, eos_token=fam.eos,
                                   pad_token=fam.pad, unk_token="<unk>", chat_template=fam.template,
                                   padding_side="right", clean_up_tokenization_spaces=False)


def tiny_text_config(name: str, tokenizer, hidden_size: int = 64, num_hidden_layers: int = 2):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if name == "tiny-llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if name == "tiny-qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    # Gemma 2: soft-capped final logits; attention soft-capping off (SDPA does not apply it).
    return Gemma2Config(**common, head_dim=hidden_size // 4, final_logit_softcapping=30.0,
                        attn_logit_softcapping=None, query_pre_attn_scalar=hidden_size // 4, sliding_window=4096,
                        tie_word_embeddings=True)


def build_tiny_text(name: str = "tiny-llama", seed: int = 0, attn_implementation: str | None = None,
                    dtype: torch.dtype = torch.float32, **sizes):
    """``(model, tokenizer)``: a random-init text LM of family ``name`` (see the module docstring).
    The weights depend on ``seed`` only: the global RNG is left as it was.  ``attn_implementation``
    defaults to SDPA, eager for Gemma 2 (transformers gives it no SDPA path)."""
    from transformers import AutoModelForCausalLM

    from .base import prepare

    if name not in FAMILIES:
        raise ValueError(f"unknown tiny text model {name!r}; expected one of {sorted(FAMILIES)}")
    tokenizer = build_tiny_tokenizer(name)
    config = tiny_text_config(name, tokenizer, **sizes)
    if attn_implementation is None:
        attn_implementation = "eager" if name == "tiny-gemma2" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return prepare(model), tokenizer
