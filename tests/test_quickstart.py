"""`atlasflow quickstart`: the user's --set settings reach the pretraining run (real synth, ingest with Ray,
Ray Train), the quickstart's own store / split / run location stay its own, and a bad setting stops it
before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

from atlasflow.infra.cli import main
from atlasflow.infra.quickstart import run_quickstart


def test_a_bad_setting_names_the_field_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--set", "objective.contrast_weight=-1"]) == 2
    assert "objective.contrast_weight" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(out), "--set", "objective.no_such_setting=1"]) == 2
    assert "no_such_setting" in capsys.readouterr().err
    assert not out.exists()


def test_settings_reach_the_run_and_the_quickstart_keeps_its_store_and_split(tmp_path):
    out = tmp_path / "qs"
    s = run_quickstart(str(out), cells=600, genes=200, datasets=3, max_steps=3, skip_eval=True,
                       overrides=["objective.contrast_weight=0.2", "train.log_every=1",
                                  "data.split=''", "data.store='/nowhere'"])
    ckpt = Path(s["train"]["checkpoint"])
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["objective"]["contrast_weight"] == 0.2
    assert cfg["train"]["log_every"] == 1
    assert cfg["data"]["split"] == "train" and cfg["data"]["store"] == str(out / "store")
    assert json.loads((ckpt / "model.json").read_text())["contrast_head"] is True
    assert s["train"]["step"] == 3
    history = json.loads((ckpt / "train_state.json").read_text())["history"]
    assert any(row.get("contrast_loss") is not None for row in history)
    assert json.loads((out / "summary.json").read_text())["overrides"][0] == "objective.contrast_weight=0.2"
