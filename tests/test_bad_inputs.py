"""Issue 8, part 3: bad input across the CLI, tried as a new user would. Every case: a non-zero exit, at most
2 lines on stderr (one ``error:`` line naming the key / option, the expected type and the value), no traceback,
nothing on stdout, and nothing written (the output folder is never made; the working folder keeps only the
input files). Then what the fixes guarantee beyond an error: the umask's permissions on written files,
``alloc --method`` defaults, numbers as strings in JSON, the GGUF bar off a terminal, evaluation progress.
(``start`` has its own sweep in tests/test_search_cli.py.)"""
from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager

import pytest

from conftest import run_cli

# input files, written into the (empty) working folder before a case runs
FILES = {
    "train-list.yaml": "train: [1, 2]\n",
    "model-int.yaml": "model: 123\n",
    "name-up.yaml": "name: ../../x\n",
    "name-slash.yaml": "name: a/b\n",
    "name-dotdot.yaml": "name: '..'\n",
    "name-empty.yaml": "name: ''\n",
    "name-long.yaml": f"name: {'n' * 65}\n",
    "lr-abc.yaml": "train: {lr: abc}\n",
    "steps-word.yaml": "train: {steps: ten}\n",
    "schedule-int.yaml": "train: {schedule: 3}\n",
    "zero-shot-word.yaml": "train: {zero_shot: maybe}\n",
    "train-typo.yaml": "train: {stpes: 3}\n",
    "key-typo.yaml": "modle: tiny-llama\n",
    "bad.yaml": "name: [unclosed\n",
    "list.yaml": "- a\n- b\n",
    "alloc-int.yaml": "allocation: 5\n",
    "preset-nope.yaml": "allocation: {preset: nope}\n",
    "method-nope.yaml": "allocation: {method: nope, experts: 2}\n",
    "options-abc.yaml": "allocation: {method: graphlora, experts: 4, options: {edge_density: abc}}\n",
    "data-int.yaml": "data: 42\n",
    "data-task.yaml": "data: {tasks: [{name: nope, train: 1, validation: 1, test: 1}]}\n",
    "data-negative.yaml": "data: {tasks: [{name: sst2, train: -1, validation: 1, test: 1}]}\n",
    "data-empty.yaml": "data: {seed: 0, tasks: []}\n",
    "model-missing.yaml": "model: no/such/model\n",
    "lr-json.json": json.dumps({"train": {"lr": "fast"}}),
    "space-inverted.yaml": "version: 1\nmodel: tiny-llama\nmethods: {lora: {rank: {int: [8, 2]}}}\n",
    "space-block-bert.yaml": "version: 1\nmodel: minilm-l6\nmethods: {graphlora: {router_scope: ffn_block}}\n",
    "space-scope-omoe.yaml": "version: 1\nmodel: tiny-llama\nmethods: {omoe: {router_scope: ffn_block}}\n",
    "scope-bert.yaml": "model: minilm-l6\nallocation: {preset: graphlora}\n",
}

TRAIN = [  # (arguments after `train`, text the one error line must hold)
    (["--config", "train-list.yaml"], "train: expected a mapping"),
    (["--config", "model-int.yaml"], "model: expected a string"),
    (["--config", "name-up.yaml"], "name: expected 1-64 letters"),
    (["--config", "name-slash.yaml"], "'a/b'"),
    (["--config", "name-dotdot.yaml"], "name:"),
    (["--config", "name-empty.yaml"], "name:"),
    (["--config", "name-long.yaml"], "name:"),
    (["--config", "lr-abc.yaml"], "train.lr: expected a number, got 'abc'"),
    (["--config", "lr-json.json"], "train.lr: expected a number, got 'fast'"),
    (["--config", "steps-word.yaml"], "train.steps"),
    (["--config", "schedule-int.yaml"], "train.schedule: expected a string, got 3"),
    (["--config", "zero-shot-word.yaml"], "train.zero_shot: expected true or false"),
    (["--config", "train-typo.yaml"], "unknown train setting(s) ['stpes']"),
    (["--config", "key-typo.yaml"], "unknown trial key(s) ['modle']"),
    (["--config", "bad.yaml"], "is not valid YAML at line"),
    (["--config", "list.yaml"], "must be a mapping"),
    (["--config", "missing.yaml"], "missing.yaml does not exist"),
    (["--config", "."], "is a directory"),
    (["--config", "alloc-int.yaml"], "allocation must be a mapping"),
    (["--config", "preset-nope.yaml"], "unknown preset 'nope'"),
    (["--config", "method-nope.yaml"], "unknown method 'nope'"),
    (["--config", "options-abc.yaml"], "options.edge_density: expected a number, got 'abc'"),
    (["--config", "scope-bert.yaml"], "ffn_block"),
    (["--config", "data-int.yaml"], "data must be 'demo'"),
    (["--config", "data-task.yaml"], "unknown task 'nope'"),
    (["--config", "data-negative.yaml"], "train is -1"),
    (["--config", "data-empty.yaml"], "'tasks' must be a non-empty list"),
    (["--config", "model-missing.yaml"], "no/such/model"),
    (["--model", "../no/such/dir"], "no model directory"),
    (["--model", "some-org/not-cached"], "hf download some-org/not-cached"),
    (["--steps", "0"], "train.steps must be a whole number >= 1, got 0"),
    (["--steps", "abc"], "'abc' is not a valid integer"),
    (["--epochs", "-1"], "--epochs must be > 0"),
    (["--steps", "2", "--epochs", "1"], "--steps and --epochs exclude each other"),
    (["--threads", "0"], "train.threads must be >= 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--data-dir", "no/such/folder"], "--data-dir no/such/folder is not a folder"),
]

ALLOC = [  # (arguments after `alloc`, text of the one error line)
    (["--method", "graphlora", "--option", "edge_density=abc"], "options.edge_density: expected a number, got 'abc'"),
    (["--method", "graphlora", "--option", "edge_density=[1]"], "options.edge_density: expected a number"),
    (["--method", "graphlora", "--option", "gcn_hidden=1.5"], "options.gcn_hidden: expected a whole number"),
    (["--method", "mola", "--option", "bogus=1"], "unknown option(s) ['bogus']"),
    (["--method", "mola", "--option", "x"], "--option 'x' is not KEY=VALUE"),
    (["--method", "omoe", "--option", "placement=5"], "placement"),
    (["--method", "lora", "--preset", "mola"], "--method lora and --preset mola conflict"),
    (["--method", "mola", "--experts", "2", "--top-k", "3", "--layers", "2"],
     "--top-k 3: layer 0 has 2 experts but top-k 3; fix: give --top-k 2 or less"),
    (["--method", "mola", "--experts", "2,4", "--top-k", "1,5", "--layers", "2"],
     "--top-k 1,5: layer 1 has 4 experts but top-k 5; fix: give layer 1 a top-k of 4 or less"),
    (["--method", "mola", "--top-k", "0", "--layers", "2"], "top-k >= 1"),
    (["--method", "mola", "--shape", "triangle", "--total-experts", "4", "--layers", "4", "--top-k", "2"],
     "a larger --total-experts"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--layers", "4"], "give --method"),
    (["--method", "mola", "--shape", "blob"], "unknown shape 'blob'"),
    (["--method", "mola", "--shape", "0,0"], "shape weights [0, 0]"),
    (["--method", "mola", "--layers", "0"], "num_layers must be a positive integer, got 0"),
    (["--method", "mola", "--layers", "-3"], "num_layers must be a positive integer, got -3"),
    (["--method", "mola", "--layers", "abc"], "'abc' is not a valid integer"),
    (["--method", "mola", "--layers", "4", "--experts", "2,3"], "--experts has 2 values for 4 layers"),
    (["--method", "mola", "--shape", "hourglass", "--total-experts", "0"], "total_experts=0"),
    (["--method", "mola", "--rank", "0", "--layers", "2"], "nothing would train"),
    (["--method", "mola", "--targets", "zz"], "unknown target 'zz'"),
    (["--method", "mola", "--alpha", "-1"], "alpha must be > 0"),
    (["--check", "missing.yaml"], "missing.yaml does not exist"),
    (["--check", "bad.yaml"], "is not valid YAML"),
]

OTHER = [  # data specs, budgets, spaces: (full arguments, text of the one error line)
    (["data", "check", "missing.yaml"], "missing.yaml does not exist"),
    (["data", "check", "bad.yaml"], "is not valid YAML"),
    (["data", "check", "data-empty.yaml"], "'tasks' must be a non-empty list"),
    (["data", "check", "data-task.yaml"], "unknown task 'nope'"),
    (["space", "check", "space-inverted.yaml"], "range [8, 2] is inverted"),
    (["space", "check", "missing.yaml"], "not found"),
    (["space", "check", "bad.yaml"], "is not valid YAML"),
    (["start", "--budget", "banana", "--workdir", "out"], "budget 'banana'"),
    (["start", "--budget", "0cpu-h", "--workdir", "out"], "0cpu-h"),
    (["start", "--budget", "1cpu-h", "--space", "space-inverted.yaml", "--workdir", "out"], "inverted"),
    (["space", "check", "space-block-bert.yaml"], "router_scope: ffn_block needs a gated Llama-style MLP"),
    (["start", "--budget", "1cpu-h", "--space", "space-block-bert.yaml", "--workdir", "out"], "Llama-style"),
    (["start", "--budget", "1cpu-h", "--model", ".", "--workdir", "out"], "has no config.json"),  # issue 13
    (["start", "--budget", "1cpu-h", "--model", "some-org/not-cached", "--workdir", "out"],
     "hf download some-org/not-cached"),
    (["space", "check", "space-scope-omoe.yaml"], "omoe has no FFN-block form"),
    (["alloc", "--method", "omoe", "--layers", "2", "--router-scope", "ffn_block"], "router_scope ffn_block is for"),
    (["start", "--budget", "1cpu-h", "--confirm", "lots", "--workdir", "out"], "is not a share of the budget"),
    (["start", "--budget", "1cpu-h", "--confirm", "0.9", "--workdir", "out"], "--confirm 0.9"),
    (["start", "--budget", "1cpu-h", "--noise", "3", "--workdir", "out"], "--noise 3"),
    (["start", "--budget", "1cpu-h", "--prefer", "smallest", "--workdir", "out"], "Invalid value for '--prefer'"),
    (["bench", "search", "--table", "nothing"], "no benchmark table"),
    (["bench", "record", "--space", "space-inverted.yaml", "--name", "t", "--budget", "1cpu-h", "--workdir", "out",
      "--out", "out/t"], "inverted"),
    (["bench", "record", "--space", "missing.yaml", "--name", "t", "--budget", "1cpu-h", "--workdir", "out",
      "--out", "out/t"], "not found"),
    (["bench", "record", "--space", "demo", "--name", "../t", "--budget", "1cpu-h", "--workdir", "out",
      "--out", "out/t"], "table name '../t'"),
    (["status", "--study", "../x"], "study name '../x' is not allowed"),
    (["status", "--workdir", "nowhere"], "no study in nowhere"),
    (["stop", "--study", "a/b"], "study name 'a/b' is not allowed"),
    (["export", "--study", "nope", "--best", "--out", "out/b.yaml"], "no study 'nope'"),
    (["export", "--best", "--trial", "3", "--out", "out/b.yaml"], "exclude each other"),
    (["dashboard", "--port", "0"], "0 is not in the range"),
]

CASES = ([pytest.param(["train", *a, "--out", "out/run"], n, id="train " + " ".join(a)) for a, n in TRAIN]
         + [pytest.param(["alloc", *a, "--out", "out/alloc.yaml"], n, id="alloc " + " ".join(a)) for a, n in ALLOC]
         + [pytest.param(a, n, id=" ".join(a)) for a, n in OTHER])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder holding only the input files: whatever else appears was written by the CLI."""
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args, needle", CASES)
def test_bad_input_is_one_line_and_writes_nothing(capsys, workdir, args, needle):
    code, out, err = run_cli(capsys, *args)
    assert code not in (0, None), (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("error: "), err
    assert needle in err, (needle, err)
    assert out == "", out
    assert sorted(p.name for p in workdir.iterdir()) == sorted(FILES), "the CLI wrote into the working folder"


def test_every_command_is_in_the_sweep():
    """A command added to the CLI without a bad-input case turns this red (every command reads some input)."""
    from allocsearch.cli import _COMMANDS

    swept = {case.values[0][0] for case in CASES}
    assert swept == set(_COMMANDS), sorted(set(_COMMANDS) - swept)


# ----------------------------------------------------------------------------------------- permissions


@contextmanager
def umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o027, 0o640, 0o750)])
def test_atomic_writes_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    from allocsearch.allocation.config import AllocationConfig
    from allocsearch.fileio import current_umask, write_text_atomic

    with umask(mask):
        assert current_umask() == mask and os.umask(mask) == mask  # read without changing it
        write_text_atomic(tmp_path / "new" / "results.json", "{}")
        AllocationConfig.uniform("mola", 2, experts=2).save(tmp_path / "allocation.yaml")
    assert mode(tmp_path / "new" / "results.json") == file_mode and mode(tmp_path / "new") == dir_mode
    assert mode(tmp_path / "allocation.yaml") == file_mode
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["results.json"]  # no temp file left


@pytest.mark.parametrize("method", ["mola", "lora"])
def test_saved_adapters_follow_the_umask(tmp_path, method):
    from conftest import tiny_llama

    from allocsearch.allocation.config import AllocationConfig
    from allocsearch.moe.inject import inject

    adapter = inject(tiny_llama(layers=2), AllocationConfig.uniform(method, 2, experts=2 if method == "mola" else 1,
                                                                    rank=2, targets=["q", "v"]))
    with umask(0o022):
        saved = adapter.save(tmp_path / "run" / "adapter")
    items = [saved, *saved.rglob("*")]
    assert len(items) >= 4  # the folder, allocation.yaml, adapter.json and the weights
    for item in items:
        assert mode(item) == (0o755 if item.is_dir() else 0o644), item


# ----------------------------------------------------------------------------------------- what now works


def test_alloc_method_alone_builds_the_method_default(capsys, tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "alloc", "--method", "mola", "--layers", "3", "--quiet")
    config = yaml.safe_load(out)
    assert code == 0 and (config["experts"], config["top_k"], config["rank"]) == ([5] * 3, [2] * 3, [8] * 3)
    code, out, _ = run_cli(capsys, "alloc", "--method", "mola", "--preset", "mola", "--layers", "2", "--quiet")
    assert code == 0 and yaml.safe_load(out)["preset"] == "mola"  # the same method is no conflict
    code, out, _ = run_cli(capsys, "alloc", "--method", "mola", "--shape", "hourglass", "--layers", "4", "--quiet")
    assert code == 0 and yaml.safe_load(out)["top_k"] == [2] * 4  # the default top-k is capped, silently fine
    assert list(tmp_path.iterdir()) == []


def test_numbers_as_strings_are_read_where_a_float_is_expected(tmp_path):
    from allocsearch.allocation.config import AllocationConfig
    from allocsearch.training.trial import TrialSpec

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"name": "json-trial", "train": {"lr": "1e-3", "weight_decay": "0"}}))
    spec = TrialSpec.from_yaml(path)
    assert spec.train.lr == 1e-3 and spec.train.weight_decay == 0.0 and isinstance(spec.train.lr, float)
    config = AllocationConfig.uniform("graphlora", 2, experts=4, options={"edge_density": "0.2"})
    assert config.options.edge_density == 0.2


def test_gguf_conversion_bar_is_off_off_a_terminal():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from allocsearch.training.models import _gguf_progress_off_a_terminal

    from transformers.utils import logging as hf_logging

    original, bars_on = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    with _gguf_progress_off_a_terminal():  # pytest's stderr is no terminal
        assert gguf_utils.tqdm(range(3)).disable and not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled() == bars_on


def test_train_shows_evaluation_progress_and_writes_with_the_umask(capsys, tmp_path, monkeypatch):
    """One tiny real trial off a terminal: plain lines for the zero-shot and final evaluations, and the
    outputs readable by the group / others as the umask says."""
    import allocsearch.cli.train as train_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_cli, "EVAL_LINE_SECONDS", 0.0)  # every batch (the demo's: every 10 s)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"name": "tiny", "model": "tiny-llama", "allocation": {"preset": "mola"},
                                  "data": {"tasks": [{"name": "sst2", "train": 8, "validation": 4, "test": 4}]},
                                  "train": {"steps": 1, "batch_size": 4, "max_length": 64, "lr": "1e-3",
                                            "threads": 1}}))
    with umask(0o022):
        code, out, err = run_cli(capsys, "train", "--config", str(config), "--out", "run", "--zero-shot")
    assert code == 0, err
    for stage in ("zero-shot evaluation", "evaluation"):
        for split in ("validation", "test"):
            assert f"] {stage} ({split}): 0/4 examples" in err and f"] {stage} ({split}): 4/4 examples" in err, err
    assert "\r" not in err
    run = tmp_path / "run"
    assert mode(run) == 0o755 and mode(run / "results.json") == 0o644
    assert all(mode(p) == (0o755 if p.is_dir() else 0o644) for p in (run / "adapter").rglob("*"))
    assert json.loads((run / "results.json").read_text())["spec"]["train"]["lr"] == 1e-3
