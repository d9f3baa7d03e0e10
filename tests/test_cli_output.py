"""The human output of every command, checked against the numbers it reports: ``train``'s summary and
progress lines against its own results.json, ``alloc``'s chart and preset list against the allocation,
``bench layers`` / ``bench trial`` tables (and their JSON) against the rows the benchmark returned."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from allocsearch import AllocationConfig
from allocsearch.cli import main

TRIAL_YAML = """\
name: human-trial
model: tiny-llama
allocation: {method: mola, experts: 2, top_k: 1, rank: 2}
data:
  tasks:
    - {name: sst2, train: 8, validation: 6, test: 5}
    - {name: arc_easy, train: 8, validation: 6, test: 5}
train: {steps: 50, batch_size: 2, max_length: 96, warmup_ratio: 0.0, lr: LR, eval_every: 2, eval_batch_size: 8}
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "220")  # rich tables on one line per row
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_main(argv, capsys):
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def cell(m: dict) -> str:
    return f"{m['accuracy']:.3f} ({m['balanced_accuracy']:.3f})"


def macro(m: dict) -> str:
    return f"{m['macro_accuracy']:.3f} ({m['macro_balanced_accuracy']:.3f})"


def table_row(out: str, first: str) -> list[str]:
    """The cells of the rich table row whose first cell is ``first``."""
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)]
        cells = [c for c in cells if c]
        if cells and cells[0] == first:
            return cells[1:]
    raise AssertionError(f"no table row {first!r} in:\n{out}")


# ----------------------------------------------------------------------------------------------- train


def run_train(tmp_path, capsys, *extra, lr="1.0e-2"):
    config = tmp_path / "trial.yaml"
    config.write_text(TRIAL_YAML.replace("LR", lr))
    out_dir = tmp_path / "out"
    code, out, err = run_main(["train", "--config", config, "--steps", "4", "--out", out_dir, "--device", "cpu",
                               "--threads", "1", *extra], capsys)
    saved = json.loads((out_dir / "results.json").read_text())
    return code, out, err, saved, out_dir


def test_train_summary_reports_what_results_json_holds(tmp_path, capsys):
    code, out, err, r, out_dir = run_train(tmp_path, capsys, "--zero-shot")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f"trial human-trial: completed  (mola, {r['trainable_params']:,} trainable of "
                        f"{r['total_params']:,} parameters)")
    assert "accuracy (balanced accuracy)" in out
    assert table_row(out, "task") == ["zero-shot test", "validation", "test"]
    zero, val, test = r["zero_shot"]["test"], r["validation"], r["test"]
    # the data are chosen so that swapped columns or cells would show: the splits and the two metrics differ
    assert any(cell(val["tasks"][t]) != cell(test["tasks"][t]) for t in ("sst2", "arc_easy"))
    assert any(m["tasks"][t]["accuracy"] != m["tasks"][t]["balanced_accuracy"] for m in (val, test)
               for t in ("sst2", "arc_easy"))
    for task in ("sst2", "arc_easy"):
        assert table_row(out, task) == [cell(zero["tasks"][task]), cell(val["tasks"][task]), cell(test["tasks"][task])]
    assert table_row(out, "macro") == [macro(zero), macro(val), macro(test)]
    peak = f"{r['peak_memory_mb']:.0f} MB {r['memory_kind']}" if r["peak_memory_mb"] else "n/a"
    assert (f"{r['steps']} steps, {r['tokens']:,} tokens, {r['seconds_per_step']:.2f} s/step, "
            f"{r['tokens_per_second']:.0f} tokens/s, wall {r['wall_seconds']:.1f} s, device-seconds "
            f"{r['device_seconds']:.1f} (cpu), peak memory {peak}") in " ".join(lines)
    assert lines[-1] == f"wrote {out_dir / 'results.json'} and {out_dir / 'adapter'}"
    assert r["steps"] == 4 and r["spec"]["train"]["steps"] == 4 and r["threads"] == 1
    assert r["spec"]["train"]["threads"] == 1 and r["spec"]["train"]["device"] == "cpu"


def test_train_progress_lines_on_stderr(tmp_path, capsys):
    code, _, err, r, _ = run_train(tmp_path, capsys, "--zero-shot")
    assert code == 0, err
    text = [re.sub(r"^\[\s*\d+\.\ds\] ", "", line) for line in err.strip().splitlines()]
    losses = dict((s, v) for s, v in r["losses"])
    ck = {c["step"]: c["metrics"] for c in r["checkpoints"]}
    assert list(ck) == [2]
    assert text == ["data", "model", "zero-shot evaluation", "training",
                    f"step 1/4 loss {losses[1]:.4f}",
                    f"step 2/4 loss {losses[2]:.4f}",
                    f"checkpoint at step 2: validation accuracy {ck[2]['macro_accuracy']:.3f} "
                    f"(balanced {ck[2]['macro_balanced_accuracy']:.3f})",
                    f"step 3/4 loss {losses[3]:.4f}",
                    f"step 4/4 loss {losses[4]:.4f}",
                    "evaluation"]


def test_train_json_is_results_json_and_the_only_stdout(tmp_path, capsys):
    code, out, err, r, _ = run_train(tmp_path, capsys, "--json", "--preset", "mola")
    assert code == 0, err
    assert json.loads(out) == r
    assert r["spec"]["allocation"] == {"preset": "mola"} and r["allocation"]["experts"] == [5] * 4
    assert r["zero_shot"] is None and "zero-shot evaluation" not in err


def test_train_summary_of_a_failed_trial(tmp_path, capsys):
    code, out, err, r, out_dir = run_train(tmp_path, capsys, lr="1.0e+30")
    assert code == 1
    assert r["status"] == "failed" and r["failure"]
    lines = out.splitlines()
    assert lines[0].startswith(f"trial human-trial: failed: {r['failure']}")
    assert "accuracy (balanced accuracy)" not in out
    assert lines[-1] == f"wrote {out_dir / 'results.json'}"


# ----------------------------------------------------------------------------------------------- alloc


def chart_rows(err: str) -> dict[int, list[str]]:
    rows = {}
    for line in err.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and len(parts) >= 5:
            rows[int(parts[0])] = parts[1:]
    return rows


def test_alloc_chart_draws_every_layer(capsys):
    code, out, err = run_main(["alloc", "--method", "mola", "--layers", "4", "--experts", "1,2,3,5",
                               "--top-k", "1,2,2,2", "--rank", "2,4,4,8"], capsys)
    assert code == 0, err
    config = AllocationConfig.from_dict(yaml.safe_load(out))
    assert err.splitlines()[0] == ("mola allocation: 4 layers, 11 experts, targets "
                                   + ",".join(config.targets))
    rows = chart_rows(err)
    assert sorted(rows) == [0, 1, 2, 3]
    for j, (n, k, r) in enumerate(zip([1, 2, 3, 5], [1, 2, 2, 2], [2, 4, 4, 8])):
        bar, *nums = rows[j]
        assert bar == "█" * k + "░" * (n - k), (j, bar)
        assert nums == [str(n), str(k), str(r)]
    assert err.splitlines()[-1] == "(█ active per token, ░ idle)"


def test_alloc_chart_marks_omoe_orthogonal_layers(capsys):
    code, _, err = run_main(["alloc", "--method", "omoe", "--layers", "6", "--experts", "2", "--top-k", "2",
                             "--option", "placement=[1,4]"], capsys)
    assert code == 0, err
    rows = chart_rows(err)
    assert [j for j, row in rows.items() if row[-1] == "orthogonal"] == [1, 4]


def test_alloc_list_presets(capsys):
    from allocsearch.allocation.methods import PRESETS

    code, out, err = run_main(["alloc", "--list-presets"], capsys)
    assert code == 0 and err == ""
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()}
    assert listed == {name: summary for name, (summary, _) in PRESETS.items()}


# ----------------------------------------------------------------------------------------------- bench


LAYER_ROWS = [
    {"shape": "32->48", "case": "LoRA r16 (peft)", "median_ms": 1.25, "reference": None, "ratio": None, "note": "",
     "tokens": 8, "device": "cpu", "dtype": "fp32", "repeats": 3},
    {"shape": "32->48", "case": "MoLA top-2 of 8, r8", "median_ms": 2.5, "reference": "LoRA r16 (peft)",
     "ratio": 2.0, "note": "target <= 1.2x", "tokens": 8, "device": "cpu", "dtype": "fp32", "repeats": 3},
    {"shape": "ffn 32x64", "case": "MixLoRA block: MoLA top-2 of 8, r8", "median_ms": 3.0,
     "reference": "MoLA top-2 of 8, r8, per-Linear", "ratio": 0.75, "also": {"LoRA r16 (peft)": 1.5},
     "note": "1 router", "tokens": 8, "device": "cpu", "dtype": "fp32", "repeats": 3},
]


def test_bench_layers_table_and_json_show_the_benchmark_rows(capsys, monkeypatch):
    import allocsearch.bench.layers as layer_bench

    import allocsearch.bench.ffn as ffn_bench

    monkeypatch.setattr(layer_bench, "run", lambda *a, **k: [dict(r) for r in LAYER_ROWS[:2]])
    monkeypatch.setattr(ffn_bench, "run", lambda *a, **k: [json.loads(json.dumps(r)) for r in LAYER_ROWS[2:]])
    code, out, err = run_main(["bench", "layers", "--tokens", "8", "--repeats", "3", "--threads", "1"], capsys)
    assert code == 0, err
    assert "allocsearch bench layers" in out and "8 tokens, cpu fp32, 1 threads, median of 3" in out
    rows = [line for line in out.splitlines() if "32->48" in line]
    assert len(rows) == 2
    first = [c.strip() for c in re.split(r"[│┃]", rows[0]) if c.strip()]
    second = [c.strip() for c in re.split(r"[│┃]", rows[1]) if c.strip()]
    assert first == ["32->48", "LoRA r16 (peft)", "1.25"]
    assert second == ["32->48", "MoLA top-2 of 8, r8", "2.50", "2.00x", "LoRA r16 (peft)", "target <= 1.2x"]
    (block,) = [line for line in out.splitlines() if "ffn 32x64" in line]
    assert [c.strip() for c in re.split(r"[│┃]", block) if c.strip()] == [
        "ffn 32x64", "MixLoRA block: MoLA top-2 of 8, r8", "3.00", "0.75x", "MoLA top-2 of 8, r8, per-Linear",
        "1 router; 1.50x vs LoRA r16 (peft)"]
    code, out, _ = run_main(["bench", "layers", "--json"], capsys)
    assert code == 0 and json.loads(out) == LAYER_ROWS


def test_bench_layers_real_run_prints_a_row_per_case(capsys):
    from allocsearch.bench import ffn
    from allocsearch.bench.layers import default_cases

    code, out, err = run_main(["bench", "layers", "--tokens", "16", "--repeats", "1", "--warmup", "0",
                               "--shape", "16x24", "--ffn", "16x32", "--threads", "1"], capsys)
    assert code == 0, err
    for shape, cases in (("16->24", default_cases()), ("ffn 16x32", ffn.default_cases())):
        rows = [line for line in out.splitlines() if shape in line]
        assert len(rows) == len(cases)
        for case, line in zip(cases, rows):
            assert case.name in line and (("x" in line.split(case.name)[1]) == bool(case.reference))
            assert ("x vs LoRA r16 (peft)" in line) == bool(case.also) == (case.also == ("LoRA r16 (peft)",))


TRIAL_ROW = {"method": "mola", "reference": "LoRA r42 (peft)",
             "moe": {"step_s": 3.294, "peak_mb": 4738.4, "train_mb": 800.2, "trainable": 12960000},
             "lora": {"step_s": 3.312, "peak_mb": 4632.0, "train_mb": 700.0, "trainable": 12821760},
             "time_ratio": 3.294 / 3.312, "peak_ratio": 4738.4 / 4632.0, "train_memory_ratio": 800.2 / 700.0,
             "params_ratio": 12960000 / 12821760, "model": "tiny-llama", "steps": 1, "rounds": 1}


def test_bench_trial_table_and_json_show_the_benchmark_rows(capsys, monkeypatch):
    import allocsearch.bench.trial as trial_bench

    monkeypatch.setattr(trial_bench, "run", lambda *a, **k: [json.loads(json.dumps(TRIAL_ROW))])
    code, out, err = run_main(["bench", "trial", "--model", "tiny-llama", "--methods", "mola", "--rounds", "1",
                               "--steps", "1"], capsys)
    assert code == 0, err
    assert "allocsearch bench trial: tiny-llama, batch 8, cpu fp32" in out
    assert table_row(out, "mola") == ["12,960,000", "3.294", "LoRA r42 (peft)", "12,821,760", "3.312", "0.99x",
                                      "1.02x (4738/4632 MB)", "1.14x (800/700 MB)"]
    code, out, _ = run_main(["bench", "trial", "--methods", "mola", "--json"], capsys)
    assert code == 0 and json.loads(out) == [TRIAL_ROW]


def test_bench_trial_table_names_the_router_scope(capsys, monkeypatch):
    import allocsearch.bench.trial as trial_bench

    rows = [{**TRIAL_ROW, "method": "graphlora", "router_scope": scope, "label": f"graphlora ({scope})",
             "reference": ref} for scope, ref in (("ffn_block", "LoRA r20 (peft)"), ("linear", "LoRA r64 (peft)"))]
    monkeypatch.setattr(trial_bench, "run", lambda *a, **k: json.loads(json.dumps(rows)))
    code, out, err = run_main(["bench", "trial", "--model", "tiny-llama", "--methods", "graphlora,graphlora:linear",
                               "--rounds", "1"], capsys)
    assert code == 0, err
    assert table_row(out, "graphlora (ffn_block)")[2] == "LoRA r20 (peft)"
    assert table_row(out, "graphlora (linear)")[2] == "LoRA r64 (peft)"
