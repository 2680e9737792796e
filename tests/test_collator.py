"""PreferenceCollator: role layout, tokenization against the processor, images, keys, crops,
truncation policy and input errors."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from vlm_records import make_records

from symmpo_fast.data import CROP_AREA, PreferenceCollator, random_crop
from symmpo_fast.models import load_processor


@pytest.fixture(scope="module")
def processor():
    return load_processor()


def test_symmpo_roles_share_prompts_and_answers(processor):
    records = make_records(3, seed=1)
    batch = PreferenceCollator(processor, "symmpo")(records)
    assert batch.num_records == 3 and batch.columns == (0, 1, 2, 3, 4)
    eos, img = processor.tokenizer.eos_token_id, batch.image_token_id
    for b in range(3):
        p, r, im = batch.prompt_ids[b], batch.response_ids[b], batch.image_index[b]
        assert im[0] == im[1] == im[2] != im[3] == im[4]
        assert torch.equal(p[0], p[1]) and torch.equal(p[0], p[2]) and torch.equal(p[3], p[4])
        assert torch.equal(r[0], r[3]) and torch.equal(r[2], r[4])  # y_w in 0 and 3, y_w' in 2 and 4
        assert all(int(x[-1]) == eos for x in r)
        assert all(int((x == img).sum()) == 16 for x in p)  # 32x32 image, 8x8 patches, CLS dropped
    assert batch.pixel_values.shape == (6, 3, 32, 32)
    assert len(set(batch.record_keys)) == 3


def test_ids_are_the_processors_own(processor):
    """prompt_format=chat_template: the prompt is what the processor makes of the rendered chat
    template, and prompt + response is the tokenization of the whole conversation, </s> included
    (the default llava_v1 format is checked against the official construction in test_fidelity)."""
    rec = make_records(1, seed=2)[0]
    batch = PreferenceCollator(processor, "dpo", prompt_format="chat_template")([rec])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec["question"]}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    expected = processor(text=[prompt], images=[rec["image"]], return_tensors="pt")["input_ids"][0]
    assert torch.equal(batch.prompt_ids[0][0], expected)
    msgs.append({"role": "assistant", "content": [{"type": "text", "text": rec["chosen"]}]})
    full = processor.apply_chat_template(msgs, tokenize=False)
    assert full.endswith("</s>")
    whole = processor(text=[full], images=[rec["image"]], return_tensors="pt")["input_ids"][0]
    ids, labels = batch.sequence(0, 0)
    assert torch.equal(ids, whole)
    assert torch.equal(labels[labels != -100], batch.response_ids[0][0])


def test_answer_falls_back_to_its_own_tokenization(processor):
    """Where the prompt's tail and the answer would merge into one token, the answer is tokenized
    on its own (still followed by </s>)."""
    collate = PreferenceCollator(processor, "dpo", prompt_format="chat_template")
    rec = make_records(1, seed=12)[0]
    collate.format._anchor = [processor.tokenizer.eos_token_id]  # no tail tokenization starts with it
    ids = collate([rec]).response_ids[0][0].tolist()
    alone = processor.tokenizer(" " + rec["chosen"], add_special_tokens=False)["input_ids"]
    assert ids == alone + [processor.tokenizer.eos_token_id]


def test_objectives_hold_only_their_columns(processor):
    records = make_records(2, seed=3)
    dpo = PreferenceCollator(processor, "dpo")(records)
    assert dpo.columns == (0, 1) and dpo.pixel_values.shape[0] == 2
    assert all(dpo.prompt_ids[b][k] is None for b in range(2) for k in (2, 3, 4))
    with pytest.raises(ValueError, match="not part of a dpo batch"):
        dpo.sequence(0, 3)
    mdpo = PreferenceCollator(processor, "mdpo")(records)
    assert mdpo.columns == (0, 1, 3) and mdpo.pixel_values.shape[0] == 4  # m and its crop m_l
    assert mdpo.image_index[0][3] not in (-1, mdpo.image_index[0][0])
    # mDPO records need no contrast fields
    slim = [{k: r[k] for k in ("image", "question", "chosen", "rejected")} for r in records]
    assert PreferenceCollator(processor, "mdpo")(slim).record_keys == mdpo.record_keys


def test_identical_images_are_processed_once(processor):
    records = make_records(3, seed=4)
    records[1]["image"] = records[0]["image"]
    records[2]["contrast_image"] = records[0]["image"].copy()
    batch = PreferenceCollator(processor, "symmpo")(records)
    assert batch.pixel_values.shape[0] == 4
    assert batch.image_index[1][0] == batch.image_index[0][0] == batch.image_index[2][3]


def test_crop_keeps_1_to_20_percent_of_the_area():
    rng = random.Random(0)
    for size in [(5, 5), (7, 40), (336, 336), (640, 480)]:
        image = Image.new("RGB", size)
        for _ in range(200):
            w, h = random_crop(image, rng).size
            assert CROP_AREA[0] <= w * h / (size[0] * size[1]) <= CROP_AREA[1]
    with pytest.raises(ValueError, match="too small"):
        random_crop(Image.new("RGB", (2, 2)), rng)


def test_mdpo_crop_is_seeded_per_record(processor):
    records = make_records(3, seed=5)
    a = PreferenceCollator(processor, "mdpo", seed=7)(records)
    b = PreferenceCollator(processor, "mdpo", seed=7)(records[::-1])
    c = PreferenceCollator(processor, "mdpo", seed=8)(records)
    assert a.record_keys == b.record_keys[::-1]  # same crop whatever the batch
    assert torch.equal(a.pixel_values[a.image_index[0][3]], b.pixel_values[b.image_index[2][3]])
    assert not torch.equal(a.pixel_values[a.image_index[0][3]], c.pixel_values[c.image_index[0][3]])
    assert a.record_keys != c.record_keys


def test_record_keys_follow_tokens_and_pixels(processor):
    records = make_records(2, seed=6)
    collate = PreferenceCollator(processor, "symmpo")
    base = collate(records).record_keys
    assert collate(records[:1]).record_keys == base[:1]
    changed = [dict(records[0], rejected=records[0]["rejected"] + " red"), records[1]]
    assert collate(changed).record_keys[0] != base[0] and collate(changed).record_keys[1] == base[1]
    pixels = np.array(records[0]["contrast_image"])
    pixels[0, 0] = 255 - pixels[0, 0]
    moved = [dict(records[0], contrast_image=Image.fromarray(pixels)), records[1]]
    assert collate(moved).record_keys[0] != base[0]
    assert PreferenceCollator(processor, "dpo")(records).record_keys != base


def _longest(batch, b):
    return max(len(batch.prompt_ids[b][k]) + len(batch.response_ids[b][k]) for k in batch.columns)


def test_truncation_drop_and_question(processor):
    records = make_records(3, seed=7, question_words=(3, 4), answer_words=(2, 3))
    records[1]["question"] = " ".join(["How many red circles are there in the image?"] * 6)
    full = PreferenceCollator(processor, "symmpo", max_length=4096)(records)
    limit = max(_longest(full, b) for b in (0, 2)) + 3
    assert _longest(full, 1) > limit

    dropped = PreferenceCollator(processor, "symmpo", max_length=limit, truncation="drop")(records)
    assert (dropped.num_records, dropped.num_dropped, dropped.num_truncated) == (2, 1, 0)
    assert dropped.record_keys == [full.record_keys[0], full.record_keys[2]]
    assert dropped.pixel_values.shape[0] == 4  # the dropped record's images are not kept

    cut = PreferenceCollator(processor, "symmpo", max_length=limit, truncation="question")(records)
    assert (cut.num_records, cut.num_dropped, cut.num_truncated) == (3, 0, 1)
    assert _longest(cut, 1) == limit
    for k in cut.columns:
        assert torch.equal(cut.response_ids[1][k], full.response_ids[1][k])  # responses never cut
        assert int((cut.prompt_ids[1][k] == cut.image_token_id).sum()) == 16  # nor image tokens
    text = processor.tokenizer.decode(cut.prompt_ids[1][0])
    assert text.startswith("<s>A chat between") and " USER: <image>" in text  # the template stays whole
    assert text.endswith(" ASSISTANT:")

    # A response that alone exceeds the limit drops the record under either policy.
    records[2]["chosen"] = " ".join(["red"] * (limit + 5))
    for policy in ("drop", "question"):
        out = PreferenceCollator(processor, "symmpo", max_length=limit, truncation=policy)(records)
        assert out.num_dropped == 1 + (policy == "drop") and full.record_keys[2] not in out.record_keys


def test_everything_dropped_gives_an_empty_batch(processor):
    batch = PreferenceCollator(processor, "dpo", max_length=8)(make_records(2, seed=8))
    assert batch.num_records == 0 and batch.num_dropped == 2 and batch.pixel_values.shape[0] == 0


def test_batch_to_moves_pixels_only(processor):
    batch = PreferenceCollator(processor, "dpo")(make_records(1, seed=9))
    moved = batch.to("cpu")
    assert moved.pixel_values.device.type == "cpu" and moved.prompt_ids is batch.prompt_ids


@pytest.mark.parametrize("records, error, match", [
    ([], ValueError, "non-empty list"),
    ("not a list", ValueError, "non-empty list"),
    ([["image"]], TypeError, "record 0 must be a dict"),
    ([{"image": None}], ValueError, "record 0 has no field 'chosen'"),
])
def test_bad_batches_say_what_is_wrong(processor, records, error, match):
    with pytest.raises(error, match=match):
        PreferenceCollator(processor, "dpo")(records)


def test_bad_fields_say_what_is_wrong(processor):
    collate = PreferenceCollator(processor, "symmpo")
    good = make_records(2, seed=10)
    cases = [
        ({"contrast_image": None}, ValueError, "record 1 has no field 'contrast_image'"),
        ({"image": np.zeros((4, 4, 3))}, TypeError, "record 1: 'image' must be a PIL image"),
        ({"chosen": 3}, TypeError, "record 1: 'chosen' must be a str"),
        ({"question": "what is <image> here"}, ValueError, "contains the image token"),
    ]
    for change, error, match in cases:
        bad = dict(good[1], **change)
        if change.get("contrast_image", 0) is None:
            del bad["contrast_image"]
        with pytest.raises(error, match=match):
            collate([good[0], bad])


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "ipo"}, "unknown objective"),
    ({"truncation": "response"}, "unknown truncation"),
    ({"max_length": 0}, "max_length must be a positive int"),
])
def test_bad_options(processor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreferenceCollator(processor, **kwargs)


@pytest.mark.parametrize("objective", ["symmpo", "mdpo", "dpo"])
@pytest.mark.parametrize("truncation", ["drop", "question", "right"])
def test_measure_agrees_with_collation_without_the_pixels(processor, objective, truncation, monkeypatch):
    """The read-time length check (measure) keeps and drops exactly the records the collator does,
    with the same lengths, and runs the image processor once for a fixed-size family."""
    records = make_records(12, seed=31, question_words=(2, 30), answer_words=(0, 20))
    full = PreferenceCollator(processor, objective, max_length=10**6)
    lengths = [max(len(p) + len(r) for p, r in zip(b.prompt_ids[0], b.response_ids[0]) if p is not None)
               for b in (full([r]) for r in records)]
    limit = sorted(lengths)[len(lengths) // 2]
    collate = PreferenceCollator(processor, objective, max_length=limit, truncation=truncation)
    calls = []
    real = collate.processor.__class__.__call__
    monkeypatch.setattr(collate.processor.__class__, "__call__",
                        lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    measured = [collate.measure(r) for r in records]
    assert len(calls) == 1
    monkeypatch.undo()
    for r, (kept, longest, _), n in zip(records, measured, lengths, strict=True):
        assert kept == (collate([r]).num_records == 1) and longest == n
    if truncation == "drop":  # the limit is the median: both outcomes are exercised
        assert 0 < sum(k for k, _, _ in measured) < len(records)
