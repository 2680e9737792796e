"""Run directories and resume: no run is lost or silently mixed (issue 14, part 1).

Each case fails on the trainer before this change: a second run into a run's directory mixed the
two, a changed setting surfaced as a tensor-size error after config.yaml was rewritten, a new
learning rate was ignored and a longer run trained at lr 0, a damaged checkpoint crashed every
restart (or, with flipped tensor bytes, was trained on), and NaN weights were exported.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symmpo_fast.train import TrainConfig, train
from symmpo_fast.train.checkpoint import Checkpointer
from symmpo_fast.train.loop import lr_lambda

from train_helpers import config, flip_last_bytes, losses, one_thread, run  # noqa: F401  (one_thread: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(micro_batch_size=4, synthetic_records=16)
TESTS = Path(__file__).resolve().parent


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out) -> list[str]:
    return [p.name for p in Checkpointer(out).complete()]


def test_a_directory_that_holds_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=4, save_steps=2, **FAST)
    before = (out / "metrics.jsonl").read_bytes()
    # The old trainer deleted metrics.jsonl here and kept step 4, which a later --resume continued.
    with pytest.raises(RuntimeError, match=r"already holds a run \(config.yaml, metrics.jsonl.*--resume.*--overwrite"):
        train(config(out, max_steps=2, **FAST))
    assert (out / "metrics.jsonl").read_bytes() == before and steps(out) == ["step-00000002", "step-00000004"]

    train(config(out, max_steps=2, overwrite=True, **FAST))
    assert [r["step"] for r in rows(out)] == [1, 2] and steps(out) == ["step-00000002"]
    train(config(out, max_steps=2, resume=True, **FAST))  # nothing of the old run's step 4 comes back
    assert [r["step"] for r in rows(out)] == [1, 2] and steps(out) == ["step-00000002"]

    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        config(out, resume=True, overwrite=True)
    # A run directory that is not a directory, and --resume on a finished run whose checkpoints are gone.
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(config(tmp_path / "file", max_steps=1, **FAST))
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(RuntimeError, match="finished run .* no checkpoint"):
        train(config(out, max_steps=2, resume=True, **FAST))


def test_the_requeue_command_resumes_a_run_started_with_overwrite(tmp_path, capsys):
    """config.yaml used to hold overwrite: true: `train --config DIR/config.yaml` (a requeue script)
    then deleted the run and started over with exit 0, and the advised `--config DIR/config.yaml
    --resume` failed with "resume and overwrite exclude each other"."""
    from symmpo_fast import cli

    out = tmp_path / "run"
    run(out, max_steps=2, save_steps=1, **FAST)
    train(config(out, max_steps=2, save_steps=1, overwrite=True, **FAST))
    before = (out / "metrics.jsonl").read_bytes()
    assert cli.main(["train", "--config", str(out / "config.yaml")]) == 1
    assert "already holds a run" in capsys.readouterr().err and (out / "metrics.jsonl").read_bytes() == before
    assert cli.main(["train", "--config", str(out / "config.yaml"), "--resume", "--max-steps", "3"]) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3] and "resuming at step 2" in capsys.readouterr().out


def test_resume_checks_every_setting_before_loading_or_writing_anything(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=2, save_steps=1, **FAST)
    yaml_before = (out / "config.yaml").read_bytes()
    # The old trainer loaded the checkpoint first: "size of tensor a (4) must match ... (8)".
    with pytest.raises(ValueError, match=r"other settings \(lora_r 8 -> 4; weight_decay 0.0 -> 0.1\).*may not change"):
        train(config(out, max_steps=3, resume=True, lora_r=4, weight_decay=0.1, **FAST))
    assert (out / "config.yaml").read_bytes() == yaml_before
    # The error's advice works: the run's own config.yaml, with a setting that may change.
    cfg = dataclasses.replace(TrainConfig.from_yaml(out / "config.yaml"), resume=True, max_steps=3)
    train(cfg)
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    # Other records under the same settings (here: a data file whose content changed) are refused too.
    from symmpo_fast.formats import write_jsonl
    from symmpo_fast.synthetic import build_split

    data = write_jsonl(build_split("train", 16), tmp_path / "data")
    run(tmp_path / "jsonl", max_steps=2, save_steps=1, data=str(data), **FAST)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # the same records, another order
    with pytest.raises(RuntimeError, match="other records .* content fingerprint differs"):
        train(config(tmp_path / "jsonl", max_steps=3, resume=True, data=str(data), **FAST))


def test_resume_applies_a_new_learning_rate_and_the_schedule_of_a_longer_run(tmp_path):
    out = tmp_path / "run"
    kw = dict(warmup_ratio=0.0, lr_scheduler="cosine", save_steps=4, **FAST)
    run(out, max_steps=4, learning_rate=2e-3, **kw)
    assert rows(out)[-1]["lr"] == pytest.approx(2e-3 * lr_lambda(4, 0.0, "cosine")(3))
    train(config(out, max_steps=6, learning_rate=1e-3, resume=True, **kw))
    got = [r["lr"] for r in rows(out)[4:]]
    # Steps 5 and 6 run on the 6-step cosine with the new peak (the old trainer: 0.0, then the old peak's).
    want = [1e-3 * lr_lambda(6, 0.0, "cosine")(s) for s in (4, 5)]
    assert got == pytest.approx(want) and min(got) > 0
    assert TrainConfig.from_yaml(out / "config.yaml").learning_rate == 1e-3
    with pytest.raises(ValueError, match="at step 6, past this run's 5 steps"):
        train(config(out, max_steps=5, learning_rate=1e-3, resume=True, **kw))


def test_a_killed_run_resumes_exactly_even_from_a_torn_metrics_line(tmp_path):
    """SIGKILL, not an exception: nothing of the process's own clean-up runs."""
    kw = dict(max_steps=4, save_steps=2, lora_dropout=0.1, **FAST)
    run(tmp_path / "straight", **kw)
    out = tmp_path / "killed"
    script = ("import os, signal, sys; from symmpo_fast.train import train; from train_helpers import config; "
              f"train(config(sys.argv[1], **{kw!r}), on_step=lambda s, r: s == 3 and os.kill(os.getpid(), "
              "signal.SIGKILL))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [r["step"] for r in rows(out)] == [1, 2, 3] and steps(out) == ["step-00000002"]
    with open(out / "metrics.jsonl", "a") as fh:  # killed while appending step 4's row
        fh.write('{"step": 4, "loss": 2.7')
    with pytest.warns(RuntimeWarning, match="dropping its torn last line"):
        train(config(out, resume=True, **kw))
    assert losses(out) == losses(tmp_path / "straight")


# ----------------------------------------------------------------------------------------------
# damaged checkpoints


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, to copy and damage."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finished") / "run"
    try:
        run(out, max_steps=4, save_steps=2, keep_checkpoints=2, lora_dropout=0.1, **FAST)
    finally:
        torch.set_num_threads(threads)
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_header(path):  # safetensors starts with the header's length: make it absurd, same file size
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _flip_tensor_bytes(path):  # the end of the file is tensor data: the old trainer trained on this
    flip_last_bytes(path)


DAMAGE = {
    "truncated safetensors": ("model.safetensors", _truncate, "model.safetensors has .* bytes where .* were written"),
    "bad header": ("optimizer.safetensors", _bad_header, "optimizer.safetensors does not match the sha256"),
    "truncated trainer_state.json": ("trainer_state.json", _truncate, "trainer_state.json does not read"),
    "flipped tensor bytes": ("model.safetensors", _flip_tensor_bytes, "model.safetensors does not match the sha256"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(finished, tmp_path, kind):
    name, damage, why = DAMAGE[kind]
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    damage(out / "checkpoints" / "step-00000004" / name)
    with pytest.warns(RuntimeWarning, match=f"step-00000004 is damaged \\({why}.*resuming from .*step-00000002"):
        train(config(out, max_steps=4, save_steps=2, keep_checkpoints=2, lora_dropout=0.1, resume=True, **FAST))
    # Steps 3 and 4 again from step 2: the same numbers as the first time, logged once.
    assert losses(out) == losses(finished) and len(losses(out)) == 4
    assert Checkpointer(out).choose()["path"].endswith("step-00000004")  # rewritten whole


def test_a_damaged_checkpoint_is_moved_aside_and_never_counted_among_those_kept(finished, tmp_path):
    """Steps 2 and 4, 4 damaged: the old rotation kept step-4 (damaged) and step-6 after the resumed
    run saved at 3 and 6, so damaging step 6 later left nothing intact."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    _flip_tensor_bytes(out / "checkpoints" / "step-00000004" / "model.safetensors")
    kw = dict(max_steps=6, save_steps=3, keep_checkpoints=2, lora_dropout=0.1, **FAST)
    with pytest.warns(RuntimeWarning, match="step-00000004 is damaged .* moved aside to damaged-step-00000004"):
        train(config(out, resume=True, **kw))
    assert steps(out) == ["step-00000003", "step-00000006"]
    assert (out / "checkpoints" / "damaged-step-00000004" / "model.safetensors").is_file()  # kept to look at
    _flip_tensor_bytes(out / "checkpoints" / "step-00000006" / "model.safetensors")
    with pytest.warns(RuntimeWarning, match="step-00000006 is damaged .* resuming from .*step-00000003"):
        train(config(out, resume=True, **kw))
    assert steps(out) == ["step-00000003", "step-00000006"] and len(losses(out)) == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "damaged-step-00000004", "damaged-step-00000006", "step-00000003", "step-00000006"]


def test_names_in_checkpoints_that_are_not_ours_are_ignored(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # The old trainer parsed every step-* name: "invalid literal for int()" on every resume and save.
    shutil.copytree(out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004.bak")
    (out / "checkpoints" / "step-notes.txt").write_text("x")
    kw = dict(max_steps=5, save_steps=2, keep_checkpoints=2, lora_dropout=0.1, **FAST)
    with pytest.warns(RuntimeWarning, match=r"ignoring step-00000004.bak, step-notes.txt, not checkpoints"):
        train(config(out, resume=True, **kw))
    assert steps(out) == ["step-00000004", "step-00000005"] and (out / "checkpoints" / "step-00000004.bak").is_dir()


def _as_written_before_hashes(path, cfg):
    """trainer_state.json as the trainer before hashes wrote it: no file hashes, no own hash, no
    settings or data fingerprint, only its "fingerprint" of a few settings."""
    from symmpo_fast.train.config import _OBJECTIVE_FIELDS

    doc = json.loads((path / "trainer_state.json").read_text())
    keep = ("model", "finetune", "lora_r", "lora_alpha", "lora_target_modules", "train_vision_tower", "objective",
            *_OBJECTIVE_FIELDS, "data", "max_records", "synthetic_records", "seed", "global_batch_size")
    old = {"bad_steps": doc["bad_steps"], "records_seen": doc["records_seen"], "step": doc["step"],
           "world_size": doc["world_size"], "sharded": doc["sharded"],
           "fingerprint": json.dumps({k: getattr(cfg, k) for k in keep}, sort_keys=True)}
    (path / "trainer_state.json").write_text(json.dumps(old))


def test_a_checkpoint_written_before_hashes_is_resumed_with_a_warning(tmp_path):
    # That trainer's prompt was the chat template (prompt_format did not exist; "auto" now means
    # llava_v1 for LLaVA): its run is continued with that, and "auto" is refused, named.
    kw = dict(max_steps=4, save_steps=2, keep_checkpoints=2, lora_dropout=0.1, prompt_format="chat_template", **FAST)
    finished = tmp_path / "finished"
    run(finished, **kw)
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    _as_written_before_hashes(out / "checkpoints" / "step-00000002", config(out, **kw))
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"prompt_format 'chat_template' -> 'auto'"):
        train(config(out, resume=True, **{**kw, "prompt_format": "auto"}))
    # The old check counted it damaged: "no intact checkpoint is left", the only advice --overwrite.
    unverified = pytest.warns(RuntimeWarning, match="step-00000002 was written before checkpoints carried hashes: .* "
                                                    "cannot be verified")
    with unverified, pytest.raises(ValueError, match=r"other settings \(lora_r 8 -> 4\)"):  # what it recorded
        train(config(out, resume=True, **{**kw, "lora_r": 4}))
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"other settings \(data 'synthetic' -> "
                                                                       r"'.*x.jsonl'\)"):
        train(config(out, resume=True, **{**kw, "data": str(tmp_path / "x.jsonl")}))  # its records: not comparable
    with pytest.warns(RuntimeWarning, match="step-00000002 was written before checkpoints carried hashes: .* "
                                            "cannot be verified"):
        train(config(out, resume=True, **kw))
    assert losses(out) == losses(finished)
    # Complete and readable is still checked: a truncated one is damaged.
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    _as_written_before_hashes(out / "checkpoints" / "step-00000002", config(out, **kw))
    _truncate(out / "checkpoints" / "step-00000002" / "optimizer.safetensors")
    with pytest.raises(RuntimeError, match=r"step-00000002 is damaged \(optimizer.safetensors does not read"):
        Checkpointer(out).choose()


def test_a_broken_metrics_row_stops_a_resume_before_anything_is_written(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    yaml_before = (out / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not a JSON row"):
        train(config(out, resume=True, max_steps=5, save_steps=2, lora_dropout=0.1, **FAST))
    assert (out / "config.yaml").read_bytes() == yaml_before  # the old trainer had rewritten it (max_steps: 5)


def test_every_checkpoint_damaged_stops_instead_of_starting_over(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    _flip_tensor_bytes(out / "checkpoints" / "step-00000004" / "model.safetensors")
    _truncate(out / "checkpoints" / "step-00000002" / "rng-rank0.safetensors")
    with pytest.raises(RuntimeError, match="step-00000004 is damaged.*step-00000002 is damaged.*--overwrite"):
        train(config(out, max_steps=4, save_steps=2, resume=True, **FAST))
    assert losses(out) == losses(finished)
    # The hash covers trainer_state.json itself: an edited step number is not trusted either.
    doc = json.loads((finished / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    doc["step"] = 3
    (out / "checkpoints" / "step-00000004" / "trainer_state.json").write_text(json.dumps(doc))
    with pytest.raises(RuntimeError, match="does not match its own hash"):
        Checkpointer(out).choose()


# ----------------------------------------------------------------------------------------------
# non-finite weights


def _poison_after(monkeypatch, optimizer_steps: int):
    """The optimizer writes NaN into one weight at its ``optimizer_steps``-th step."""
    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == optimizer_steps:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)


def test_non_finite_weights_are_never_checkpointed_or_exported(tmp_path, monkeypatch, capsys):
    _poison_after(monkeypatch, 2)
    out = tmp_path / "save"
    # The old trainer skipped step 3 as non-finite, saved, and exported NaN adapters with exit 0.
    with pytest.raises(RuntimeError, match="after step 2, 1 of .* trainable tensors hold NaN or inf: no checkpoint "
                                           "saved .*step-00000001"):
        train(config(out, max_steps=3, save_steps=1, **FAST))
    assert steps(out) == ["step-00000001"] and not (out / "final").exists()

    _poison_after(monkeypatch, 1)
    out = tmp_path / "train"
    with pytest.raises(RuntimeError, match="after step 2, 1 of .* hold NaN or inf: stopping"):
        train(config(out, max_steps=3, max_bad_steps=3, **FAST))
    assert [r.get("skipped", False) for r in rows(out)] == [False, True] and not (out / "final").exists()
    # The skipped step's message names its records (8 of them: global_batch_size).
    said = re.search(r"step 2: non-finite loss .* step skipped \(1 in a row\); its records: (.*)", capsys.readouterr().out)
    assert said and len(said[1].split("; ")) == 8 and all(n.startswith("synthetic:train:") for n in said[1].split("; "))


# ----------------------------------------------------------------------------------------------
# the reference cache


def test_a_reference_cache_is_verified_before_training_on_it(tmp_path):
    """One NaN row made the old trainer skip every step it fell in and exit 0, naming no record."""
    from safetensors.torch import load_file

    from symmpo_fast.train.refcache import ReferenceCache, _self_hash, precompute, write_cache

    kw = dict(max_steps=2, reference="cache", **FAST)
    out = tmp_path / "run"
    precompute(config(out, **kw))
    cache = out / "ref_cache"
    index = json.loads((cache / "index.json").read_text())
    logps = load_file(str(cache / "logps.safetensors"))["logps"]
    assert index["ids"][0].startswith("synthetic:train:") and (logps <= 0).all()
    bad = logps.clone()
    bad[3, 0] = float("nan")
    bad[5, 1] = 0.5  # a positive log-prob
    write_cache(cache, index["keys"], bad, index["fingerprint"], index["ids"])  # hashes as good as the numbers
    with pytest.raises(RuntimeError, match=rf"holds 2 record\(s\) .* \(row 3 \({index['ids'][3]}\): chosen is nan; row 5 "
                                           rf"\({index['ids'][5]}\): rejected is 0.5\).*precompute-ref"):
        train(config(out, **kw))
    assert not (out / "metrics.jsonl").exists()

    write_cache(cache, index["keys"], logps, index["fingerprint"], index["ids"])
    flip_last_bytes(cache / "logps.safetensors")
    with pytest.raises(RuntimeError, match=r"logps.safetensors does not match the size and sha256 recorded .* \(damaged\)"):
        train(config(out, **kw))
    # A cache of the trainer before hashes: its values are still checked, then it is used with a warning.
    write_cache(cache, index["keys"], logps, index["fingerprint"])
    old = {"fingerprint": index["fingerprint"], "keys": index["keys"]}
    (cache / "index.json").write_text(json.dumps(old))
    with pytest.warns(RuntimeWarning, match="written before caches carried hashes"):
        train(config(out, **kw))
    assert len(losses(out)) == 2
    edited = {**index, "keys": index["keys"][::-1]}
    edited["sha256"] = index["sha256"]
    (cache / "index.json").write_text(json.dumps(edited))
    with pytest.raises(RuntimeError, match="index.json does not match its own hash"):
        train(config(out, overwrite=True, **kw))
    assert _self_hash(index) == index["sha256"]
    # Opened directly: an old cache's values, and the shape, are checked too.
    write_cache(cache, index["keys"], bad, index["fingerprint"])
    (cache / "index.json").write_text(json.dumps(old))
    with pytest.warns(RuntimeWarning, match="before caches carried hashes"), \
            pytest.raises(RuntimeError, match=r"holds 2 record\(s\) .*row 3 \(key [0-9a-f]{16}\.\.\.\): chosen is nan"):
        ReferenceCache(cache, index["fingerprint"])
    short = {"fingerprint": index["fingerprint"], "keys": index["keys"][:-1]}
    (cache / "index.json").write_text(json.dumps(short))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"holds torch.float32 \(16, 5\), not float32 "
                                                                         r"\[15, 5\]"):
        ReferenceCache(cache, index["fingerprint"])
    (cache / "index.json").write_text(json.dumps({**short, "keys": short["keys"] + short["keys"][:1]}))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="repeats record keys"):
        ReferenceCache(cache, index["fingerprint"])


def test_a_step_whose_records_are_all_dropped_names_them(tmp_path):
    """Generated data is not length-checked when read (it is short); a max_length below its prompt
    drops every record, and the stop names this process's records instead of none."""
    with pytest.raises(RuntimeError, match=r"every record of this step was dropped by truncation \(this process's: "
                                           r"(synthetic:train:\d+; ){7}synthetic:train:\d+\): raise max_length"):
        train(config(tmp_path / "run", max_steps=1, max_length=30, **FAST))
