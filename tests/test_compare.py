"""`symmpo-fast compare`: the method table, the no-image data, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from symmpo_fast.compare import BLANK_RGB, METHODS, CompareConfig, main, train_config, warmup
from symmpo_fast.objectives import ObjectiveConfig
from symmpo_fast.train import TrainConfig
from symmpo_fast.train.loop import load_data


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ABLATIONS = {"symmpo_no_pair": "pair_weight", "symmpo_no_margin": "margin_weight",
             "symmpo_no_anchor": "anchor_weight"}


@pytest.mark.parametrize("key, weight", ABLATIONS.items())
def test_each_ablation_zeroes_one_weight_of_the_symmpo_preset(key, weight, tmp_path):
    preset = ObjectiveConfig.symmpo()
    assert getattr(preset, weight) > 0  # otherwise the ablation would remove nothing
    expected = dataclasses.replace(preset, **{weight: 0.0})
    assert METHODS[key].objective_config() == expected
    differs = [f.name for f in dataclasses.fields(preset)
               if getattr(METHODS[key].objective_config(), f.name) != getattr(preset, f.name)]
    assert differs == [weight]
    # The trainer sees the same objective through its own overrides.
    cfg = train_config(METHODS[key], 0, CompareConfig(), tmp_path / "sft", tmp_path / "run", None)
    assert cfg.objective == "symmpo" and cfg.objective_config() == expected


@pytest.mark.parametrize("key, preset", [("dpo", ObjectiveConfig.dpo()), ("dpo_noimage", ObjectiveConfig.dpo()),
                                         ("mdpo", ObjectiveConfig.mdpo()), ("symmpo", ObjectiveConfig.symmpo())])
def test_baselines_are_the_presets(key, preset, tmp_path):
    assert METHODS[key].objective_config() == preset
    cfg = train_config(METHODS[key], 1, CompareConfig(), tmp_path / "sft", tmp_path / "run", tmp_path / "blank")
    assert cfg.objective_config() == preset and cfg.seed == 1
    assert (cfg.data != "synthetic") == (key == "dpo_noimage")


def test_diagnostics_are_not_in_the_default_comparison():
    assert set(CompareConfig().methods) == {"dpo", "dpo_noimage", "mdpo", "symmpo", "symmpo_no_pair",
                                            "symmpo_no_margin", "symmpo_no_anchor"}
    assert METHODS["anchors_only"].objective_config() == ObjectiveConfig.symmpo(pair_weight=0.0, margin_weight=0.0)
    assert METHODS["symmpo_no_contrast_anchor"].objective_config() == ObjectiveConfig.symmpo(anchor_contrast=False)


def test_runs_share_everything_but_objective_data_and_seed(tmp_path):
    cfgs = [train_config(m, 0, CompareConfig(), tmp_path / "sft", tmp_path / "run", tmp_path / "blank").to_dict()
            for m in METHODS.values()]
    varying = {"objective", "data", "data_format", "pair_weight", "margin_weight", "anchor_weight", "anchor_contrast"}
    for c in cfgs[1:]:
        assert {k for k in c if c[k] != cfgs[0][k]} <= varying


def test_tiny_comparison_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main(["--output-dir", str(out), "--work-dir", str(work), "--seeds", "0", "--methods", "dpo", "dpo_noimage",
               "--steps", "2", "--batch-size", "8", "--micro-batch-size", "4", "--train-records", "16",
               "--eval-records", "8", "--sft-steps", "2", "--sft-records", "32"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"command", "seconds", "config", "synthetic", "environment", "start", "methods"} <= set(summary)
    assert "--steps 2" in summary["command"] and summary["seconds"] > 0
    assert list(summary["methods"]) == ["dpo", "dpo_noimage"]
    metrics = {"eval/accuracy/dpo", "eval/accuracy/pair_m", "eval/accuracy/pair_contrast", "eval/image_conditioning",
               "eval/hallucination_rate", "eval/answer_accuracy", "train/accuracy/dpo"}
    for entry in summary["methods"].values():
        assert [r["seed"] for r in entry["runs"]] == [0]
        assert metrics <= set(entry["runs"][0]["metrics"]) and metrics <= set(entry["stats"])
        assert set(entry["stats"]["eval/hallucination_rate"]) == {"mean", "std", "min", "max"}
        assert entry["stats"]["eval/hallucination_rate"]["std"] == 0.0
    assert summary["methods"]["dpo_noimage"]["blank_images"] and not summary["methods"]["dpo"]["blank_images"]
    table = (out / "table.md").read_text()
    assert "| DPO (no image) |" in table and "| SFT start |" in table
    assert (out / "chart.png").stat().st_size > 0

    # The warm-up is cached for the same settings and redone for others.
    said = []
    cfg = CompareConfig(sft_steps=2, sft_records=32)
    weights = (warmup(work, cfg, log=said.append) / "model.safetensors").stat().st_mtime_ns
    assert said == [f"supervised warm-up: reusing {work / 'sft'}"]
    warmup(work, dataclasses.replace(cfg, sft_steps=1), log=said.append)
    assert "reusing" not in said[1] and (work / "sft" / "model.safetensors").stat().st_mtime_ns != weights

    # What each run trained on, read back the way the trainer read it (its saved config).
    def images_and_texts(key):
        cfg = TrainConfig.from_yaml(work / "runs" / key / "seed0" / "config.yaml")
        data = load_data(cfg)
        recs = [data[i] for i in range(len(data))]
        return ([r[k] for r in recs for k in ("image", "contrast_image")],
                [(r["question"], r["chosen"], r["rejected"]) for r in recs])

    blank_images, blank_texts = images_and_texts("dpo_noimage")
    real_images, real_texts = images_and_texts("dpo")
    assert blank_texts == real_texts  # the same records in the same order; only the pictures differ
    assert len(blank_images) == 32
    for im in blank_images:  # one uniform picture, the same for every record: no information in it
        assert im.getextrema() == tuple((c, c) for c in BLANK_RGB)
    assert len({im.tobytes() for im in real_images}) == len(real_images)  # the real data's do differ


def test_every_table_row_has_the_header_cell_count():
    from symmpo_fast.compare import COLUMNS, format_table

    stats = {k: {"mean": 0.5, "std": 0.1, "min": 0.4, "max": 0.6} for k, _, _ in COLUMNS}
    summary = {"start": {k: 0.5 for k, _, _ in COLUMNS},
               "methods": {k: {"label": METHODS[k].label, "stats": stats} for k in METHODS}}
    assert any("|" in m.label for m in METHODS.values())  # the case that needs escaping exists
    rows = format_table(summary).splitlines()
    cells = {len(row.replace("\\|", "").split("|")) for row in rows}
    assert cells == {len(COLUMNS) + 3} and len(rows) == len(METHODS) + 3
