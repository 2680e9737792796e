"""The trainer on one CPU process: end to end, resume exactness, references, guards."""

import json
import math

import pytest
import torch

from symmpo_fast.train import TrainConfig, train
from symmpo_fast.train import loop as loop_mod
from symmpo_fast.train.checkpoint import Checkpointer
from symmpo_fast.train.model import PreferenceModule

from train_helpers import config, losses, one_thread, run  # noqa: F401  (one_thread: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_end_to_end_lora(tmp_path):
    out = tmp_path / "run"
    result = train(config(out, max_steps=3, save_steps=2, eval_data="synthetic", synthetic_eval_records=8,
                          eval_steps=3))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "loss/dpo", "loss/pair", "loss/margin", "loss/anchor", "rewards/chosen",
                "rewards/contrast_chosen", "accuracy/dpo", "accuracy/pair_m", "margin/dpo", "lr", "grad_norm",
                "tokens_per_s", "records"):
        assert key in rows[0], key
    # Step 1: the adapters start at zero, so the policy is the reference and every log-ratio is 0:
    # dpo ln2 + pair 0.5 * 2 ln2 + anchor 2 ln2 = 4 ln2.
    assert rows[0]["loss"] == pytest.approx(4 * math.log(2), abs=1e-5)
    assert rows[-1]["loss"] != pytest.approx(rows[0]["loss"], abs=1e-4)  # it trained
    assert rows[0]["records"] == 8 and "eval/accuracy/dpo" in rows[-1] and "eval/accuracy/dpo" not in rows[0]
    assert (out / "final" / "adapter_model.safetensors").exists() and (out / "metrics.png").exists()
    assert [p.name for p in Checkpointer(out).complete()] == ["step-00000002", "step-00000003"]
    assert TrainConfig.from_yaml(out / "config.yaml") == config(out, max_steps=3, save_steps=2, eval_data="synthetic",
                                                                synthetic_eval_records=8, eval_steps=3)
    assert result["final"] == str(out / "final")
    # `symmpo-fast eval` on the run directory: the exported adapters on their rebuilt base.
    from symmpo_fast.train.evaluate import run_eval

    evaluated = run_eval(config(out, eval_data="synthetic", synthetic_eval_records=8, model=str(out)), generate=False)
    assert evaluated["eval/accuracy/dpo"] == pytest.approx(rows[-1]["eval/accuracy/dpo"])


def test_resume_continues_exactly(tmp_path):
    # LoRA dropout draws from the RNG on every step: its state must come back too.
    kw = dict(max_steps=5, save_steps=2, lora_dropout=0.1, micro_batch_size=4)
    run(tmp_path / "straight", **kw)
    run(tmp_path / "resumed", interrupt=3, **kw)  # checkpoint at 2, step 3 logged, then a crash
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    # The lost step 3 was logged once, not twice.
    assert len(losses(tmp_path / "resumed")) == 5


def test_resume_ignores_an_interrupted_save_and_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=2, save_steps=1, keep_checkpoints=1)
    ckpt = Checkpointer(out)
    (out / "checkpoints" / "step-00000009").mkdir()  # a save that died before trainer_state.json
    (out / "checkpoints" / ".tmp-step-00000010").mkdir()
    assert ckpt.choose()["path"] == str(out / "checkpoints" / "step-00000002") and len(ckpt.complete()) == 1
    with pytest.raises(ValueError, match="other settings .*seed 0 -> 1"):
        train(config(out, max_steps=2, resume=True, seed=1))


def test_reference_cache_gives_the_copy_reference_losses(tmp_path):
    from symmpo_fast.train.refcache import precompute

    kw = dict(max_steps=2, finetune="full", micro_batch_size=4)
    run(tmp_path / "copy", reference="copy", **kw)
    precompute(config(tmp_path / "cache", **kw))
    run(tmp_path / "cache", reference="cache", **kw)
    assert losses(tmp_path / "cache") == pytest.approx(losses(tmp_path / "copy"), rel=1e-6)
    # The directory holds the cached run: overwrite it, which the failed cache check never gets to do.
    with pytest.raises(RuntimeError, match="model changed"):
        train(config(tmp_path / "cache", reference="cache", overwrite=True, **{**kw, "seed": 1}))  # other weights
    with pytest.raises(RuntimeError, match="data changed"):
        train(config(tmp_path / "cache", reference="cache", overwrite=True, synthetic_records=40, **kw))
    assert losses(tmp_path / "cache") == pytest.approx(losses(tmp_path / "copy"), rel=1e-6)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    forward = PreferenceModule.forward
    calls = {"n": 0}

    def poisoned(self, batch, ref_logps=None, mode="loss"):
        out = forward(self, batch, ref_logps, mode)
        if mode != "loss":
            return out
        calls["n"] += 1
        loss, metrics = out
        return (loss * float("nan"), metrics) if calls["n"] > 4 else out  # steps 3 and on (2 micro-batches each)

    monkeypatch.setattr(PreferenceModule, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="2 steps in a row had a non-finite loss"):
        train(config(out, max_steps=6, max_bad_steps=2, micro_batch_size=4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, True]
    assert rows[2]["loss"] is None


def test_out_of_memory_names_the_micro_batch_setting(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop_mod, "_run_step", oom)
    with pytest.raises(RuntimeError, match="micro_batch_size=2.*--micro-batch-size"):
        train(config(tmp_path / "run", max_steps=1))


def test_step_schedule_gives_every_world_size_the_same_global_batches():
    one = loop_mod.StepSchedule(40, 8, 4, world=1, rank=0, seed=3)
    two = [loop_mod.StepSchedule(40, 8, 2, world=2, rank=r, seed=3) for r in range(2)]
    for step in range(12):  # crosses epochs (5 steps each)
        whole = [i for mb in one.micro_batches(step) for i in mb]
        split = [i for s in two for mb in s.micro_batches(step) for i in mb]
        assert whole == split and len(set(whole)) == 8
    assert one.micro_batches(0) != one.micro_batches(5)  # every epoch reshuffles
    with pytest.raises(ValueError, match="multiple of"):
        loop_mod.StepSchedule(40, 8, 3, world=1, rank=0, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loop_mod.StepSchedule(4, 8, 4, world=1, rank=0, seed=0)


def test_dataset_reference_aligns_rows_when_records_are_dropped():
    from symmpo_fast.data import PreferenceCollator
    from symmpo_fast.models import load_processor
    from symmpo_fast.synthetic import build_split

    data = build_split("train", 3)
    for i, rec in enumerate(data.records):
        rec["ref_logps"] = {"sum": [float(i)] * 5, "mean": [i / 10] * 5}
    data.records[1]["question"] = "why " * 300  # too long: dropped by the collator
    collator = PreferenceCollator(load_processor(), "symmpo", max_length=128)
    ref = loop_mod.DatasetReference(data, collator, average=False)
    batch = collator([data[i] for i in range(3)])
    assert batch.num_dropped == 1
    assert ref([0, 1, 2], batch)[:, 0].tolist() == [0.0, 2.0]
    assert loop_mod.DatasetReference(data, collator, average=True)([0, 1, 2], batch)[:, 0].tolist() == \
        pytest.approx([0.0, 0.2])


def test_reference_cache_with_a_duplicate_record(tmp_path):
    """A data set with a duplicate (kept by the reader) precomputes one row per key and trains
    with reference=cache as with a frozen copy."""
    from symmpo_fast.formats import write_jsonl
    from symmpo_fast.synthetic import build_split
    from symmpo_fast.train.refcache import precompute

    path = write_jsonl(build_split("train", 16), tmp_path / "data")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + lines[:1]) + "\n")  # 17 records, one of them twice
    kw = dict(max_steps=2, finetune="full", micro_batch_size=4, data=str(path))
    precompute(config(tmp_path / "cache", **kw))
    index = json.loads((tmp_path / "cache" / "ref_cache" / "index.json").read_text())
    assert len(index["keys"]) == len(set(index["keys"])) == 16
    run(tmp_path / "cache", reference="cache", **kw)
    run(tmp_path / "copy", reference="copy", **kw)
    assert losses(tmp_path / "cache") == pytest.approx(losses(tmp_path / "copy"), rel=1e-6)
