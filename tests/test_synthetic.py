"""The generated task: determinism, minimal edits, the language prior and the judge of answers."""

import numpy as np
import pytest

from symmpo_fast import synthetic as syn


def test_records_are_deterministic_and_splits_differ():
    cfg = syn.SyntheticConfig()
    a, b = syn.make_record(cfg, "train", 7), syn.make_record(cfg, "train", 7)
    assert a["question"] == b["question"] and a["chosen"] == b["chosen"]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert syn.build_split("train", 32).fingerprint() == syn.build_split("train", 32).fingerprint()
    assert syn.build_split("train", 32).fingerprint() != syn.build_split("heldout", 32).fingerprint()
    other_seed = syn.build_split("train", 32, syn.SyntheticConfig(seed=1))
    assert syn.build_split("train", 32).fingerprint() != other_seed.fingerprint()


@pytest.mark.parametrize("index", range(12))
def test_contrast_is_a_minimal_edit_with_its_own_true_answer(index):
    rec = syn.make_record(syn.SyntheticConfig(), "train", index)
    meta = rec["meta"]
    m, m2 = np.asarray(rec["image"]).astype(int), np.asarray(rec["contrast_image"]).astype(int)
    changed = (np.abs(m - m2).sum(-1) > 0).mean()
    assert 0 < changed < 0.5  # same background and layout, only the objects touched by the edit
    assert meta["answer"] != meta["contrast_answer"] and meta["answer"] != meta["rejected_answer"]
    assert syn.judge(rec["chosen"], meta) == "correct"
    assert syn.judge(rec["rejected"], meta) == "hallucinated"
    assert syn.judge(rec["contrast_chosen"], meta) == "hallucinated"  # true of m', not of m
    assert syn.judge(rec["contrast_chosen"], {**meta, "answer": meta["contrast_answer"]}) == "correct"


def test_language_prior_in_training_and_broken_held_out():
    train = syn.build_split("train", 400)
    share = np.mean([r["meta"]["follows_prior"] for r in train.records])
    # prior_fraction 0.5, plus a quarter of the uniform rest that lands on the prior by chance
    assert 0.55 < share < 0.70
    held = syn.build_split("heldout", 200)
    assert not any(r["meta"]["follows_prior"] for r in held.records)
    assert all(r["meta"]["rejected_answer"] == r["meta"]["prior_answer"] for r in held.records)
    iid = syn.build_split("iid", 200)
    assert any(r["meta"]["follows_prior"] for r in iid.records)
    none = syn.build_split("train", 200, syn.SyntheticConfig(prior_fraction=0.0))
    assert np.mean([r["meta"]["follows_prior"] for r in none.records]) < 0.4


def test_prior_record_text_predicts_the_answer():
    """In a prior record the shape word of the question alone gives the answer (PRIOR's table)."""
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    for rec in syn.build_split("train", 100).records:
        meta = rec["meta"]
        prior = syn.PRIOR[meta["shape"]][meta["type"]]
        assert meta["prior_answer"] == words.get(prior, prior)
        assert meta["follows_prior"] == (meta["answer"] == meta["prior_answer"])
        assert meta["shape"] in rec["question"]


@pytest.mark.parametrize("text, meta, verdict", [
    ("The circle is red.", {"type": "colour", "answer": "red"}, "correct"),
    ("The circle is red and blue.", {"type": "colour", "answer": "red"}, "hallucinated"),
    ("It is purple.", {"type": "colour", "answer": "red"}, "hallucinated"),
    ("I cannot tell.", {"type": "colour", "answer": "red"}, "no_answer"),
    ("There are 3 squares.", {"type": "count", "answer": "three"}, "correct"),
    ("There are two squares.", {"type": "count", "answer": "three"}, "hallucinated"),
    ("The cross is in the top left.", {"type": "position", "answer": "top left"}, "correct"),
    ("The cross is at the top.", {"type": "position", "answer": "top left"}, "correct"),
    ("The cross is in the bottom left.", {"type": "position", "answer": "top left"}, "hallucinated"),
    ("The cross is on the right.", {"type": "position", "answer": "top left"}, "hallucinated"),
])
def test_judge(text, meta, verdict):
    assert syn.judge(text, meta) == verdict


def test_config_validation():
    with pytest.raises(ValueError, match="question_types"):
        syn.SyntheticConfig(question_types=("size",))
    with pytest.raises(ValueError, match="prior_fraction"):
        syn.SyntheticConfig(prior_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        syn.make_record(syn.SyntheticConfig(), "test", 0)
