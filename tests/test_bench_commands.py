"""``allocsearch bench signal`` (does a space have signal?) and ``allocsearch bench live`` (does the replay
tell the truth?): their numbers on synthetic scores, their plans, one real probe on tiny trials, the live
check's wiring on a synthetic table, and bad input refused in one line with nothing written."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_bench_replay import make_table
from test_cli import _isolated, assert_one_error_line, run_main  # noqa: F401 - _isolated is an autouse fixture

from allocsearch.bench import live, signal
from allocsearch.study.choice import Best
from allocsearch.study.confidence import config_key

REPO = Path(__file__).resolve().parents[1]

# two configurations of a tiny space, trained for 2 steps on a few bundled demo examples (~1 s a trial)
TINY = {"version": 1, "model": "tiny-llama",
        "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 8, "validation": 8, "test": 4}]},
        "train": {"steps": 2, "batch_size": 2, "max_length": 32, "eval_every": 2, "eval_examples": 8},
        "methods": {"lora": {"rank": {"choice": [1, 4]}}}}


def row(summary, seed, objective, noise_run=False, in_spread=False):
    return {"summary": summary, "seed": seed, "objective": objective, "noise_run": noise_run,
            "in_spread": in_spread, "seconds": 1.0}


# ------------------------------------------------------------------------------------------ signal: numbers
def test_describe_and_ratio():
    d = signal.describe([0.80, 0.82, 0.84])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.82) and d["std"] == pytest.approx(0.02)
    assert d["range"] == pytest.approx(0.04)
    assert signal.describe([0.8]) == {"n": 1, "mean": 0.8, "std": None, "range": None}
    assert signal.ratio(0.03, 0.01) == pytest.approx(3.0)
    # seeds that agreed exactly measure no noise: no ratio rather than spread / 1e-9
    assert signal.ratio(0.03, 0.0) is None and signal.ratio(None, 0.01) is None


def test_over_seeds_pools_the_noise_and_measures_each_distance_in_standard_errors():
    rows = [row("A", 0, 0.80), row("A", 1, 0.82), row("A", 2, 0.81),
            row("B", 0, 0.70), row("B", 1, 0.72), row("B", 2, 0.71),
            row("C", 0, 0.81), row("C", 1, 0.79),
            row("C", 1, 0.10),  # the same seed again counts once (its first score)
            row("D", 0, None)]  # a failed trial counts for nothing
    out = signal.over_seeds(rows)
    # A and B: std 0.01 on 2 degrees of freedom, C: 0.0141 on 1; the median rule pools A's and B's
    noise = 0.01 / math.sqrt(math.log(2))
    assert out["pooled_noise"] == pytest.approx(noise, rel=1e-6)
    assert [c["summary"] for c in out["configs"]] == ["A", "C", "B"]
    a, c, b = out["configs"]
    assert (a["n"], c["n"], b["n"]) == (3, 2, 3) and c["mean"] == pytest.approx(0.80)
    assert a["below_best_se"] == 0.0
    assert c["below_best_se"] == pytest.approx(0.01 / (noise * math.sqrt(1 / 3 + 1 / 2)), rel=1e-6)
    assert b["below_best_se"] == pytest.approx(0.10 / (noise * math.sqrt(2 / 3)), rel=1e-6)
    assert b["separated"] and not c["separated"] and not a["separated"]
    assert out["spread_of_means"] == pytest.approx(statistics.stdev([0.81, 0.80, 0.71]))
    assert out["ratio_means"] == pytest.approx(out["spread_of_means"] / noise)


def test_a_probe_whose_seeds_agree_has_no_ratio_and_no_distances():
    rows = [row("A", 0, 0.8, noise_run=True, in_spread=True), row("A", 1, 0.8, noise_run=True),
            row("B", 0, 0.7, in_spread=True), row("B", 1, 0.7)]
    out = signal.verdict(rows, every_seed=True)
    assert out["noise"]["std"] == 0.0 and out["ratio_std"] is None
    assert out["pooled_noise"] == 0.0 and out["ratio_means"] is None
    assert [c["below_best_se"] for c in out["configs"]] == [None, None]
    assert not any(c["separated"] for c in out["configs"])


def test_verdict_takes_the_noise_from_the_noise_runs_and_the_spread_from_the_others():
    rows = [row("prior", 0, 0.80, noise_run=True), row("prior", 1, 0.82, noise_run=True),
            row("prior", 2, 0.84, noise_run=True),
            row("x", 0, 0.70, in_spread=True), row("y", 0, 0.78, in_spread=True), row("z", 0, 0.86, in_spread=True),
            row("w", 0, None, in_spread=True)]
    out = signal.verdict(rows, every_seed=False)
    assert out["noise"]["std"] == pytest.approx(0.02) and out["noise"]["n"] == 3
    assert out["spread"]["std"] == pytest.approx(0.08) and out["spread"]["n"] == 3
    assert out["ratio_std"] == pytest.approx(4.0) and out["failed"] == 1 and "configs" not in out


# ------------------------------------------------------------------------------------------ signal: the plan
P, Q = {"lora.rank": 8}, {"lora.rank": 2}
SAMPLED = [{"lora.rank": 1}, {"lora.rank": 4}, {"lora.rank": 16}]


def test_the_plan_measures_the_priors_noise_and_each_sample_on_seed_0():
    label, runs = signal.plan(SAMPLED, {"MoLA": Q, "LoRA r8": P}, seeds=3)
    assert label == "LoRA r8"
    assert [(r.params, r.seed, r.noise, r.in_spread) for r in runs[:3]] == [(P, s, True, False) for s in range(3)]
    assert [(r.params, r.seed, r.in_spread) for r in runs[3:]] == [(p, 0, True) for p in SAMPLED]
    label, runs = signal.plan(SAMPLED, {"MoLA": Q}, seeds=2)  # no LoRA r8: the first prior
    assert label == "MoLA" and runs[0].params == Q


def test_a_placement_space_is_probed_on_every_configuration_that_trains():
    """3 groups x {0, 4}: 8 draws, one freezes every layer; asking for more finds exactly the other 7."""
    from allocsearch.search.space.space import SearchSpace

    space = SearchSpace.from_dict({**TINY, "methods": {"lora": {"rank": {"groups": 3, "each": {"choice": [0, 4]}}}}})
    sampled = signal.distinct_samples(space, 3, 20)
    ranks = sorted(tuple(p[f"lora.rank_g{g}"] for g in range(3)) for p in sampled)
    assert ranks == sorted({(a, b, c) for a in (0, 4) for b in (0, 4) for c in (0, 4)} - {(0, 0, 0)})


def test_noise_from_the_first_sample_runs_it_once_per_seed_also_on_every_seed():
    for every in (False, True):
        label, runs = signal.plan(SAMPLED, {"LoRA r8": P}, seeds=3, noise_from="first", every_seed=every)
        assert label == "random config 0"
        pairs = [(config_key(r.params), r.seed) for r in runs]
        assert len(pairs) == len(set(pairs)) == (3 + 2 * (3 if every else 1))  # nothing trained twice
        first = [r for r in runs if r.params == SAMPLED[0]]
        assert [(r.seed, r.noise, r.in_spread) for r in first] == [(0, True, True), (1, True, False),
                                                                   (2, True, False)]
        assert sum(r.in_spread for r in runs) == 3  # every configuration's seed-0 run, once


def test_a_prior_sampled_again_runs_once_and_counts_in_the_spread():
    _, runs = signal.plan([P, Q], {"LoRA r8": P}, seeds=2, every_seed=True)
    assert [(r.params, r.seed) for r in runs] == [(P, 0), (P, 1), (Q, 0), (Q, 1)]
    assert runs[0].in_spread and runs[0].noise and not runs[1].in_spread


# ------------------------------------------------------------------------------------------ signal: running
def _space_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_measure_saves_after_every_trial_and_reuses_an_interrupted_probe(tmp_path):
    out = tmp_path / "probe.json"
    probe = signal.prepare(str(_space_file(tmp_path)), configs=2, seeds=2, every_seed=True, out=out,
                           noise_from="first")
    assert len(probe.runs) == 4
    trained = []

    def fake(spec, data_dir):
        trained.append((spec["allocation"], spec["train"]["seed"]))
        if len(trained) == 3:
            raise KeyboardInterrupt  # the user stops the probe during its third trial
        return "completed", 0.5 + 0.1 * spec["train"]["seed"] + 0.01 * len(trained)

    with pytest.raises(KeyboardInterrupt):
        signal.measure(probe, train=fake)
    saved = json.loads(out.read_text())
    assert saved["partial"] and len(saved["rows"]) == 2 and saved["model"] == "tiny-llama"
    again = signal.prepare(str(_space_file(tmp_path)), configs=2, seeds=2, every_seed=True, out=out,
                           noise_from="first", reuse=out)
    trained.clear()
    result = signal.measure(again, train=lambda spec, d: ("completed", 0.9))
    assert [r["reused"] for r in result["rows"]] == [True, True, False, False]
    assert [r["objective"] for r in result["rows"][:2]] == [r["objective"] for r in saved["rows"]]
    assert "partial" not in json.loads(out.read_text()) and json.loads(out.read_text())["rows"] == result["rows"]


@pytest.mark.parametrize("args, needle", [
    (["--configs", "1"], "--configs 1"), (["--seeds", "1"], "--seeds 1"), (["--threads", "0"], "--threads 0"),
    (["--space", "no-such-space"], "no-such-space"), (["--reuse", "{tmp}/missing.json"], "no such file"),
    (["--reuse", "{tmp}/not-a-probe.json"], "is not a probe's output"), (["--out", "{tmp}/no/dir/x.json"], "--out"),
    (["--data-dir", "{tmp}/nowhere"], "--data-dir"), (["--configs", "x"], "'x' is not a valid integer"),
])
def test_bench_signal_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    (tmp_path / "not-a-probe.json").write_text('{"something": 1}')
    before = sorted(tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "signal.json")]
    code, stdout, err = run_main(["bench", "signal", "--space", str(_space_file(tmp_path)), *out, *args], capsys)
    assert code == 2 and stdout == ""
    line = assert_one_error_line(code, err, needle)
    assert "fix:" in line or "--help" in line
    assert sorted(tmp_path.iterdir()) == sorted({*before, tmp_path / "tiny.yaml"})  # no signal.json


def test_bench_signal_end_to_end_on_tiny_trials_then_reused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "signal.json"
    args = ["bench", "signal", "--space", _space_file(tmp_path), "--configs", "2", "--seeds", "2", "--threads", "1",
            "--every-seed", "--out", out]
    code, text, err = run_main([*args, "--json"], capsys)
    assert code == 0, err
    result = json.loads(text)
    assert result == json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 4 and {r["summary"] for r in rows} == {"lora r1", "lora r4"}
    assert {(r["summary"], r["seed"]) for r in rows} == {(s, k) for s in ("lora r1", "lora r4") for k in (0, 1)}
    assert all(r["status"] == "completed" and 0 <= r["objective"] <= 1 and not r["reused"] for r in rows)
    noise = [r["objective"] for r in rows if r["noise_run"]]
    assert len(noise) == 2 and result["noise"]["std"] == pytest.approx(statistics.stdev(noise))
    assert len(result["configs"]) == 2 and result["seconds"] > 0
    # again with --reuse: nothing trains (a trial would fail the test), the numbers are the same
    monkeypatch.setattr(signal, "_train", lambda spec, data_dir: pytest.fail("a reused run was trained again"))
    code, text, err = run_main([*args, "--reuse", out], capsys)
    assert code == 0, err
    assert "reused" in text and "SE below the best" in text and f"wrote {out}" in text
    again = json.loads(out.read_text())
    assert all(r["reused"] for r in again["rows"]) and again["noise"] == result["noise"]
    assert again["configs"] == result["configs"]


# ------------------------------------------------------------------------------------------ live: numbers
def test_compare_places_each_live_search_in_the_replays_distribution():
    dist = [0.79, 0.70, 0.72, 0.74, 0.76, 0.78, 0.71, 0.73, 0.75, 0.77]
    runs = [{"study": "live-0", "true": 0.75}, {"study": "live-1", "true": 0.85}, {"study": "live-2", "true": None}]
    out = live.compare(runs, dist)
    mean, sd = statistics.fmean(dist), statistics.pstdev(dist)
    assert out["replay"]["values"] == sorted(dist) and (out["replay"]["low"], out["replay"]["high"]) == (0.70, 0.79)
    assert out["replay"]["mean"] == pytest.approx(mean) and out["replay"]["sd"] == pytest.approx(sd)
    inside, above, nothing = out["live"]
    assert inside["inside_range"] and inside["percentile"] == pytest.approx(0.6)
    assert inside["sd_from_mean"] == pytest.approx((0.75 - mean) / sd)
    assert above["inside_range"] is False and above["percentile"] == 1.0 and above["sd_from_mean"] > 2
    assert nothing["inside_range"] is None and nothing["percentile"] is None
    assert (out["inside"], out["judged"], out["outside_table"], out["agrees"]) == (1, 2, 1, False)
    assert live.compare(runs[:1], dist)["agrees"] and not live.compare(runs[1:2], dist)["agrees"]
    assert live.compare([{"study": "x", "true": 0.70}], dist)["live"][0]["inside_range"]  # the ends are inside


def test_a_live_searchs_export_is_scored_by_the_tables_truth():
    params = {"lora.rank": 4}
    summary = {"best": Best(trial=3, value=0.83, n=2, trials=[3, 7], params=params, summary="lora r4").to_dict(),
               "trials": [{}] * 9}
    r = live.exported("live-0", summary, {config_key(params): 0.81}, 12.0, "budget spent")
    assert (r["exported"], r["true"], r["seen"], r["seen_n"], r["trials"]) == ("lora r4", 0.81, 0.83, 2, 9)
    assert live.exported("live-1", summary, {}, 1.0, None)["true"] is None  # outside the table
    nothing = live.exported("live-2", {"best": None, "trials": []}, {config_key(params): 0.81}, 1.0, "failed")
    assert nothing["exported"] is None and nothing["true"] is None


# ------------------------------------------------------------------------------------------ live: the command
def test_bench_live_replays_and_places_the_live_searches(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "table"
    table = make_table(folder)
    check = live.prepare(folder, "1cpu-min", seeds=3)
    dist = live.predicted(check)
    truth = table.truth()
    assert len(dist) == 3 and dist == sorted(dist) and all(v in truth.values() for v in dist)
    # the live searches stand in: each exports the table's configuration of the replays' median
    key = next(k for k, v in truth.items() if v == dist[1])
    calls = []

    def fake_live(check, k, workdir, on_event=None):
        calls.append((k, workdir))
        summary = {"best": Best(trial=0, value=0.9, n=1, trials=[0], params=json.loads(key)).to_dict(), "trials": []}
        return live.exported(f"live-{k}", summary, truth, 1.0, "budget spent")

    monkeypatch.setattr(live, "live_search", fake_live)
    out = tmp_path / "live.json"
    code, text, err = run_main(["bench", "live", "--table", folder, "--budget", "1cpu-min", "--live", "2", "--seeds",
                                "3", "--workdir", tmp_path / "runs", "--out", out, "--json"], capsys)
    assert code == 0, err
    result = json.loads(text)
    assert result == json.loads(out.read_text()) and [k for k, _ in calls] == [0, 1]
    assert result["replay"]["values"] == dist and result["budget"] == "1cpu-min"
    assert [r["true"] for r in result["live"]] == [dist[1], dist[1]] and result["agrees"]
    code, text, err = run_main(["bench", "live", "--table", folder, "--budget", "1cpu-min", "--live", "1", "--seeds",
                                "3", "--workdir", tmp_path / "runs"], capsys)
    assert code == 0, err
    assert "inside its range" in text and "the replay agrees: 1 of 1" in text


@pytest.mark.parametrize("args, needle", [
    (["--table", "{tmp}/nowhere"], "no benchmark table"), (["--table", "{tmp}/bare"], "not a benchmark table"),
    (["--budget", "lots"], "is not understood"), (["--budget", "10min"], "cpu budget"), (["--live", "0"], "--live 0"),
    (["--seeds", "1"], "--seeds 1"), (["--strategy", "nope"], "'nope'"), (["--out", "{tmp}/no/dir/x.json"], "--out"),
    (["--table", "{tmp}/spaceless"], "no space.yaml"), (["--seeds", "many"], "not a valid integer"),
])
def test_bench_live_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    make_table(tmp_path / "table")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "table.csv").write_text("what,ever\n1,2\n")
    make_table(tmp_path / "spaceless")
    (tmp_path / "spaceless" / "space.yaml").unlink()
    given = dict(zip(args[::2], [a.replace("{tmp}", str(tmp_path)) for a in args[1::2]]))
    argv = {"--table": str(tmp_path / "table"), "--budget": "1cpu-min", "--workdir": str(tmp_path / "runs"), **given}
    code, stdout, err = run_main(["bench", "live", *[x for kv in argv.items() for x in kv]], capsys)
    assert code == 2 and stdout == ""
    line = assert_one_error_line(code, err, needle)
    assert "fix:" in line or "--help" in line or "use a number and a unit" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------ help, imports, names
@pytest.mark.parametrize("command, needles", [
    ("signal", ["--every-seed", "--reuse", "--noise-from", "--json", "allocsearch bench signal --space"]),
    ("live", ["--table", "--budget", "--live", "--seeds", "--json", "allocsearch bench live --table"]),
])
def test_help_shows_the_options_and_examples(capsys, command, needles):
    code, text, _ = run_main(["bench", command, "--help"], capsys)
    assert code == 0 and "Examples:" in text
    for needle in needles:
        assert needle in text, needle
    code, text, _ = run_main(["bench", "--help"], capsys)
    assert code == 0 and f"  {command} " in text


def test_the_help_of_both_commands_loads_neither_torch_nor_ray():
    code = ("import sys\n"
            "from allocsearch.cli import main\n"
            "for c in ('signal', 'live'):\n"
            "    try:\n"
            "        main(['bench', c, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = [m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "print('LIGHT')\n")
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("LIGHT")


def test_user_facing_messages_name_installed_commands_not_scripts(tmp_path):
    from allocsearch.search.session import StartOptions, prepare
    from allocsearch.study.folder import StudyError

    with pytest.raises(StudyError) as exc:
        prepare(StartOptions(budget="1cpu-min", space=str(_space_file(tmp_path)), workdir=str(tmp_path / "runs"),
                             noise=2.0))
    assert "allocsearch bench signal" in str(exc.value) and "scripts/" not in str(exc.value)
    assert not (tmp_path / "runs").exists()
    removed = [f"scripts/{name}.py" for name in ("measure_signal", "replay_vs_live", "omoe_speed_before_after")]
    for path in [*(REPO / "allocsearch").rglob("*.py"), *(REPO / "tests").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert not any(name in text for name in removed), path
