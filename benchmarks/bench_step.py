"""Scenarios (b), (c), (d): a whole SymMPO training step on a LLaVA-shaped or Qwen2.5-VL-shaped model.

One step is: policy forward + backward of a batch of records, optimizer step, gradients freed;
the reference log-probs come from a cache (``ref cached``) or from a no-grad reference pass in
the step (``ref online``: the base model with LoRA adapters disabled, or for full fine-tuning
the policy's own weights under ``no_grad``, which costs what a frozen copy would).

Layouts, in the same process on the same model and batch:

* ``official``: ``packing="none"``: 5 padded rows per record, each image re-encoded per row,
  full logits -> log_softmax -> gather (:func:`symmpo_fast.models.forward_preference`), as the
  official SymMPO code does.  On CUDA it runs with SDPA attention (FlashAttention-2 where
  ``flash_attn`` is installed), the fastest the official code would use.
* ``symmpo-fast[backend]``: shared-prefix packing (each image once, each (image, question) prefix
  once) + the fused preference loss on the response positions only.
* ``symmpo-fast[backend] unfused``: shared prefix + ``token_logps`` -> sums -> ``preference_loss``.
* ``symmpo-fast[backend] padded``: no packing (the official rows, images re-encoded), the fused
  loss on the response positions' hidden states: what the head alone gains.

Batches are synthetic :class:`symmpo_fast.data.PreferenceBatch` objects with exact token counts
(``image`` placeholder tokens, a ``question``, three distinct responses of ``response`` tokens),
built directly so a point's lengths are what its name says.  A Qwen2.5-VL case's batch carries
each image as its flat patches with their grid (M-RoPE positions, window-attention vision tower,
one vision pass per distinct image), and its model takes the tree mask with SDPA on CUDA too
(transformers enables no FlexAttention for Qwen-VL).  ``symmpo-fast bench --cases SUBSTRING``
runs only the cases whose label contains it, e.g. ``--scenario step --preset gpu --cases
qwen2.5-vl`` the Qwen2.5-VL-7B-shaped LoRA step alone.

Rates: ``records_per_s``; ``tokens_per_s`` counts the tokens actually needed (the shared-prefix
layout's: each prefix once, every response) for every layout, so its ratio is the speed ratio;
``mfu`` (CUDA) counts the useful FLOPs on those tokens, 2 * params per token per matrix pass
(forward; backward to the activations; to the weights when trained), attention excluded,
recomputation (gradient checkpointing) excluded, against the device's dense bf16 peak.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time
from dataclasses import dataclass

import torch

import symmpo_fast as sf
from symmpo_fast.bench import MiB, Run, Timing, free_memory, is_oom, peak_extra_bytes, synchronize
from symmpo_fast.objectives import NUM_ROLES, ObjectiveConfig

DATASHEET_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12}


# ----------------------------------------------------------------------------------------------
# model shapes


# LLaVA-1.5: CLIP ViT-L/14 at 336 px (576 image tokens), 2-layer GELU projector, Vicuna (Llama).
CLIP_L336 = dict(image_size=336, patch_size=14, vision_hidden_size=1024, vision_intermediate_size=4096,
                 vision_layers=24, vision_heads=16)
LLAVA_7B = dict(CLIP_L336, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32)
LLAVA_13B = dict(CLIP_L336, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40)
LLAVA_VOCAB = 32064
# The CPU acceptance model of issue 5: hidden 512, 4 layers, vocabulary 32000, 64 image tokens.
SMALL = dict(image_size=64, patch_size=8, vision_hidden_size=256, vision_intermediate_size=1024, vision_layers=2,
             vision_heads=4, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8)
TINY = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2)

# Qwen2.5-VL-7B: a 32-block window-attention ViT (1280 wide, 14 px patches, full attention in
# blocks 7, 15, 23, 31), a 2x2 patch merger, a 28-layer Qwen2 language model with GQA 28:4 and
# M-RoPE sections 16/24/24; 672 px images give 48 x 48 patches, 576 placeholder tokens (as
# LLaVA-1.5's 336 px CLIP).  ``image_size`` is the square image side; the rest are
# :class:`symmpo_fast.models.tiny_qwen.TinyQwenVLSpec` fields.
QWEN25_VL_7B = dict(image_size=672, patch_size=14, merge_size=2, vision_hidden_size=1280,
                    vision_intermediate_size=3420, vision_depth=32, vision_heads=16, window_size=112,
                    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, mrope_section=(16, 24, 24), initializer_range=0.02)
QWEN25_VL_VOCAB = 152064
# The CPU case beside SMALL: the same width, depth, vocabulary and 64 image tokens, Qwen2.5-VL's
# proportions otherwise (MLP 5.3x wide, GQA 4:1, vision MLP 2.7x, an attention window of 4 x 4
# merged tokens, full attention in the last vision block).
QWEN25_VL_SMALL = dict(image_size=128, patch_size=8, merge_size=2, vision_hidden_size=256, vision_intermediate_size=684,
                       vision_depth=2, vision_heads=4, window_size=64, hidden_size=512, intermediate_size=2688,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12),
                       initializer_range=0.02)
QWEN25_VL_TINY = dict(image_size=32, patch_size=4, merge_size=2, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2)
# Text DPO (a LlamaForCausalLM): the CPU case is SMALL's language model; the GPU one Llama-3-8B.
TEXT_SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, rope_theta=500000.0)
LLAMA3_VOCAB = 128256
TEXT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)


@dataclass(frozen=True)
class StepCase:
    name: str
    spec: tuple  # TinyLlavaSpec overrides, as sorted items (hashable)
    vocab: int
    records: int
    question: int
    response: int
    train: str = "full"
    """``full`` (language model, projector and head trained; vision tower frozen) or ``lora``."""
    dtype: str = "float32"
    grad_ckpt: bool = False
    optimizer: str = "adamw"
    """``adamw``, or ``sgd`` (no optimizer state) where AdamW's state would not fit beside the model."""
    accept: bool = False
    ref_online: bool = True
    """Also time the variants with the reference pass inside the step."""
    all_variants: bool = True
    """Also the other backends and the unfused head (else: the official layout and ours, auto)."""
    family: str = "llava"
    """``llava`` (``spec``: TinyLlavaSpec overrides), ``qwen2_5_vl`` (TinyQwenVLSpec overrides +
    ``image_size``) or ``causal_lm`` (LlamaConfig fields: a text model trained with DPO, whose
    ``question`` is the prompt's length and whose records have two responses)."""

    @property
    def text(self) -> bool:
        return self.family == "causal_lm"

    @property
    def image_tokens(self) -> int:
        if self.text:
            return 0
        s = dict(self.spec)
        return (s["image_size"] // s["patch_size"] // s.get("merge_size", 1)) ** 2

    @property
    def objective(self) -> ObjectiveConfig:
        return ObjectiveConfig.dpo() if self.text else ObjectiveConfig.symmpo()

    def label(self) -> str:
        image = "" if self.text else f" img{self.image_tokens}"
        return f"{self.name} {self.train}{image} q{self.question} r{self.response} x{self.records}"


def _case(name, spec, vocab, records, question, response, **kw) -> StepCase:
    return StepCase(name, tuple(sorted(spec.items())), vocab, records, question, response, **kw)


def step_grid(preset: str) -> list[StepCase]:
    if preset == "smoke":
        return [_case("tiny", TINY, 1000, 2, 8, 6, ref_online=False),
                _case("qwen2.5-vl-tiny", QWEN25_VL_TINY, 1024, 2, 8, 6, ref_online=False, family="qwen2_5_vl"),
                _case("text-dpo-tiny", TEXT_TINY, 1024, 2, 16, 6, ref_online=False, family="causal_lm")]
    if preset == "cpu":
        return [_case("small", SMALL, 32000, 4, 32, 48, accept=True),
                _case("qwen2.5-vl-small", QWEN25_VL_SMALL, 32000, 4, 32, 48, ref_online=False, family="qwen2_5_vl"),
                _case("text-dpo-small", TEXT_SMALL, 32000, 4, 256, 64, ref_online=False, family="causal_lm")]
    if preset == "gpu":
        # Gradient checkpointing on: without it the official layout's activations for 4 records
        # (20 rows of ~700 tokens) do not fit beside a 7B model.  Full fine-tuning uses SGD (no
        # optimizer state) so that weights + gradients fit on one 80 GB card.
        bf = dict(dtype="bfloat16", grad_ckpt=True)
        short = dict(bf, ref_online=False, all_variants=False)
        return [
            _case("llava-1.5-7b", LLAVA_7B, LLAVA_VOCAB, 4, 32, 96, train="lora", **bf),
            _case("llava-1.5-7b", LLAVA_7B, LLAVA_VOCAB, 4, 32, 96, train="full", optimizer="sgd", **short),
            _case("llava-1.5-13b", LLAVA_13B, LLAVA_VOCAB, 4, 32, 96, train="lora", **short),
            _case("llava-1.5-13b", LLAVA_13B, LLAVA_VOCAB, 2, 32, 96, train="full", optimizer="sgd", **short),
            # Last, so the LLaVA grid keeps its budget; `--cases qwen2.5-vl` runs it alone.
            _case("qwen2.5-vl-7b", QWEN25_VL_7B, QWEN25_VL_VOCAB, 4, 32, 96, train="lora", family="qwen2_5_vl",
                  **short),
            _case("llama-3-8b-dpo", LLAMA3_8B, LLAMA3_VOCAB, 8, 512, 128, train="lora", family="causal_lm", **short),
        ]
    raise ValueError(f"unknown preset {preset!r}")


def lengths_grid(preset: str) -> tuple[dict, int, list[tuple[int, int]], dict]:
    """(model spec, vocab, [(question tokens, response tokens)], case options) of scenario (c)."""
    if preset == "smoke":
        return TINY, 1000, [(8, 4), (24, 4)], dict(records=2)
    if preset == "cpu":
        pts = [(q, r) for q in (32, 160, 416) for r in (16, 64)]
        return SMALL, 32000, pts, dict(records=2)
    if preset == "gpu":
        # 7B-shaped but 8 of its 32 layers (the ratio hardly depends on depth), LoRA, bf16.
        spec = dict(LLAVA_7B, num_hidden_layers=8)
        pts = [(q, r) for q in (32, 512, 1440) for r in (64, 512)]
        return spec, LLAVA_VOCAB, pts, dict(records=2, train="lora", dtype="bfloat16", grad_ckpt=True)
    raise ValueError(f"unknown preset {preset!r}")


# ----------------------------------------------------------------------------------------------
# model and batch


def _llava(case: StepCase, attn: str):
    """(model class, config, tokenizer) of a LLaVA case."""
    from transformers import LlavaForConditionalGeneration

    from symmpo_fast.models.tiny import TinyLlavaSpec, load_processor, tiny_llava_config

    spec = TinyLlavaSpec(**dict(case.spec), attn_implementation=attn, dtype=getattr(torch, case.dtype))
    tok = load_processor(spec.image_size, spec.patch_size).tokenizer
    return LlavaForConditionalGeneration, tiny_llava_config(spec, tok), tok


def _qwen2_5_vl(case: StepCase, attn: str):
    """(model class, config, tokenizer) of a Qwen2.5-VL case."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from symmpo_fast.models.qwen2_5_vl import ASSETS
    from symmpo_fast.models.tiny_qwen import TinyQwenVLSpec, tiny_qwen2_5_vl_config

    fields = {k: v for k, v in case.spec if k != "image_size"}
    spec = TinyQwenVLSpec(**fields, attn_implementation=attn, dtype=getattr(torch, case.dtype))
    tok = AutoTokenizer.from_pretrained(str(ASSETS / "qwen2_5_vl"))
    return Qwen2_5_VLForConditionalGeneration, tiny_qwen2_5_vl_config(spec, tok), tok


def _causal_lm(case: StepCase, attn: str):
    """(model class, config, tokenizer) of a text case: a Llama with the tiny Llama-3 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from symmpo_fast.models.tiny_text import build_tiny_tokenizer

    tok = build_tiny_tokenizer("tiny-llama")
    config = LlamaConfig(**dict(case.spec), vocab_size=case.vocab, max_position_embeddings=8192,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    return LlamaForCausalLM, config, tok


def build_model(case: StepCase, device: torch.device, attn: str):
    """A random-init model of ``case``'s family and shape with a ``case.vocab``-entry head, on ``device``."""
    from symmpo_fast.models.base import attn_implementations, prepare

    cls, config, tok = {"llava": _llava, "qwen2_5_vl": _qwen2_5_vl, "causal_lm": _causal_lm}[case.family](case, attn)
    # The shipped tokenizers have about 1000 entries; the head is sized to the case's vocabulary
    # (the synthetic batches draw ids from all of it).
    getattr(config, "text_config", config).vocab_size = case.vocab
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation=attn if case.text else attn_implementations(attn),
                                 dtype=getattr(torch, case.dtype))
    model = prepare(model)
    adapter = sf.models.adapter_for(model)
    if adapter.vision_tower is not None:
        adapter.vision_tower.requires_grad_(False)
    if case.train == "full" and case.family == "qwen2_5_vl":  # the merger lives inside Qwen's vision tower
        for module in adapter.projector():
            module.requires_grad_(True)
    if case.train == "lora":
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.0, target_modules=(
            adapter.lora_target_regex(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))))
    if case.grad_ckpt:
        # transformers >= 5.2x renamed it; the GPU machine's 5.17 may have only the old name.
        base = sf.models.unwrap(model)
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, tok


def _text_batch(case: StepCase, tok, g: torch.Generator, question: int, response: int):
    """A DPO batch of a text case: a prompt of ``question`` tokens (BOS first), y_w and y_l of
    ``response`` tokens (EOS last)."""
    from symmpo_fast.data import COLUMNS, PreferenceBatch

    lo = max(set(tok.all_special_ids) | set(tok.added_tokens_decoder)) + 1
    prompts, responses = [], []
    for _ in range(case.records):
        prompt = torch.cat([torch.tensor([tok.bos_token_id]), torch.randint(lo, case.vocab, (question - 1,), generator=g)])
        pair = [torch.cat([torch.randint(lo, case.vocab, (response - 1,), generator=g), torch.tensor([tok.eos_token_id])])
                for _ in range(2)]
        prompts.append([prompt, prompt, None, None, None])
        responses.append(pair + [None, None, None])
    return PreferenceBatch(objective="dpo", columns=COLUMNS["dpo"], prompt_ids=prompts, response_ids=responses,
                           image_index=[[-1] * NUM_ROLES for _ in range(case.records)], pixel_values=torch.zeros(0),
                           image_token_id=None, pad_token_id=tok.pad_token_id,
                           record_keys=[f"synthetic-text-{b}" for b in range(case.records)])


def synthetic_batch(case: StepCase, tok, seed: int = 0, question: int | None = None, response: int | None = None):
    """A SymMPO :class:`~symmpo_fast.data.PreferenceBatch` with exact token counts (text cases:
    DPO, :func:`_text_batch`).

    Prompt: BOS, 2 template tokens, the image placeholders, ``question`` tokens, 2 template
    tokens; responses (y_w, y_l, y_w') of ``response`` tokens, the last one EOS.
    """
    from symmpo_fast.data import COLUMNS, ROLE_IMAGE, ROLE_TEXT, PreferenceBatch

    question = case.question if question is None else question
    response = case.response if response is None else response
    g = torch.Generator().manual_seed(seed)
    if case.text:
        return _text_batch(case, tok, g, question, response)
    qwen = case.family == "qwen2_5_vl"
    img_id = tok.convert_tokens_to_ids("<|image_pad|>" if qwen else "<image>")
    specials = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    lo = max(specials) + 1
    ids = lambda n: torch.randint(lo, case.vocab, (n,), generator=g)  # noqa: E731
    s = dict(case.spec)
    grid = extra = None
    if qwen:  # flat patches (3 channels x 2 frames x p x p each), one square grid per image
        side = s["image_size"] // s["patch_size"]
        pixels = torch.randn(2 * case.records * side * side, 3 * 2 * s["patch_size"] ** 2, generator=g)
        grid = torch.tensor([[1, side, side]] * 2 * case.records)
        extra = dict(image_grid_thw=grid, spatial_merge_size=s["merge_size"])
        # <|im_start|> and <|vision_start|> ... <|vision_end|> around the placeholders
        around = [torch.tensor([tok.convert_tokens_to_ids("<|im_start|>")]),
                  torch.tensor([tok.convert_tokens_to_ids("<|vision_start|>")]),
                  torch.tensor([tok.convert_tokens_to_ids("<|vision_end|>")])]
    else:
        pixels = torch.randn(2 * case.records, 3, s["image_size"], s["image_size"], generator=g)
        none = torch.tensor([], dtype=torch.long)
        around = [torch.tensor([tok.bos_token_id]), none, none]
    prompts, responses, images = [], [], []
    for b in range(case.records):
        head, tail, q = ids(2), ids(2), ids(question)
        prompt = {i: torch.cat([around[0], head, around[1], torch.full((case.image_tokens,), img_id), around[2], q,
                                tail]) for i in (2 * b, 2 * b + 1)}
        answers = {name: torch.cat([ids(response - 1), torch.tensor([tok.eos_token_id])])
                   for name in ("chosen", "rejected", "contrast_chosen")}
        img = [2 * b if ROLE_IMAGE["symmpo"][k] == "image" else 2 * b + 1 for k in range(NUM_ROLES)]
        prompts.append([prompt[img[k]] for k in range(NUM_ROLES)])
        responses.append([answers[ROLE_TEXT[k]] for k in range(NUM_ROLES)])
        images.append(img)
    return PreferenceBatch(objective="symmpo", columns=COLUMNS["symmpo"], prompt_ids=prompts,
                           response_ids=responses, image_index=images, pixel_values=pixels,
                           image_token_id=img_id, pad_token_id=tok.pad_token_id,
                           record_keys=[f"synthetic-{seed}-{b}" for b in range(case.records)], **(extra or {}))


def needed_tokens(batch) -> tuple[int, int, int]:
    """(tokens the shared-prefix layout feeds, response labels, tokens the official layout feeds)."""
    from symmpo_fast import packing

    rows = packing.pack(batch)
    u = packing.unpack(batch)
    return rows.num_tokens, int(rows.labels.numel()), int(u.input_ids.numel())


def useful_flops(model, case: StepCase, batch) -> float:
    """FLOPs of one step counted on the needed tokens (see the module docstring)."""
    base = sf.models.unwrap(model)
    adapter = sf.models.adapter_for(base)
    lm = adapter.language_model
    p_layers = sum(p.numel() for n, p in lm.named_parameters() if ".layers." in f".{n}" and "lora_" not in n)
    if case.text:
        p_vision = p_proj = vis_tokens = 0
    elif case.family == "llava":
        p_vision = sum(p.numel() for p in base.model.vision_tower.parameters())
        p_proj = sum(p.numel() for p in base.model.multi_modal_projector.parameters())
        vis_tokens = case.image_tokens + 1  # CLIP's CLS token
    else:  # the merger is part of the tower; the tower runs on the patches, 4 per merged token
        p_proj = sum(p.numel() for m in adapter.projector() for p in m.parameters())
        p_vision = sum(p.numel() for p in adapter.vision_tower.parameters()) - p_proj
        vis_tokens = case.image_tokens * dict(case.spec)["merge_size"] ** 2
    T, R, _ = needed_tokens(batch)
    text_config = getattr(base.config, "text_config", base.config)
    D, V = text_config.hidden_size, text_config.vocab_size
    full = case.train == "full"
    passes = 3 if full else 2  # forward, backward to activations, backward to weights (full only)
    images = batch.num_images
    return (2 * p_layers * T * passes + 2 * D * V * R * passes + 2 * p_vision * vis_tokens * images
            + 2 * p_proj * case.image_tokens * images * passes)


def peak_flops(run: Run) -> tuple[float, str]:
    name = run.env["device"]
    for key, v in DATASHEET_BF16.items():
        if key in name:
            return v, f"{v / 1e12:.0f} TFLOP/s datasheet dense bf16"
    a = torch.randn(8192, 8192, device=run.device, dtype=torch.bfloat16)
    t = _loop_time(lambda: a @ a, run, reps=5)
    v = 2 * 8192**3 / (t.median * 1e-3)
    return v, f"{v / 1e12:.0f} TFLOP/s measured 8192^3 bf16 matmul"


# ----------------------------------------------------------------------------------------------
# the step


def _set_attn(model, impl: str) -> str:
    """Switch the language model's attention implementation; returns the one in use after."""
    from symmpo_fast.models.base import attn_implementations

    base = sf.models.unwrap(model)
    text_config = getattr(base.config, "text_config", base.config)
    if text_config._attn_implementation != impl:
        try:
            base.set_attn_implementation(impl if text_config is base.config else attn_implementations(impl))
        except Exception as e:  # noqa: BLE001 - older transformers: keep the built one, say so in the row
            print(f"  (could not switch attention to {impl}: {e.__class__.__name__}: {e})")
    return text_config._attn_implementation


def _official_attn(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@dataclass(frozen=True)
class Variant:
    name: str
    packing: str
    backend: str = "auto"
    fused: bool = True
    ref_online: bool = False
    naive: bool = False


def variants(case: StepCase, device: torch.device) -> list[Variant]:
    auto = sf.registry.resolve("auto", device)
    out = [Variant("official", "none", naive=True), Variant(f"symmpo-fast[{auto}] auto", "shared_prefix", auto)]
    if case.all_variants:
        table = sf.backends()
        for b in ("triton", "csrc", "torch"):
            a = table[b]
            if b != auto and (a.cuda if device.type == "cuda" else (a.cpu and b != "triton")):
                out.append(Variant(f"symmpo-fast[{b}]", "shared_prefix", b))
        out.append(Variant(f"symmpo-fast[{auto}] unfused", "shared_prefix", auto, fused=False))
        # Without shared-prefix packing: the official rows, our fused head (the head's share alone).
        out.append(Variant(f"symmpo-fast[{auto}] padded", "padded", auto))
    if case.ref_online:
        out += [Variant("official, ref online", "none", ref_online=True),
                Variant(f"symmpo-fast[{auto}] auto, ref online", "shared_prefix", auto, ref_online=True)]
    return out


def make_step(model, opt, batch, cfg: ObjectiveConfig, ref_cached: torch.Tensor, v: Variant, lora: bool):
    models = sf.models

    def step():
        if v.ref_online:
            ref = models.reference_logps(model, batch, v.packing, v.backend, disable_adapter=lora)
        else:
            ref = ref_cached
        if v.fused or v.packing == "none":
            loss, _ = models.forward_preference(model, batch, cfg, ref, packing=v.packing, backend=v.backend)
        else:
            policy = models.sequence_logps(model, batch, v.packing, v.backend)
            loss, _ = sf.preference_loss(policy, ref, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _loop_time(fn, run: Run, reps: int | None = None, warmup: int = 1) -> Timing:
    """Wall time of whole steps: ``warmup`` untimed calls, then ``reps`` timed ones (synchronized)."""
    from symmpo_fast.bench import _quartiles

    reps = reps or run.reps
    for _ in range(warmup):
        fn()
    synchronize(run.device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(run.device)
        samples.append((time.perf_counter() - t0) * 1e3)
    q1, q3 = _quartiles(samples)
    return Timing(statistics.median(samples), q1, q3, min(samples), max(samples), reps)


def _optimizer(model, case: StepCase):
    # lr 0: the optimizer does all its work but the weights stay put, so every variant of a case
    # sees the same model and their losses can be compared.
    params = [p for p in model.parameters() if p.requires_grad]
    if case.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.0)
    return torch.optim.AdamW(params, lr=0.0, foreach=True)


def run_model_case(run: Run, case: StepCase, scenario: str, points: list[tuple[int, int]] | None = None) -> None:
    """Time every variant of ``case`` (scenario b/d) or, for (c), official vs ours at each length point."""
    device = run.device
    # transformers enables FlexAttention for LLaVA's and text Llamas, not for Qwen-VL: SDPA takes its tree mask.
    attn = "flex_attention" if device.type == "cuda" and case.family in ("llava", "causal_lm") else "sdpa"
    base = dict(scenario=scenario, dtype={"float32": "fp32", "bfloat16": "bf16"}[case.dtype], records=case.records)
    try:
        model, tok = build_model(case, device, attn)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        free_memory(device)
        run.add(**base, case=case.label(), method="*", status="n/a: OOM building the model")
        return
    opt = _optimizer(model, case)
    cfg = case.objective
    lora = case.train == "lora"
    base_config = sf.models.unwrap(model).config
    D = getattr(base_config, "text_config", base_config).hidden_size
    peak, peak_note = peak_flops(run) if device.type == "cuda" else (0.0, "")
    pts = points or [(case.question, case.response)]
    try:
        for q, r in pts:
            c = dataclasses.replace(case, question=q, response=r)
            batch = synthetic_batch(c, tok).to(device)
            T, R, fed_official = needed_tokens(batch)
            flops = useful_flops(model, c, batch)
            with torch.no_grad():
                _set_attn(model, _official_attn(device))
                ref_cached = sf.models.reference_logps(model, batch, "none", disable_adapter=lora)
                official_loss = float(sf.models.forward_preference(model, batch, cfg, ref_cached, packing="none")[0])
            vs = variants(c, device) if scenario == "step" else [v for v in variants(c, device)
                                                                 if v.naive or v.name.endswith(" auto")]
            naive_rows: dict[bool, dict] = {}  # the official layout's row, ref cached / online
            for v in vs:
                if not (v.naive or v.packing == "none" or run.wants(v.name)):
                    continue
                row = _measure_variant(run, c, model, opt, batch, cfg, ref_cached, v, lora, attn, base, T, R,
                                       fed_official, flops, peak, peak_note, D, official_loss,
                                       naive_rows.get(v.ref_online))
                if v.packing == "none":
                    naive_rows[v.ref_online] = row
            del batch, ref_cached
            free_memory(device)
    finally:
        del model, opt
        free_memory(device)


def _measure_variant(run, c, model, opt, batch, cfg, ref_cached, v, lora, attn, base, T, R, fed_official, flops,
                     peak, peak_note, D, official_loss, naive_row):
    scenario = base["scenario"]
    device = run.device
    rows_layout = v.packing in ("none", "padded")  # one padded row per sequence: any attention
    fed = fed_official if rows_layout else T
    impl = _set_attn(model, _official_attn(device) if rows_layout else attn)
    extra = (f"prefix={len(batch.prompt_ids[0][0])} response={c.response} needed_tokens={T} fed_tokens={fed} "
             f"labels={R} train={c.train} opt={c.optimizer} grad_ckpt={int(c.grad_ckpt)} "
             f"ref={'online' if v.ref_online else 'cached'} attn={impl}")
    row = dict(base, case=c.label(), method=v.name, N=T, D=D, V=c.vocab, extra=extra, **{"pass": "train step"})
    if run.time_left() <= 0:
        return run.add(**row, status="skipped: time budget")
    step = make_step(model, opt, batch, cfg, ref_cached, v, lora)
    try:
        with torch.no_grad():
            if v.packing == "none" and not v.ref_online:
                err = 0.0
            else:
                loss = float(sf.models.forward_preference(model, batch, cfg, ref_cached, packing=v.packing,
                                                          backend=v.backend)[0])
                err = abs(loss - official_loss) / max(abs(official_loss), 1e-30)
        t = _loop_time(step, run, reps=min(run.reps, 2) if scenario == "lengths" else None)
        mem = peak_extra_bytes(step, device)
        abs_peak = torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else None
    except Exception as e:  # noqa: BLE001
        opt.zero_grad(set_to_none=True)
        if is_oom(e):
            free_memory(device)
            return run.add(**row, status="n/a: OOM")
        return run.add(**row, status=f"error: {e.__class__.__name__}: {str(e)[:160]}")
    finally:
        free_memory(device)
    sec = t.median * 1e-3
    if abs_peak is not None:
        row["extra"] += f" abs_peak_mib={abs_peak:.0f}"
    if peak:
        row["extra"] += f" mfu_peak={peak_note!r}"
    ratios = run.vs_naive(naive_row, t.median, mem / MiB, v.packing == "none")
    if v.packing != "none" and ratios:
        row["extra"] += f" speedup={1 / ratios['time_vs_naive']:.3g}"
    out = run.add(**row, reps=t.reps, time_ms=t.median, time_ms_q1=t.q1, time_ms_q3=t.q3, time_ms_min=t.lo,
                  time_ms_max=t.hi, peak_mib=mem / MiB, flops=flops, flop_formula="useful on needed tokens",
                  tflops_useful=flops / sec / 1e12, records_per_s=c.records / sec, tokens_per_s=T / sec,
                  mfu=100 * flops / sec / peak if peak else None, rel_err=err, status="ok", **ratios)
    print(f"  {c.label():44s} {v.name:36s} {t.median:9.1f} ms {c.records / sec:7.2f} rec/s {mem / MiB:9.1f} MiB"
          f"  loss rel diff {err:.1e}", flush=True)
    return out


def run_step(run: Run, preset: str) -> None:
    for case in step_grid(preset):
        if not run.wants_case(case.label()):
            continue
        if run.time_left() <= 0:
            run.add(scenario="step", case=case.label(), method="*", status="skipped: time budget")
            continue
        run_model_case(run, case, "step")
        if case.accept:
            step_checks(run, case)


def step_checks(run: Run, case: StepCase) -> None:
    """Issue 5's CPU acceptance: ours >= 1.6x the official records/s at <= 0.5x its peak memory."""
    rows = [r for r in run.rows if r["scenario"] == "step" and r["case"] == case.label() and r["status"] == "ok"
            and "ref=cached" in r["extra"]]
    off = next((r for r in rows if r["method"] == "official"), None)
    ours = next((r for r in rows if r["method"].endswith(" auto")), None)
    if not (off and ours):
        return
    where = f"{case.label()} ({ours['method']} vs official, ref cached)"
    run.check("whole step records/s vs official", float(ours["records_per_s"]) / float(off["records_per_s"]), 1.6,
              ">=", where)
    run.check("whole step peak extra memory / official", float(ours["peak_mib"]) / float(off["peak_mib"]), 0.5, "<=",
              where)


def run_lengths(run: Run, preset: str) -> None:
    spec, vocab, pts, opts = lengths_grid(preset)
    case = _case("llava-shaped", spec, vocab, opts.pop("records"), pts[0][0], pts[0][1], ref_online=False, **opts)
    if run.time_left() <= 0:
        run.add(scenario="lengths", case=case.label(), method="*", status="skipped: time budget")
        return
    run_model_case(run, case, "lengths", pts)
