"""Fidelity to the official code: what a LLaVA-1.5 SymMPO / mDPO run feeds the model, its settings
and its data, checked against the official constructions rebuilt here from their template
strings (Liuwq-bit/SymMPO ``muffin/train/train_utils.py``: ``tokenizer_image_token`` and
``preprocess_v1`` with ``conv_llava_v1``; luka-group/mDPO's collator), not against ourselves."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from llama_tokenizer import SYSTEM, build_llava_processor
from PIL import Image
from vlm_records import make_records

from symmpo_fast import formats
from symmpo_fast.data import PreferenceCollator, random_resized_crop
from symmpo_fast.models import build_tiny_llava, load_processor

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100


# ----------------------------------------------------------------------------------------------
# the official constructions, from their template strings


def official_ids(tokenizer, text: str, image_id: int) -> list[int]:
    """LLaVA's tokenizer_image_token: the chunks around <image> tokenized one by one, the BOS of
    each kept once, one image index between them."""
    chunks = [tokenizer(c).input_ids for c in text.split("<image>")]
    keep_bos = bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id
    out = [chunks[0][0]] if keep_bos else []
    pieces = []
    for c in chunks:
        pieces += [c, [image_id] * (2 if keep_bos else 1)]
    for piece in pieces[:-1]:
        out += piece[1 if keep_bos else 0:]
    return out


def official_llava_v1(tokenizer, question: str, answer: str, image_id: int):
    """(ids, labels) of preprocess_v1 for one llava_v1 round: system, ' USER: ', '<image>\\n' + the
    question verbatim, ' ASSISTANT: ', the answer, '</s>'."""
    conversation = SYSTEM + " " + "USER" + ": " + "<image>\n" + question + " " + "ASSISTANT" + ": " + answer + "</s>"
    ids = official_ids(tokenizer, conversation, image_id)
    labels = list(ids)
    sep = " " + "ASSISTANT" + ": "
    rou = conversation.split("</s>")[0]
    parts = rou.split(sep)
    assert len(parts) == 2
    instruction_len = len(official_ids(tokenizer, parts[0] + sep, image_id)) - 2
    cur = 1
    labels[:cur] = [IGNORE] * cur
    labels[cur:cur + instruction_len] = [IGNORE] * instruction_len
    cur += len(official_ids(tokenizer, rou, image_id))
    labels[cur:] = [IGNORE] * max(0, len(labels) - cur)
    assert cur == len(ids), "the official code would mask this record (tokenization mismatch)"
    return ids, labels


def collapsed(ids: torch.Tensor, labels: torch.Tensor, image_id: int):
    """Our expanded image placeholders as the official single image index."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    run = ids == image_id
    keep[1:] &= ~(run[1:] & run[:-1])
    return ids[keep].tolist(), labels[keep].tolist()


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def llama_processor(request, tmp_path_factory):
    return build_llava_processor(tmp_path_factory.mktemp(f"llama-{request.param}"), legacy=request.param)


@pytest.fixture(scope="module")
def legacy_tokenizer(tmp_path_factory):
    """The tokenizer the official code ran with: the same model, legacy semantics."""
    return build_llava_processor(tmp_path_factory.mktemp("llama-official"), legacy=True).tokenizer


RECORDS = make_records(6, seed=11) + [
    dict(make_records(1, seed=12)[0], question="  Is there a red circle?\n", chosen="Yes, one.",
         rejected="No."),  # whitespace kept verbatim; digits; punctuation
    dict(make_records(1, seed=13)[0], question="How many squares?", chosen="2 squares", rejected=""),
]


# ----------------------------------------------------------------------------------------------
# 1. the prompt


def test_llava_v1_is_the_official_input_token_for_token(llama_processor, legacy_tokenizer):
    """Ids and labels equal preprocess_v1's, under a legacy and a non-legacy Llama tokenizer."""
    tok = llama_processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert legacy_tokenizer.convert_tokens_to_ids("<image>") == image_id
    batch = PreferenceCollator(llama_processor, "symmpo", max_length=10**6)(RECORDS)
    assert batch.num_records == len(RECORDS)
    for b, rec in enumerate(RECORDS):
        for k, answer in ((0, "chosen"), (1, "rejected"), (2, "contrast_chosen"), (4, "contrast_chosen")):
            want_ids, want_labels = official_llava_v1(legacy_tokenizer, rec["question"], rec[answer], image_id)
            ids, labels = collapsed(*batch.sequence(b, k), image_id)
            assert ids == want_ids, (b, k, tok.convert_ids_to_tokens(ids)[-12:],
                                     tok.convert_ids_to_tokens(want_ids)[-12:])
            assert labels == want_labels, (b, k)


def test_tokenizing_the_whole_text_at_once_would_depend_on_the_legacy_flag(llama_processor, legacy_tokenizer):
    """Why the chunks are tokenized apart: one pass over the text drops the '▁' after <image> under
    legacy=False (the trap this guards against), so comparing with it would fail."""
    rec = RECORDS[0]
    image_id = llama_processor.tokenizer.convert_tokens_to_ids("<image>")
    want, _ = official_llava_v1(legacy_tokenizer, rec["question"], rec["chosen"], image_id)
    text = SYSTEM + " USER: <image>\n" + rec["question"] + " ASSISTANT: " + rec["chosen"] + "</s>"
    whole = llama_processor.tokenizer(text).input_ids
    if llama_processor.tokenizer.legacy:
        assert whole == want
    else:
        assert whole != want and len(whole) == len(want) - 1


def test_chat_template_format_is_the_processors_own():
    processor = load_processor()
    rec = make_records(1, seed=2)[0]
    batch = PreferenceCollator(processor, "dpo", prompt_format="chat_template")([rec])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": rec["chosen"]}]}]
    whole = processor(text=[processor.apply_chat_template(msgs, tokenize=False)], images=[rec["image"]],
                      return_tensors="pt")["input_ids"][0]
    assert torch.equal(batch.sequence(0, 0)[0], whole)
    collate = PreferenceCollator(processor, "dpo")
    default = collate([rec])
    assert collate.prompt_format == "llava_v1" and len(default.prompt_ids[0][0]) > len(batch.prompt_ids[0][0]) + 20


def test_system_prompt_and_unknown_format():
    processor = load_processor()
    rec = make_records(1, seed=3)[0]
    batch = PreferenceCollator(processor, "dpo", system_prompt="Be brief.")([rec])
    assert processor.tokenizer.decode(batch.prompt_ids[0][0]).startswith("<s>Be brief. USER: <image>")
    with pytest.raises(ValueError, match="unknown prompt_format 'vicuna'"):
        PreferenceCollator(processor, "dpo", prompt_format="vicuna")


def _official_parquet(tmp_path, model, processor, records, image_id):
    """An official-schema parquet whose ``logps`` a plain full-logits forward of ``model`` on the
    official llava_v1 input computed (sums, means, per-token lists; official column order)."""
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    n_img = 16
    rows = []
    for i, r in enumerate(records):
        seqs = [(r["image"], r["chosen"]), (r["image"], r["rejected"]), (r["image"], r["contrast_chosen"]),
                (r["contrast_image"], r["chosen"]), (r["contrast_image"], r["contrast_chosen"])]
        sums, means, tokens = [], [], []
        for image, answer in seqs:
            ids, labels = official_llava_v1(processor.tokenizer, r["question"], answer, image_id)
            at = ids.index(image_id)
            ids = ids[:at] + [image_id] * n_img + ids[at + 1:]
            labels = labels[:at] + [IGNORE] * n_img + labels[at + 1:]
            pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, :-1].double()
            lab = torch.tensor(labels[1:])
            per_token = logits.log_softmax(-1)[lab != IGNORE].gather(-1, lab[lab != IGNORE, None])[:, 0]
            sums.append(per_token.sum().item())
            means.append(per_token.mean().item())
            tokens.append(per_token.tolist())

        def png(im):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()

        rows.append({"idx": i, "question": r["question"], "resp_1_w": r["chosen"], "resp_1_l": r["rejected"],
                     "resp_2_w": r["contrast_chosen"], "image_1": {"bytes": png(r["image"]), "path": None},
                     "image_2": {"bytes": png(r["contrast_image"]), "path": None}, "image_path_1": f"{i}a.png",
                     "image_path_2": f"{i}b.png", "logps": json.dumps(sums + means + tokens)})
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    return tmp_path


def test_dataset_reference_gives_zero_rewards_at_step_0(tmp_path):
    """The parquet's logps were computed on the official input, so a policy equal to that reference
    has rewards 0 at step 0 with reference=dataset; the policy's log-probs under another prompt
    are far from them, and a run that would pair them is refused."""
    from train_helpers import config

    from symmpo_fast.layouts import sequence_logps
    from symmpo_fast.train import train

    model, processor = build_tiny_llava(seed=0)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    records = make_records(4, seed=21, answer_words=(1, 8))
    data = _official_parquet(tmp_path, model.eval(), processor, records, image_id)
    kw = dict(data=str(data), reference="dataset", finetune="full", max_steps=1, global_batch_size=4,
              micro_batch_size=4, learning_rate=0.0, lora_r=8)
    train(config(tmp_path / "run", **kw))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    rewards = [row[k] for k in row if k.startswith("rewards/")]
    assert len(rewards) == 5 and max(abs(v) for v in rewards) < 1e-5, row
    shipped = torch.tensor([formats.load_dataset(str(data)).records[i]["ref_logps"]["sum"] for i in range(4)])
    with torch.no_grad():
        other = sequence_logps(model, PreferenceCollator(processor, "symmpo", prompt_format="chat_template")(records))
    assert float((other - shipped).abs().max()) > 5e-2  # what the rewards would be off by, over beta
    with pytest.raises(ValueError, match="official logps were computed on the official llava_v1 input"):
        train(config(tmp_path / "other", prompt_format="chat_template", **kw))


# ----------------------------------------------------------------------------------------------
# 2. mDPO's prompt


MDPO_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat colour is the "
               "square? ASSISTANT:")


def test_mdpo_prompt_is_used_as_written(tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    rows = [{"img_path": "a.png", "prompt": MDPO_PROMPT, "chosen": "The square is red.", "rejected": "Blue."},
            {"img_path": "a.png", "prompt": "<image>\nWhat colour is it?", "chosen": "Red.", "rejected": "Blue."}]
    (tmp_path / "mdpo.json").write_text(json.dumps(rows))
    ds = formats.load_dataset(str(tmp_path / "mdpo.json"), objective="mdpo")
    assert ds[0]["prompt"] == MDPO_PROMPT and "question" not in ds[0]
    assert ds[1]["question"] == "What colour is it?" and "prompt" not in ds[1]
    processor = load_processor()
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    batch = PreferenceCollator(processor, "mdpo")([ds[0], ds[1]])
    # mDPO's collator: tokenizer_image_token(prompt), then the answer on its own and EOS
    want = official_ids(tok, MDPO_PROMPT, image_id) + tok("The square is red.", add_special_tokens=False).input_ids \
        + [tok.eos_token_id]
    ids, labels = collapsed(*batch.sequence(0, 0), image_id)
    assert ids == want
    assert [x for x in labels if x != IGNORE] == tok("The square is red.", add_special_tokens=False).input_ids + \
        [tok.eos_token_id]
    text = tok.decode(batch.sequence(0, 0)[0])
    assert text.count("USER:") == 1 and text.count("ASSISTANT:") == 1
    # the bare prompt gets the llava_v1 conversation around it
    assert tok.decode(batch.sequence(1, 0)[0]).count("A chat between a curious human") == 1


# ----------------------------------------------------------------------------------------------
# 3. the shipped configs and the schedule


OFFICIAL = {
    "full": dict(finetune="full", learning_rate=5e-6, weight_decay=0.01, global_batch_size=128, micro_batch_size=4,
                 max_steps=670, warmup_ratio=0.05, lr_scheduler="cosine", max_length=2048, beta=0.1, pair_weight=0.5,
                 gradient_checkpointing=True, prompt_format="llava_v1", save_steps=335, keep_checkpoints=4,
                 max_grad_norm=1.0, truncation="right", dtype="bfloat16"),
    "lora": dict(finetune="lora", learning_rate=5e-7, weight_decay=0.01, global_batch_size=256, micro_batch_size=4,
                 max_steps=1339, warmup_ratio=0.05, lr_scheduler="cosine", max_length=2048, beta=0.1,
                 pair_weight=0.5, gradient_checkpointing=True, prompt_format="llava_v1", lora_r=128, lora_alpha=256,
                 lora_dropout=0.05, save_steps=335, keep_checkpoints=4, max_grad_norm=1.0, truncation="right",
                 dtype="bfloat16"),
}


@pytest.mark.parametrize("size", ["7b", "13b"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_shipped_configs_are_the_official_settings(kind, size):
    from symmpo_fast.train import TrainConfig

    path = ROOT / "configs" / f"llava15_{size}_{kind}.yaml"
    cfg = TrainConfig.from_yaml(path)
    for name, value in OFFICIAL[kind].items():
        assert getattr(cfg, name) == value, name
    assert cfg.model == f"llava-hf/llava-1.5-{size}-hf" and cfg.objective == "symmpo"
    if kind == "lora":
        assert set(cfg.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
    # every value names where it came from
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and not line.startswith(("data:", "objective:")):
            assert re.search(r"#.*(line|not passed|not set|official|logps)", line), line
    assert set(yaml.safe_load(path.read_text())) - set(OFFICIAL[kind]) <= {"model", "objective", "data", "reference",
                                                                          "parallel", "lora_target_modules"}


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("total,ratio", [(670, 0.05), (1339, 0.05), (10, 0.1), (7, 0.0), (3, 0.5)])
def test_lr_schedule_is_transformers_own(kind, total, ratio):
    import transformers

    from symmpo_fast.train.loop import lr_lambda

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warmup = math.ceil(ratio * total)
    make = getattr(transformers, f"get_{kind}_schedule_with_warmup")
    sched = make(opt, warmup) if kind == "constant" else make(opt, warmup, total)
    ours = lr_lambda(total, ratio, kind)
    for step in range(total):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()
    if warmup:
        assert ours(0) == 0.0


# ----------------------------------------------------------------------------------------------
# 4. data as users download it


def _png_bytes(colour) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def _rows(tmp_path, n, start=0):
    m, m2 = _png_bytes((10, 200, 10)), _png_bytes((200, 10, 10))
    return [{"idx": start + i, "question": f" Q{start + i}? ", "resp_1_w": "a", "resp_1_l": "b", "resp_2_w": "c",
             "image_1": {"bytes": m, "path": None}, "image_2": {"bytes": m2, "path": None},
             "image_path_1": "x", "image_path_2": "y"} for i in range(n)]


def test_hub_layout_reads_like_datasets_load_dataset(tmp_path):
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(tmp_path, 3)), tmp_path / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(tmp_path, 2, 3)), tmp_path / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(tmp_path, 4, 100)), tmp_path / "data" / "test-00000-of-00001.parquet")
    ours = formats.load_dataset(str(tmp_path))
    theirs = datasets.load_dataset(str(tmp_path))["train"]
    assert [r["id"] for r in ours.records] == [str(i) for i in theirs["idx"]] == ["0", "1", "2", "3", "4"]
    # the question verbatim, surrounding spaces included, as the official code uses it
    assert [r["question"] for r in ours.records] == theirs["question"] == [f" Q{i}? " for i in range(5)]
    with pytest.raises(FileNotFoundError, match="no train split"):
        formats.parquet_files(_only_test(tmp_path))


def _only_test(tmp_path):
    d = tmp_path / "only-test"
    (d / "data").mkdir(parents=True)
    (tmp_path / "data" / "test-00000-of-00001.parquet").rename(d / "data" / "test-00000-of-00001.parquet")
    return d


def test_question_placeholder_handling():
    assert formats._question("<image>\nWhat is it? ") == "What is it? "
    assert formats._question("What is it?\n<image>") == "What is it?"
    assert formats._question("  as is\n") == "  as is\n"
    with pytest.raises(ValueError, match="inside its text"):
        formats._question("Left <image> right")


def test_truncation_right_is_the_official_cut(tmp_path):
    processor = build_llava_processor(tmp_path / "tok", legacy=True)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    rec = dict(make_records(1, seed=30)[0], chosen="red green blue yellow circle " * 4, rejected="no")
    full = PreferenceCollator(processor, "dpo", max_length=10**6)([rec])
    limit = len(full.sequence(0, 0)[0]) - 5  # cuts y_w's last 5 labels, not y_l
    assert len(full.sequence(0, 1)[0]) <= limit
    batch = PreferenceCollator(processor, "dpo", max_length=limit, truncation="right")([rec])
    assert batch.num_records == 1 and batch.num_truncated == 1
    for k, answer in ((0, "chosen"), (1, "rejected")):
        ids, labels = official_llava_v1(tok, rec["question"], rec[answer], image_id)
        at = ids.index(image_id)
        ids = ids[:at] + [image_id] * 16 + ids[at + 1:]  # the embedded sequence, image expanded
        labels = labels[:at] + [IGNORE] * 16 + labels[at + 1:]
        got_ids, got_labels = batch.sequence(0, k)
        assert got_ids.tolist() == ids[:limit] and got_labels.tolist() == labels[:limit]
    assert len(batch.sequence(0, 0)[0]) == limit and batch.response_ids[0][0][-1] != tok.eos_token_id
    # a sequence left without labels is dropped, and counted
    short = PreferenceCollator(processor, "dpo", max_length=20, truncation="right")([rec])
    assert short.num_records == 0 and short.num_dropped == 1


def test_llava_loader_pins_the_pil_image_processor(tmp_path, monkeypatch):
    import transformers

    from symmpo_fast.models.llava import clip_image_processor_pil, load_llava

    model, processor = build_tiny_llava(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    real = transformers.AutoProcessor.from_pretrained

    class Torchvisionish:  # what transformers picks where torchvision is installed
        pass

    def picks_another(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.image_processor = Torchvisionish()
        return loaded

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", picks_another)
    _, loaded = load_llava(str(tmp_path), dtype=torch.float32, device="cpu")
    assert type(loaded.image_processor) is clip_image_processor_pil()
    image = make_records(1, seed=4)[0]["image"]
    assert torch.equal(loaded.image_processor(images=[image], return_tensors="pt")["pixel_values"],
                       processor.image_processor(images=[image], return_tensors="pt")["pixel_values"])


def test_mdpo_official_crop_is_drawn_anew_on_every_forward():
    processor = load_processor()
    records = make_records(2, seed=40)
    seeded = PreferenceCollator(processor, "mdpo")(records)
    official = PreferenceCollator(processor, "mdpo", mdpo_crop="official")(records)
    assert seeded.recrop == () and len(official.recrop) == 2
    # the stored entry is the whole image m; each forward sees a fresh crop of it
    for b in range(2):
        m, crop = official.image_index[b][0], official.image_index[b][3]
        assert crop != m and torch.equal(official.pixel_values[crop], official.pixel_values[m])
    torch.manual_seed(0)
    first, second = official.forward_pixels(), official.forward_pixels()
    for i in official.recrop:
        assert not torch.equal(first[i], official.pixel_values[i]) and not torch.equal(first[i], second[i])
    others = [i for i in range(len(official.pixel_values)) if i not in official.recrop]
    assert torch.equal(first[others], official.pixel_values[others])
    assert torch.equal(seeded.forward_pixels(), seeded.pixel_values)


def test_random_resized_crop_box():
    """A box keeping 1-20 % of the area, aspect ratio within [3/4, 4/3], resized back: on a tensor
    whose value is its row index, the output rows span exactly the box's rows."""
    H, W = 64, 48
    rows = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W)[None].repeat(3, 1, 1)
    cols = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W)[None].repeat(3, 1, 1)
    for seed in range(50):
        r = random_resized_crop(rows, generator=torch.Generator().manual_seed(seed))
        c = random_resized_crop(cols, generator=torch.Generator().manual_seed(seed))
        assert r.shape == rows.shape
        # upsampled bilinearly, the first and last output pixels sit at the box's first and last
        # source pixels, up to one pixel
        h, w = (r[0, -1, 0] - r[0, 0, 0]).item() + 1, (c[0, 0, -1] - c[0, 0, 0]).item() + 1
        assert 0.01 * H * W <= (h + 1) * (w + 1) and (h - 1) * (w - 1) <= 0.2 * H * W, (seed, h, w)
        assert 3 / 4 <= (w + 1) / max(h - 1, 1) and (w - 1) / (h + 1) <= 4 / 3
    with pytest.raises(ValueError, match="mdpo_crop=official"):
        from symmpo_fast.train import TrainConfig

        TrainConfig(objective="mdpo", mdpo_crop="official", reference="cache")


def test_official_crop_trains_end_to_end(tmp_path):
    from train_helpers import config

    from symmpo_fast.train import train

    out = tmp_path / "run"
    train(config(out, objective="mdpo", mdpo_crop="official", max_steps=2, synthetic_records=16))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
