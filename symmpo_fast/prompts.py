"""Prompt formats: how a question and its answers become the token ids a model trains on.

Each format turns ``(question, {name: answer})`` into one prompt (with a single image
placeholder where the image goes) and one response per answer, the response being exactly the
label sequence, end-of-turn included.  The prompt must be the same for every answer of a
record, since the shared-prefix layout encodes it once.

``llava_v1``: the official LLaVA-1.5 training input, which the official SymMPO code
(``muffin/train/train_utils.py``: ``preprocess_v1`` with the ``llava_v1`` conversation) and
the reference log-probs shipped with its data were computed on::

    {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>

The text before and after ``<image>`` is tokenized apart (LLaVA's ``tokenizer_image_token``:
each chunk on its own, the BOS of every chunk after the first dropped), so the ``▁`` that a
SentencePiece tokenizer puts at a text's start stays after the image whatever the tokenizer's
``legacy`` flag: tokenizing the whole text at once, a ``legacy: false`` Llama tokenizer under
transformers 5 drops it after the ``<image>`` special token.  The labels start where
``preprocess_v1`` starts them: at the token after the tokenization of ``... ASSISTANT: `` less
its last token (the space piece), and run to ``</s>``.

``chat_template``: the processor's own chat template (the system turn only when
``system_prompt`` is given), rendered and tokenized as one text, as ``processor(text=...)``
would; the answer is tokenized after the prompt's tail so that it gets the ids it has in
context.

:class:`AsWritten` (not a choice: records pick it): a prompt that is already a whole
conversation, as mDPO's JSON ships it ("... USER: <image>\\n{q} ASSISTANT:"), is used as
written, its chunks around ``<image>`` tokenized apart; each answer is tokenized on its own and
followed by EOS, as mDPO's collator does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROMPT_FORMATS = ("auto", "llava_v1", "chat_template")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_SENTINEL_Q = "\x00question\x00"
_SENTINEL_A = "\x00answer\x00"
# The end of a prompt that already holds the conversation up to the assistant's turn.
_GENERATION_PROMPT = re.compile(r"(?:\b(?:ASSISTANT|Assistant|assistant|GPT)\s*:|<\|im_start\|>assistant\n|\[/INST\])\s*$")


def is_conversation(prompt: str) -> bool:
    """Whether ``prompt`` already ends with an assistant turn's opening (mDPO's ``prompt`` field)."""
    return bool(_GENERATION_PROMPT.search(prompt))


@dataclass
class Encoded:
    """One record's ids: ``prompt`` holds one ``image_token_id`` where the image goes (expanded by
    the collator to the image's token count), ``responses[name]`` the labels of each answer."""

    prompt: list[int]
    responses: dict[str, list[int]]
    question_span: tuple[int, int]
    """Token span of the question inside ``prompt`` ((0, 0) when it cannot be cut)."""


class _Chunked:
    """LLaVA's ``tokenizer_image_token``: each chunk around the image token on its own."""

    def __init__(self, tokenizer, image_token: str, image_token_id: int):
        self.tokenizer, self.image_token, self.image_token_id = tokenizer, image_token, image_token_id

    def ids(self, text: str, span: tuple[int, int] | None = None) -> tuple[list[int], tuple[int, int]]:
        """The ids of ``text`` and the token span of the characters ``span`` (inside the last chunk)."""
        chunks = text.split(self.image_token)
        encs = [self.tokenizer(c, return_offsets_mapping=span is not None and i == len(chunks) - 1)
                for i, c in enumerate(chunks)]
        bos = self.tokenizer.bos_token_id
        offset = 1 if bos is not None and encs[0]["input_ids"][:1] == [bos] else 0
        ids: list[int] = []
        start = 0  # where the last chunk's kept tokens begin in ids
        for i, enc in enumerate(encs):
            if i:
                ids.append(self.image_token_id)
            start = len(ids)
            ids.extend(enc["input_ids"][offset if i else 0:])
        tokens = (0, 0)
        if span is not None:
            strip = offset if len(chunks) > 1 else 0
            base = len(text) - len(chunks[-1])
            inside = [start + j - strip for j, (s, e) in enumerate(encs[-1]["offset_mapping"])
                      if j >= strip and e > s and base + s >= span[0] and base + e <= span[1]]
            tokens = (inside[0], inside[-1] + 1) if inside else (0, 0)
        return ids, tokens


class LlavaV1:
    """The official LLaVA-1.5 (``llava_v1``) training input; see the module docstring."""

    name = "llava_v1"
    sep = " ASSISTANT: "

    def __init__(self, tokenizer, image_token: str, image_token_id: int, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system = LLAVA_V1_SYSTEM if system_prompt is None else system_prompt
        self.chunked = _Chunked(tokenizer, image_token, image_token_id)
        self.image_token = image_token
        self.eos = "</s>"  # the conversation's sep2: text, which the Llama tokenizer reads as its EOS
        if tokenizer.convert_tokens_to_ids(self.eos) != tokenizer.eos_token_id:
            raise ValueError(f"prompt_format=llava_v1 ends each answer with '</s>', which is not this tokenizer's "
                             f"EOS ({tokenizer.eos_token!r}); use prompt_format=chat_template")

    def text(self, question: str, answer: str | None = None) -> str:
        head = f"{self.system} USER: {self.image_token}\n{question}{self.sep}"
        return head if answer is None else head + answer + self.eos

    def encode(self, question: str, answers: dict[str, str]) -> Encoded:
        head = self.text(question)
        q0 = head.index(self.image_token) + len(self.image_token) + 1
        prompt_ids, span = self.chunked.ids(head, (q0, q0 + len(question)))
        # preprocess_v1: instruction_len = len(tokenizer_image_token(parts[0])) - 2, counted after
        # the BOS: the labels start one token before the end of the prompt's own tokenization.
        start = len(prompt_ids) - 1
        responses = {}
        for name, answer in answers.items():
            full, _ = self.chunked.ids(self.text(question, answer))
            if full[:start] != prompt_ids[:start]:
                raise ValueError(f"the {name!r} answer {answer[:40]!r} merges with the prompt's last tokens, so "
                                 "llava_v1 cannot give it the shared prompt")
            if full[-1] != self.tokenizer.eos_token_id:
                raise ValueError(f"the {name!r} answer {answer[:40]!r} does not end in the EOS token")
            responses[name] = full[start:]
        return Encoded(prompt_ids[:start], responses, (span[0], min(span[1], start)))


class ChatTemplate:
    """The processor's (or a text tokenizer's) own chat template; see the module docstring.

    The answer's labels are what the template puts after the generation prompt for the
    assistant's turn: the answer, then the template's end of turn (``</s>``, ``<|im_end|>\\n``,
    ...), as TRL takes a conversational completion; EOS is appended only where the template ends
    a turn with nothing.
    """

    name = "chat_template"

    def __init__(self, processor, image_token: str, image_token_id: int, system_prompt: str | None = None):
        self.processor, self.tokenizer = processor, processor.tokenizer
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("prompt_format=chat_template, but the processor has no chat template")
        self.image_token, self.image_token_id, self.system_prompt = image_token, image_token_id, system_prompt
        self._before, self._after, self._sep, self._end = self._pieces()
        # The answer is tokenized after the prompt's tail, so that tokenizers which treat a text's
        # start specially (SentencePiece's prefix space) give the ids the model sees in context.
        self._anchor = self.tokenizer(self._after, add_special_tokens=False)["input_ids"]

    def _messages(self, question: str, answer: str | None = None) -> list[dict]:
        msgs = []
        if self.system_prompt is not None:
            msgs.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return msgs

    def _pieces(self) -> tuple[str, str, str, str]:
        """(text before the question, text after it up to the generation prompt's end, separator
        between the generation prompt and the answer, the end of the assistant's turn), from
        rendering the template once."""
        render = self.processor.apply_chat_template
        prompt = render(self._messages(_SENTINEL_Q), add_generation_prompt=True, tokenize=False)
        full = render(self._messages(_SENTINEL_Q, _SENTINEL_A), add_generation_prompt=False, tokenize=False)
        before, _, after = prompt.partition(_SENTINEL_Q)
        if before.count(self.image_token) != 1 or self.image_token in after:
            raise ValueError(f"the chat template must place one {self.image_token!r} before the question; "
                             f"it renders {prompt!r}")
        if not full.startswith(prompt) or _SENTINEL_A not in full[len(prompt):]:
            raise ValueError("the chat template's assistant turn does not continue its generation prompt: "
                             f"{prompt!r} vs {full!r}")
        sep, _, end = full[len(prompt):].partition(_SENTINEL_A)
        return before, after, sep, end

    def encode(self, question: str, answers: dict[str, str]) -> Encoded:
        text = self._before + question + self._after
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        q0, q1 = len(self._before), len(self._before) + len(question)
        inside = [i for i, (s, e) in enumerate(offsets) if s >= q0 and e <= q1 and e > s]
        span = (inside[0], inside[-1] + 1) if inside else (0, 0)
        return Encoded(ids, {name: self.response(a) for name, a in answers.items()}, span)

    def response(self, answer: str) -> list[int]:
        tail = self._sep + answer + self._end
        ids = self.tokenizer(self._after + tail, add_special_tokens=False)["input_ids"]
        n = len(self._anchor)
        if ids[:n] == self._anchor:
            ids = ids[n:]
        else:  # the prompt's tail merged with the answer: tokenize the answer alone
            ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        return ids if self._end.strip() else ids + [self.tokenizer.eos_token_id]


class AsWritten:
    """A prompt that is already a conversation, used as written; see the module docstring."""

    name = "as_written"

    def __init__(self, tokenizer, image_token: str, image_token_id: int):
        self.tokenizer = tokenizer
        self.chunked = _Chunked(tokenizer, image_token, image_token_id)

    def encode(self, prompt: str, answers: dict[str, str]) -> Encoded:
        ids, _ = self.chunked.ids(prompt)
        eos = self.tokenizer.eos_token_id
        return Encoded(ids, {name: self.tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
                             for name, a in answers.items()}, (0, 0))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_at_common_prefix(prompt_ids: list[int], fulls: dict[str, list[int]]) -> Encoded:
    """TRL's rule (``DPOTrainer``'s tokenization): each completion starts where the tokenized
    prompt and the tokenized prompt + completion diverge, the same point for every answer."""
    n = min(_common_prefix(prompt_ids, full) for full in fulls.values())
    responses = {name: full[n:] for name, full in fulls.items()}
    empty = [name for name, r in responses.items() if not r]
    if empty:
        raise ValueError(f"the {empty[0]!r} answer adds no token to the prompt")
    return Encoded(prompt_ids[:n], responses, (0, 0))


class Conversation:
    """A text LM's chat template, tokenized as TRL's ``DPOTrainer`` does for conversational data:
    ``apply_chat_template(prompt, add_generation_prompt=True)`` for the prompt, the whole
    conversation for each answer (so the labels end with the template's end of turn), split at
    their common prefix.  A question becomes one user turn (after ``system_prompt``'s, if given);
    a list of messages is the prompt as it is."""

    name = "chat_template"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template, so a 'question' cannot be put in a conversation: "
                             "give the records a 'prompt' (a string used as written, or a list of messages)")
        self.tokenizer, self.system_prompt = tokenizer, system_prompt

    def _ids(self, messages: list[dict], generation: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                                 return_dict=True)
        return list(out["input_ids"])

    def encode(self, prompt: str | list[dict], answers: dict[str, str | list[dict]]) -> Encoded:
        if isinstance(prompt, str):
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
            prompt = system + [{"role": "user", "content": prompt}]
        turns = {name: a if isinstance(a, list) else [{"role": "assistant", "content": a}]
                 for name, a in answers.items()}
        return _split_at_common_prefix(self._ids(prompt, True),
                                       {name: self._ids(prompt + t, False) for name, t in turns.items()})


class Completion:
    """Plain text (no template), as TRL's ``DPOTrainer`` takes non-conversational data: the prompt as
    written, EOS appended to each answer that lacks it, ``tokenizer(prompt)`` and
    ``tokenizer(prompt + answer)`` split at their common prefix."""

    name = "as_written"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, prompt: str, answers: dict[str, str]) -> Encoded:
        eos = self.tokenizer.eos_token
        ids = {name: self.tokenizer(prompt + (a if a.endswith(eos) else a + eos))["input_ids"]
               for name, a in answers.items()}
        return _split_at_common_prefix(self.tokenizer(prompt)["input_ids"], ids)


def family_default(processor) -> str:
    """The prompt format ``auto`` stands for: the official input of the processor's family."""
    return "llava_v1" if type(processor).__name__ == "LlavaProcessor" else "chat_template"


def make_format(processor, name: str = "auto", system_prompt: str | None = None):
    """The :class:`LlavaV1` or :class:`ChatTemplate` that ``name`` (one of :data:`PROMPT_FORMATS`) picks."""
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {name!r}; expected one of {PROMPT_FORMATS}")
    if name == "auto":
        name = family_default(processor)
    image_token = processor.image_token
    image_token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    if name == "llava_v1":
        return LlavaV1(processor.tokenizer, image_token, image_token_id, system_prompt)
    return ChatTemplate(processor, image_token, image_token_id, system_prompt)
