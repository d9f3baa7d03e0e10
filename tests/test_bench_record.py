"""``allocsearch bench record`` for real (Ray, real tiny trials): a table recorded in two parts, the second
going on where the first's budget stopped it, read back by the replay's Table."""
from __future__ import annotations

import json

import yaml
from conftest import run_cli

from allocsearch.bench.table import Table

TINY = {"version": 1, "model": "tiny-llama",
        "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 16, "validation": 8, "test": 8}]},
        "train": {"steps": 4, "batch_size": 2, "max_length": 64, "eval_every": 2, "eval_examples": 4, "lr": 1.0e-2,
                  "test_at_checkpoints": True},
        "methods": {"lora": {"rank": {"choice": [1, 2, 4]}}}}


def test_a_table_is_recorded_in_parts_and_replays(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY))
    args = ["bench", "record", "--space", str(space), "--name", "tiny", "--seeds", "0,1", "--workdir",
            str(tmp_path / "runs"), "--out", str(tmp_path / "table")]
    code, out, err = run_cli(capsys, *args, "--budget", "0.1cpu-min")
    assert code == 0, err
    assert "of 6 runs (partial" in out  # a budget far too small for the grid (~5-40 s a run): partial, said so
    code, out, err = run_cli(capsys, *args, "--budget", "10cpu-min")
    assert code == 0, err
    assert "6 of 6 runs (complete)" in out
    card = json.loads((tmp_path / "table" / "card.json").read_text())
    assert card["complete"] and card["seeds"] == [0, 1] and card["configurations"] == 3 and card["model"] == "tiny-llama"
    assert card["commit"] and card["machine"]["cpus"] >= 1
    assert card["data_dir"] is None  # the study's data folder: none given, the bundled data
    table = Table.load(tmp_path / "table")
    assert sorted(table.runs) == ['{"lora.rank": 1}', '{"lora.rank": 2}', '{"lora.rank": 4}'] and table.seeds == [0, 1]
    for by in table.runs.values():
        for run in by.values():
            assert [c[0] for c in run.checkpoints] == [2] and run.steps == 4 and run.final is not None
            assert 0 < run.checkpoints[0][2] < run.device_seconds  # device-seconds to the checkpoint, then the end
            assert run.test is not None and run.trainable_params > 0
    text = (tmp_path / "table" / "table.csv").read_text().splitlines()
    checkpoint_rows = [ln for ln in text[1:] if ",2,0," in ln]
    assert len(checkpoint_rows) == 6 and all(ln.split(",")[5] != "" for ln in checkpoint_rows)  # test curve kept
    # a space with a continuous dimension cannot be tabled: one line, nothing recorded
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "lr": {"float": [1e-3, 1e-2]}}}))
    code, _, err = run_cli(capsys, "bench", "record", "--space", str(bad), "--name", "bad", "--budget", "1cpu-min",
                           "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "bad"))
    assert code != 0 and "continuous" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists() and not (tmp_path / "runs" / "bad").exists()
