"""The ``allocsearch`` command: help, ``alloc`` and ``train`` (``bench``: tests/test_bench.py).

Happy paths go through click's CliRunner on ``allocsearch.cli.cli``; exit codes and the one-line error
contract go through ``allocsearch.cli.main`` (the console-script entry point), in process with the output
captured, and once through ``python3 -m allocsearch`` in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from allocsearch import AllocationConfig
from allocsearch.cli import cli, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """main() sets a few library env vars with setdefault: undo them after each test; one torch thread
    (tiny models are fastest on one, and a busy 2-core machine makes 2 threads crawl)."""
    for var in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_main(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(argv)``; an exception escaping main fails the test."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # noqa: BLE001 - the contract is one stderr line, never a traceback
        pytest.fail(f"main({argv}) raised {type(exc).__name__}: {exc} instead of printing one 'error:' line")
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("args, needles", [
    ([], ["alloc", "bench", "train", "Usage: allocsearch"]),
    (["alloc"], ["Usage: allocsearch alloc", "--shape", "--check"]),
    (["bench"], ["Usage: allocsearch bench", "layers", "trial"]),
    (["bench", "layers"], ["Usage: allocsearch bench layers", "--tokens", "--shape"]),
    (["bench", "trial"], ["Usage: allocsearch bench trial", "--methods", "--rounds"]),
    (["train"], ["Usage: allocsearch train", "--config", "--out"]),
])
def test_help(args, needles):
    r = CliRunner().invoke(cli, [*args, "--help"], prog_name="allocsearch")
    assert r.exit_code == 0, r.output
    for needle in needles:
        assert needle in r.stdout, needle


def test_version_and_unknown_command(capsys):
    r = CliRunner().invoke(cli, ["--version"], prog_name="allocsearch")
    assert r.exit_code == 0 and "0.1.0" in r.stdout
    code, _, err = run_main(["nope"], capsys)
    assert code == 2
    assert_one_error_line(code, err, "nope")


def test_cli_import_and_alloc_do_not_load_torch():
    code = ("import sys\n"
            "import allocsearch.cli\n"
            "assert 'torch' not in sys.modules, 'import allocsearch.cli imported torch'\n"
            "from allocsearch.cli import main\n"
            "main(['alloc', '--method', 'mola', '--layers', '3', '--quiet'])\n"
            "assert 'torch' not in sys.modules, 'allocsearch alloc imported torch'\n"
            "print('NO-TORCH')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("NO-TORCH")


# ----------------------------------------------------------------------------------------------- alloc


def test_alloc_prints_valid_yaml_and_draws_on_stderr():
    r = CliRunner().invoke(cli, ["alloc", "--method", "mola", "--layers", "4", "--experts", "1,2,3,4",
                                 "--top-k", "1,2,2,2", "--rank", "4"])
    assert r.exit_code == 0, r.output
    config = AllocationConfig.from_dict(yaml.safe_load(r.stdout))
    assert (config.method, config.num_layers) == ("mola", 4)
    assert config.experts == [1, 2, 3, 4] and config.top_k == [1, 2, 2, 2] and config.rank == [4] * 4
    assert "mola allocation: 4 layers, 10 experts" in r.stderr
    assert "mola allocation" not in r.stdout


def test_alloc_hourglass_shape():
    r = CliRunner().invoke(cli, ["alloc", "--method", "mola", "--shape", "hourglass", "--layers", "8", "--quiet"])
    assert r.exit_code == 0, r.output
    config = AllocationConfig.from_dict(yaml.safe_load(r.stdout))
    # 4 groups of 2 layers, weights 4,1,1,4, 5 experts per layer on average (40)
    assert config.experts == [8, 8, 2, 2, 2, 2, 8, 8]
    assert config.top_k == [2] * 8 and config.total_experts == 40
    assert r.stderr == ""


def test_alloc_preset_options_and_out(tmp_path):
    out = tmp_path / "g.json"
    r = CliRunner().invoke(cli, ["alloc", "--method", "graphlora", "--layers", "3", "--experts", "8", "--top-k", "2",
                                 "--rank", "2", "--option", "edge_density=0.2", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and f"wrote {out}" in r.stderr
    config = AllocationConfig.from_dict(json.loads(out.read_text()))
    assert config.options.edge_density == 0.2 and config.experts == [8, 8, 8]
    r = CliRunner().invoke(cli, ["alloc", "--preset", "mixlora", "--layers", "2", "--quiet"])
    config = AllocationConfig.from_dict(yaml.safe_load(r.stdout))
    assert config.preset == "mixlora" and config.moe_targets == ["gate", "up", "down"]


def test_alloc_check(tmp_path, capsys):
    good = AllocationConfig.uniform("mola", 4, experts=3).save(tmp_path / "good.yaml")
    code, out, err = run_main(["alloc", "--check", good, "--quiet"], capsys)
    assert code == 0 and out == ""
    assert f"{good}: valid (mola, 4 layers, 12 experts)" in err

    broken = tmp_path / "broken.yaml"
    data = AllocationConfig.uniform("mola", 4, experts=3).to_dict()
    data["experts"] = [3, 3]
    broken.write_text(yaml.safe_dump(data))
    code, out, err = run_main(["alloc", "--check", broken], capsys)
    assert code == 2 and out == ""
    assert_one_error_line(code, err, str(broken), "experts has 2 entries")

    code, _, err = run_main(["alloc", "--check", tmp_path / "missing.yaml"], capsys)
    assert code == 2
    assert_one_error_line(code, err, "does not exist")


def test_alloc_check_exit_code_through_the_entry_point(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: mola\nnum_layers: 2\nexperts: [2, 2]\ntop_k: [3, 1]\nrank: [4, 4]\n")
    p = subprocess.run([sys.executable, "-m", "allocsearch", "alloc", "--check", str(broken)], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert "Traceback" not in p.stderr
    assert_one_error_line(p.returncode, p.stderr, "top_k[0] = 3")


@pytest.mark.parametrize("args, needle", [
    (["--method", "mola", "--layers", "4", "--bogus"], "--bogus"),
    (["--method", "mola", "--layers", "4", "--experts", "2,3"], "--experts has 2 values for 4 layers"),
    (["--method", "mola", "--layers", "4", "--option", "foo"], "--option 'foo' is not KEY=VALUE"),
    (["--method", "mola", "--layers", "4", "--shape", "bogus"], "unknown shape 'bogus'"),
    (["--method", "mola", "--layers", "4", "--shape", "8,2,x"], "8,2,x"),
    (["--method", "mola", "--layers", "4", "--top-k", "two"], "--top-k 'two' must be integers"),
    (["--method", "mola", "--layers", "4", "--option", "edge_density=0.2"], "edge_density"),
    (["--method", "nope", "--layers", "4"], "unknown method 'nope'"),
    (["--layers", "4"], "give --method"),
    (["--method", "mola", "--layers", "abc"], "--layers"),
    (["--preset", "bogus", "--layers", "4"], "unknown preset 'bogus'"),
])
def test_alloc_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "alloc.yaml"
    code, stdout, err = run_main(["alloc", *args, "--out", out], capsys)
    assert code == 2, (code, err)
    assert stdout == ""
    assert_one_error_line(code, err, needle)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- train


TRIAL_YAML = """\
name: cli-trial
model: no-such-model  # --model overrides it
allocation: {method: mola, experts: 2, top_k: 1, rank: 2}
data:
  tasks:
    - {name: sst2, train: 8, validation: 4, test: 2}
train: {steps: 50, batch_size: 2, max_length: 64, warmup_ratio: 0.0, lr: LR}
"""


def write_config(tmp_path, lr="1.0e-3") -> Path:
    path = tmp_path / "trial.yaml"
    path.write_text(TRIAL_YAML.replace("LR", lr))
    return path


def test_train_json(tmp_path, capsys):
    config, out_dir = write_config(tmp_path), tmp_path / "out"
    code, out, err = run_main(["train", "--config", config, "--model", "tiny-llama", "--steps", "2", "--zero-shot",
                               "--json", "--out", out_dir, "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "completed" and result["failure"] is None
    assert result["name"] == "cli-trial" and result["steps"] == 2 and len(result["losses"]) == 2
    assert result["spec"]["model"] == "tiny-llama" and result["spec"]["train"]["steps"] == 2
    assert result["zero_shot"] is not None and set(result["validation"]["tasks"]) == {"sst2"}
    assert result["tokens"] > 0 and result["device"] == "cpu"
    assert json.loads((out_dir / "results.json").read_text()) == result
    assert (out_dir / "adapter" / "allocation.yaml").is_file()


def test_train_failed_trial_exits_1(tmp_path, capsys):
    config, out_dir = write_config(tmp_path, lr="1.0e+30"), tmp_path / "out"
    code, out, err = run_main(["train", "--config", config, "--model", "tiny-llama", "--steps", "3", "--json",
                               "--out", out_dir], capsys)
    assert code == 1
    result = json.loads(out)
    assert result["status"] == "failed" and "at step" in result["failure"]
    assert json.loads((out_dir / "results.json").read_text())["status"] == "failed"


def test_train_refuses_a_non_empty_out(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, out, err = run_main(["train", "--config", write_config(tmp_path), "--model", "tiny-llama", "--steps", "1",
                               "--out", out_dir], capsys)
    assert code == 2 and out == ""
    assert_one_error_line(code, err, str(out_dir), "not empty")
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("case", ["missing-config", "bad-config", "bad-data-dir", "bad-steps"])
def test_train_bad_input_is_one_line(tmp_path, capsys, case):
    config = write_config(tmp_path)
    args = {"missing-config": ["--config", tmp_path / "nope.yaml"],
            "bad-config": ["--config", tmp_path / "bad.yaml"],
            "bad-data-dir": ["--config", config, "--data-dir", tmp_path / "nowhere"],
            "bad-steps": ["--config", config, "--steps", "0"]}[case]
    (tmp_path / "bad.yaml").write_text("modle: tiny-llama\n")
    needle = {"missing-config": "does not exist", "bad-config": "modle", "bad-data-dir": "nowhere",
              "bad-steps": "train.steps"}[case]
    out_dir = tmp_path / "out"
    code, out, err = run_main(["train", *args, "--model", "tiny-llama", "--out", out_dir], capsys)
    assert code == 2 and out == ""
    assert_one_error_line(code, err, needle)
    assert not out_dir.exists()


def test_train_error_during_the_run_ends_with_one_error_line(tmp_path, capsys):
    """Errors raised inside the trial (here: the model path) still end in an 'error:' line and exit 2;
    progress lines may precede it on stderr, a traceback may not."""
    out_dir = tmp_path / "out"
    code, out, err = run_main(["train", "--config", write_config(tmp_path), "--model", tmp_path / "no-model",
                               "--out", out_dir], capsys)
    assert code == 2 and out == ""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no-model" in last
    assert not out_dir.exists()
