"""The command line and the config: --help, YAML round trip, overrides, prepare-data, eval, plot, demo."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from symmpo_fast import cli
from symmpo_fast.synthetic import build_split
from symmpo_fast.train import TrainConfig
from symmpo_fast.train.config import add_arguments, from_args
from train_helpers import one_thread  # noqa: F401  (the fixture, used by name below)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def test_train_help_shows_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert f.metadata["help"].split(" (")[0][:30] in " ".join(text.split()), f.name


def test_config_yaml_round_trip_and_overrides(tmp_path):
    cfg = TrainConfig(model="some/model", beta=0.25, lora_target_modules=["q_proj"], anchor_contrast=False)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--learning-rate", "1e-4", "--no-progress",
                              "--lora-target-modules", "q_proj,v_proj", "--average-logps", "true", "--max-steps", "7"])
    got = from_args(args)
    assert got == dataclasses.replace(cfg, learning_rate=1e-4, progress=False, lora_target_modules=["q_proj", "v_proj"],
                                      average_logps=True, max_steps=7)
    assert got.objective_config().beta == 0.25 and got.objective_config().average_logps is True
    assert got.objective_config().pair_weight == 0.5  # the preset's, not overridden


def test_config_yaml_says_what_to_train_not_how_to_start(tmp_path):
    """A config.yaml holding overwrite: true turned a requeue script's `train --config DIR/config.yaml`
    into a silent delete-and-restart, and `--config DIR/config.yaml --resume` into an error."""
    cfg = TrainConfig(overwrite=True, max_steps=3)
    text = cfg.to_yaml(tmp_path / "c.yaml")
    assert "overwrite" not in text and "resume" not in text
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == dataclasses.replace(cfg, overwrite=False)

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (tmp_path / "old.yaml").write_text("overwrite: true\nmax_steps: 3\n")  # as the trainer before wrote them
    got = from_args(parser.parse_args(["--config", str(tmp_path / "old.yaml"), "--resume"]))
    assert got.resume and not got.overwrite and got.max_steps == 3  # the command line says how to start
    got = from_args(parser.parse_args(["--config", str(tmp_path / "old.yaml")]))
    assert got.overwrite  # a file of the user's own may say so


def test_config_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rat: 1e-5\n")
    with pytest.raises(ValueError, match="unknown config key.*learning_rat"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "lr.yaml").write_text("learning_rate: 5e-6\n")  # YAML 1.1 reads this as a string
    assert TrainConfig.from_yaml(tmp_path / "lr.yaml").learning_rate == 5e-6
    with pytest.raises(ValueError, match="finetune must be one of"):
        TrainConfig(finetune="qlora")
    with pytest.raises(ValueError, match="reference=adapter needs finetune=lora"):
        TrainConfig(finetune="full", reference="adapter")
    with pytest.raises(ValueError, match="beta"):
        TrainConfig(beta=-1.0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, says", [
    ("learning_rate", INF, "learning_rate must be a finite number, got inf"),
    ("learning_rate", NAN, "learning_rate must be a finite number, got nan"),
    ("max_records", -1, r"max_records must be >= 0 \(0: all records\), got -1"),
    ("save_steps", -1, r"save_steps must be >= 0 \(0: only at the end\)"),
    ("max_grad_norm", -1.0, r"max_grad_norm must be >= 0 \(0: no clipping\)"),
    ("max_grad_norm", NAN, "max_grad_norm must be a finite number"),
    ("lora_r", 0, "lora_r must be >= 1, got 0"),
    ("num_workers", -1, "num_workers must be >= 0"),
    ("eval_steps", -5, "eval_steps must be >= 0"),
    ("weight_decay", INF, "weight_decay must be a finite number"),
    ("warmup_ratio", NAN, "warmup_ratio must be a finite number"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\), got 1.0"),
    ("adam_beta2", -0.1, r"adam_beta2 must be in \[0, 1\)"),
    ("num_epochs", INF, "num_epochs must be a finite number"),
    ("synthetic_records", 0, "synthetic_records must be >= 1"),
    ("max_image_pixels", 0, "max_image_pixels must be >= 1"),
    ("max_image_aspect_ratio", 0.5, "max_image_aspect_ratio must be >= 1, got 0.5"),
    ("max_image_aspect_ratio", INF, "max_image_aspect_ratio must be a finite number"),
])
def test_numeric_options_are_validated_with_their_name(field, value, says):
    with pytest.raises(ValueError, match=says):
        TrainConfig(**{field: value})


def test_a_non_finite_option_on_the_command_line_stops_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    for flag, value in (("--learning-rate", "inf"), ("--max-records", "-1"), ("--lora-r", "0")):
        assert cli.main(["train", flag, value, "--output-dir", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("symmpo-fast train: error: ") and flag[2:].replace("-", "_") in err
    assert not out.exists()


def test_shipped_configs_load_and_demo_config_matches_the_demo():
    from symmpo_fast.train.demo import demo_config

    full = TrainConfig.from_yaml(ROOT / "configs" / "llava15_7b_full.yaml")
    assert (full.learning_rate, full.global_batch_size, full.lr_scheduler, full.warmup_ratio, full.max_length) == \
        (5e-6, 128, "cosine", 0.05, 2048)
    lora = TrainConfig.from_yaml(ROOT / "configs" / "llava15_7b_lora.yaml")
    assert (lora.lora_r, lora.lora_alpha) == (128, 256)
    assert set(lora.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    assert TrainConfig.from_yaml(ROOT / "configs" / "demo.yaml") == demo_config("runs/demo/symmpo", "runs/demo/sft")


def test_prepare_data_reports_and_writes(tmp_path, capsys):
    from symmpo_fast.formats import write_jsonl

    path = write_jsonl(build_split("train", 4), tmp_path / "data")
    # an mDPO-style file (no contrast image) built from the same images
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    mdpo = [{"img_path": str(path.parent / r["image"]), "prompt": "<image>\n" + r["question"], "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in rows]
    (tmp_path / "mdpo.json").write_text(json.dumps(mdpo))
    argv = ["prepare-data", str(tmp_path / "mdpo.json"), "--objective", "mdpo", "--model", "tiny"]
    assert cli.main([*argv, "--output", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == 4 and report["skipped"] == 0 and not report["has_contrast"]
    assert report["tokens_max"] > 30 and report["over_max_length_2048"] == 0
    written = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert all((tmp_path / "out" / r["mdpo_crop"]).exists() for r in written)
    # Below the longest record: truncation=right keeps it (its responses cut) and the report counts
    # it; truncation=drop makes the same records bad records (too_long), as training would.
    limit = str(report["tokens_max"] - 1)
    assert cli.main([*argv, "--max-length", limit, "--truncation", "right"]) == 0
    over = json.loads(capsys.readouterr().out)[f"over_max_length_{limit}"]
    assert over >= 1
    assert cli.main([*argv, "--max-length", limit, "--skip-bad-records"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_by_kind"] == {"too_long": over} and report["usable"] == 4 - over

    rows[1]["chosen"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["prepare-data", str(path)]) == 1
    assert f"{path}: line 2: field 'chosen' is empty" in capsys.readouterr().err
    assert cli.main(["prepare-data", str(path), "--skip-bad-records"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == 3 and report["problems"][0]["record"].endswith("line 2")


def test_eval_command(tmp_path, capsys):
    assert cli.main(["eval", "--model", "tiny", "--eval-data", "synthetic", "--synthetic-eval-records", "8",
                     "--max-length", "256", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "e.json").read_text())
    assert result["eval/records"] == 8
    assert result["eval/hallucination_rate"] + result["eval/answer_accuracy"] + result["eval/no_answer_rate"] == \
        pytest.approx(1.0)


def test_evaluation_metrics_on_known_log_probs():
    from symmpo_fast.data import PreferenceCollator
    from symmpo_fast.models import load_processor
    from symmpo_fast.train.evaluate import hallucination_metrics, logp_metrics

    data = build_split("heldout", 6)
    collator = PreferenceCollator(load_processor(), "symmpo", max_length=256)

    def logps(batch):  # y_w preferred given m; y_w given m' as likely as given m (no image use)
        return torch.tensor([[0.0, -1.0, -2.0, 0.0, -3.0]]).repeat(batch.num_records, 1)

    out = logp_metrics(logps, data, collator, batch_size=4)
    assert out == {"eval/records": 6, "eval/image_conditioning": 0.0, "eval/image_conditioning_positive": 0.0,
                   "eval/accuracy/dpo": 1.0, "eval/accuracy/pair_m": 1.0, "eval/accuracy/pair_contrast": 0.0}
    answers = [r["chosen"] for r in data.records[:3]] + [r["rejected"] for r in data.records[3:5]] + ["Hm."]
    assert hallucination_metrics(answers, data) == pytest.approx(
        {"eval/hallucination_rate": 2 / 6, "eval/answer_accuracy": 3 / 6, "eval/no_answer_rate": 1 / 6})


def test_plot_command(tmp_path, capsys):
    rows = [{"step": s, "loss": 1.0 / s, "loss/dpo": 0.5, "rewards/chosen": 0.1 * s, "accuracy/dpo": 0.5}
            for s in range(1, 5)] + [{"step": 5, "loss": None, "skipped": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert cli.main(["plot", str(tmp_path / "nope")]) == 1
    assert "nope does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "compare"])
def test_passthrough_commands_are_delegated(monkeypatch, capsys, command):
    import importlib

    real = importlib.import_module
    calls = []

    def fake(name, package=None):
        if name == f".{command}":
            raise ImportError(f"No module named 'symmpo_fast.{command}'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert cli.main([command, "--help"]) == 2
    assert f"symmpo_fast.{command}" in capsys.readouterr().err
    monkeypatch.setattr(importlib, "import_module", lambda name, package=None: type(
        "M", (), {"main": staticmethod(lambda argv: calls.append(argv) or 0)}))
    assert cli.main([command, "--x", "1"]) == 0 and calls == [["--x", "1"]]


def readme_demo_table() -> str:
    """The table of README.md's quick-start block: the fenced block that starts with the demo's
    header, up to its first blank line (the plot path and time after it are not compared)."""
    blocks = re.findall(r"^```\w*\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)
    tables = [b for b in blocks if b.lstrip().startswith("held-out, prior broken")]
    assert len(tables) == 1, "README.md must hold one demo output block"
    return tables[0].split("\n\n")[0].rstrip()


def test_the_readme_block_parses_to_the_demo_table_layout():
    """What the slow test below compares is the whole table: every row the demo prints, in order."""
    from symmpo_fast.train.demo import _ROWS, format_table

    table = readme_demo_table()
    assert [line[2:42].rstrip() for line in table.splitlines()[1:]] == [label for _, label, _ in _ROWS]
    numbers = [float(v.rstrip("%")) for line in table.splitlines()[1:] for v in line.split()[-2:]]
    ev = {"eval/records": 256}
    before = {**ev, **{f"eval/{k}": 0.5 for k, _, _ in _ROWS}}
    assert format_table(before, before) != table and len(numbers) == 12  # another run's table differs


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the README's numbers are the CPU run's (the demo trains on "
                                                      "CUDA where there is one)")
def test_the_readme_shows_what_make_demo_prints(tmp_path):
    """`make demo` (about 80 s here) against README.md's quick-start block.  When a change moves the
    numbers, run `symmpo-fast demo` and paste its table into the block: nothing else needs editing."""
    from symmpo_fast.train.demo import run_demo

    printed = []
    run_demo(tmp_path, seed=0, log=printed.append)
    table = next(chunk.strip("\n") for chunk in printed if "held-out, prior broken" in chunk)
    assert table == readme_demo_table(), f"README.md's demo block is out of date; the demo printed:\n{table}"


@pytest.mark.slow
def test_demo_quick_on_a_fixed_seed(tmp_path):
    from symmpo_fast.synthetic import PROMPT_FORMAT
    from symmpo_fast.train.demo import run_demo

    summary = run_demo(tmp_path, seed=0, quick=True, log=lambda *a: None)
    for key in ("before", "after"):
        ev = summary[key]
        assert ev["eval/records"] == 64
        assert ev["eval/hallucination_rate"] + ev["eval/answer_accuracy"] + ev["eval/no_answer_rate"] == \
            pytest.approx(1.0)
    assert summary["before"] != summary["after"]
    assert (tmp_path / "symmpo" / "metrics.png").exists() and (tmp_path / "summary.json").exists()
    # The evaluation itself is deterministic: the saved model evaluates to the same numbers again.
    from symmpo_fast.train.evaluate import evaluate
    from symmpo_fast.train.model import load_base

    model, processor = load_base(str(tmp_path / "symmpo" / "final"), 0, torch.device("cpu"), torch.float32)
    again = evaluate(model, processor, build_split("heldout", 64), batch_size=32, max_length=256,
                     prompt_format=PROMPT_FORMAT)
    assert again == pytest.approx(summary["after"])


def test_a_missing_model_directory_is_named(tmp_path, monkeypatch):
    """A path that does not exist is reported as such, not passed to the Hub as a repo id."""
    from symmpo_fast.train.model import load_base

    monkeypatch.chdir(tmp_path)  # the repository's own runs/demo/sft exists once make demo has run
    for name in ("runs/demo/sft", str(tmp_path / "nothing"), "./model"):
        with pytest.raises(FileNotFoundError, match="no such directory"):
            load_base(name, 0, torch.device("cpu"), torch.float32)
