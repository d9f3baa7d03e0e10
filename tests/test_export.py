"""`allocsearch export`: the exported file reproduces the trial under `allocsearch train`, carries its
provenance, and every wrong use is one line."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli
from test_search_controller import Clock, final, make, run_one


@pytest.fixture
def real_study(tmp_path, one_thread):
    """A study whose trial 0 really ran (tiny-llama, in-process, as the Ray worker runs it)."""
    from allocsearch.training.trial import TrialSpec, run_trial

    clock = Clock()
    ctl = make(tmp_path, clock=clock, name="exp")
    config = ctl.propose()
    ctl.on_start(config.number)
    spec = TrialSpec.from_dict(config.spec)
    spec.train.threads = 1
    result = run_trial(spec, out_dir=config.trial_dir)
    clock.t += 10.0
    ctl.on_complete(config.number, {**final(objective=result.objective, steps=result.steps),
                                       "result_json": json.dumps(result.to_dict())}, error=False)
    return tmp_path, config.number, result


def test_exported_file_reproduces_the_trial(capsys, tmp_path, real_study):
    work, number, result = real_study
    out = tmp_path / "best.yaml"
    code, stdout, err = run_cli(capsys, "export", "--workdir", str(work), "--best", "--out", str(out))
    assert code == 0, err
    assert f"trial {number} of study exp" in stdout
    doc = yaml.safe_load(out.read_text())
    assert doc["allocsearch_export"] == 1 and doc["provenance"]["trial"] == number
    assert doc["provenance"]["objective"] == pytest.approx(result.objective)
    assert doc["allocation"]["experts"] == result.allocation["experts"]  # the complete per-layer allocation
    assert "&id" not in out.read_text()  # plain YAML, no anchors
    code, stdout, err = run_cli(capsys, "train", "--config", str(out), "--threads", "1", "--out",
                            str(tmp_path / "again"), "--json")
    assert code == 0, err
    again = json.loads(stdout)
    # same settings, seed and thread count on CPU: the same computation, so the same numbers exactly
    assert again["validation"] == result.validation and again["losses"] == [list(x) for x in result.losses]
    assert (tmp_path / "again" / "adapter" / "allocation.yaml").exists()


def test_epochs_override_sets_the_steps(capsys, tmp_path, real_study):
    work, number, _ = real_study
    out = tmp_path / "best.yaml"
    run_cli(capsys, "export", "--workdir", str(work), "--trial", str(number), "--out", str(out))
    code, stdout, err = run_cli(capsys, "train", "--config", str(out), "--threads", "1", "--epochs", "0.5",
                            "--out", str(tmp_path / "e"), "--json")
    assert code == 0, err
    spec = yaml.safe_load(out.read_text())
    examples = spec["data"]["tasks"][0]["train"]
    assert json.loads(stdout)["steps"] == -(-examples // 2 // spec["train"]["batch_size"])  # ceil(0.5 x n / b)


def test_export_errors_are_one_line(capsys, tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock, name="s")
    n, _ = run_one(ctl, clock, 1.0, final(status="failed", objective=None, failure="boom"))
    out = tmp_path / "x.yaml"
    cases = [
        (["--best"], "no completed trial"),
        (["--trial", str(n)], "is failed"),
        (["--trial", "99"], "no trial 99"),
        (["--pareto", "2"], "one objective"),
        (["--best", "--trial", "0"], "exclude each other"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(capsys, "export", "--workdir", str(tmp_path), "--out", str(out), *args)
        assert code == 2 and needle in err and err.count("\n") == 1, (args, err)
    assert not out.exists()


def test_a_file_of_another_format_version_says_so(capsys, tmp_path):
    newer = tmp_path / "newer.yaml"
    newer.write_text("allocsearch_export: 7\nmodel: tiny-llama\nallocation: {preset: lora}\n")
    code, _, err = run_cli(capsys, "train", "--config", str(newer))
    assert code == 2 and "format 7" in err and "upgrade allocsearch" in err and err.count("\n") == 1


def test_lora_winners_carry_a_peft_config(tmp_path):
    from allocsearch.reports.export import _peft_config

    cfg = _peft_config({"method": "dora", "rank": [8, 8], "alpha": 16.0, "dropout": 0.1, "targets": ["q", "v"]})
    assert cfg["r"] == 8 and cfg["use_dora"] and cfg["target_modules"] == ["q", "v"]
