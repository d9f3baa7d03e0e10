"""`start`, `status`, `stop` and `space` on bad input: one line naming the problem and the fix, exit 2, no
traceback, nothing written. Also --help examples and the status of a study made without Ray."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli

TINY = """\
version: 1
model: tiny-llama
data: {seed: 0, tasks: [{name: sst2, train: 16, validation: 8, test: 8}]}
train: {steps: 4, batch_size: 4, max_length: 64, eval_every: 2, lr: {float: [1.0e-4, 1.0e-2], log: true}}
methods: {lora: {rank: {choice: [2, 4]}}}
"""


@pytest.fixture
def tiny_space(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


BAD = [
    (["--budget", "banana"], "budget 'banana'"),
    (["--budget", "64gpu-hours"], "64gpu-hours"),
    (["--budget", "-3gpu-h"], "-3gpu-h"),
    (["--budget", "0gpu-h"], "0gpu-h"),
    (["--budget", "64gpu-h"], "needs --gpus-per-trial"),
    (["--budget", "1cpu-h", "--gpus-per-trial", "1"], "no GPU"),
    (["--budget", "1cpu-h", "--objectives", "accuracy,speed"], "objectives"),
    (["--budget", "1cpu-h", "--objectives", "params"], "objectives"),
    (["--budget", "1cpu-h", "--study", "../outside"], "study name '../outside'"),
    (["--budget", "1cpu-h", "--sampler", "grid"], "--sampler grid needs a finite space"),
    (["--budget", "1cpu-h", "--sampler", "bayes"], "Invalid value for '--sampler'"),
    (["--budget", "1cpu-h", "--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--budget", "1cpu-h", "--max-failures", "0"], "--max-failures"),
    (["--budget", "1cpu-h", "--data", "missing.yaml"], "missing.yaml"),
    (["--budget", "1cpu-h", "--data-dir", "no/such/folder"], "--data-dir"),
    (["--budget", "1cpu-h", "--space", "no-such-space"], "no-such-space"),
    (["--budget", "1cpu-h", "--model", "no/such/model"], "no/such/model"),
    (["--study", "fresh"], "give --budget"),
]


@pytest.mark.parametrize("args, needle", BAD)
def test_start_refuses_bad_input_with_one_line_and_writes_nothing(capsys, tmp_path, tiny_space, args, needle):
    work = tmp_path / "runs"
    full = ["start", "--workdir", str(work)] + args
    if "--space" not in args:
        full += ["--space", str(tiny_space)]
    code, out, err = run_cli(capsys, *full)
    assert code == 2, (out, err)
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not work.exists() or not any(work.iterdir())  # nothing half-written


def test_bad_space_files_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("rank: {choice: [2, 4]}", "rank: {int: [8, 2]}"))
    code, _, err = run_cli(capsys, "start", "--budget", "1cpu-h", "--space", str(bad), "--workdir", str(tmp_path / "w"))
    assert code == 2 and str(bad) in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "space", "check", str(bad))
    assert code == 2 and "lora.rank" in err or "rank" in err


def test_status_and_stop_without_a_study(capsys, tmp_path):
    code, _, err = run_cli(capsys, "status", "--workdir", str(tmp_path))
    assert code == 2 and "no study" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "stop", "--workdir", str(tmp_path), "--study", "nope")
    assert code == 2 and "no study 'nope'" in err


def test_corrupt_study_is_one_line(capsys, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "study.json").write_text("{not json")
    code, _, err = run_cli(capsys, "status", "--workdir", str(tmp_path), "--study", "broken")
    assert code == 2 and "corrupt" in err and err.count("\n") == 1


def _all_commands():
    import click

    from allocsearch.cli import _COMMANDS, cli

    out = []
    for name in _COMMANDS:
        cmd = cli.get_command(None, name)
        out.append((name,))
        if isinstance(cmd, click.Group):
            out += [(name, sub) for sub in cmd.list_commands(None)]
    return out


@pytest.mark.parametrize("command", _all_commands(), ids=" ".join)
def test_every_help_has_an_example(capsys, command):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0 and "Example" in out and f"allocsearch {command[0]}" in out


def test_status_of_a_study_made_without_ray(capsys, tmp_path):
    """A study whose trials were driven through the controller by hand: status text and JSON agree."""
    from test_search_controller import Clock, final, make, run_one

    clock = Clock()
    ctl = make(tmp_path, clock=clock, name="hand")
    for objective in (0.6, 0.8):
        run_one(ctl, clock, 10.0, final(objective=objective))
    code, out, _ = run_cli(capsys, "status", "--workdir", str(tmp_path), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["counts"]["completed"] == 2 and summary["best"]["value"] == 0.8 and summary["best"]["n"] == 1
    assert summary["budget"]["spent"] == pytest.approx(20.0) and summary["budget"]["total"] == 600.0
    code, out, _ = run_cli(capsys, "status", "--workdir", str(tmp_path))
    assert "2 completed" in out and "0.8000" in out and "3.3%" in out
