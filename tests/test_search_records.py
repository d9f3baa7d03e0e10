"""What the study records when trials end in the ways a GPU box or a cluster makes them end (issue 13),
driven through the controller's hooks in Tune's real call order: dead workers, out of memory, Ctrl-C /
SIGTERM, a kill between a trial's result and Optuna's tell, a used-up grid, the cluster checks, and a
resume that keeps the stored execution settings."""
from __future__ import annotations

import json

import pytest

from test_search_controller import SPACE, Clock, final, make, run_one, trials

from allocsearch.study.folder import Study, StudyError


def test_a_dead_worker_without_a_reason_is_recorded_at_the_next_tick(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock, max_failures=10)
    c = ctl.propose()
    ctl.on_start(c.number)
    clock.t += 4.0
    ctl.on_complete(c.number, None, error=True)
    assert trials(ctl)[c.number].state.name == "RUNNING"  # waiting for Tune's callbacks to say why
    assert ctl.study.ledger.trial_spend()[c.number] == pytest.approx(0.0)  # not yet final
    clock.t += 5.0
    ctl.tick()
    t = trials(ctl)[c.number]
    assert t.state.name == "FAIL" and t.user_attrs["failure"] == "the trial's worker ended without a result"
    assert ctl.study.ledger.trial_spend()[c.number] == pytest.approx(4.0)  # charged to its end, not later


@pytest.mark.parametrize("reason, oom", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("OutOfMemoryError: MPS backend out of memory", True),
    ("RuntimeError: [enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory", True),
    ("ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.", True),
    ("ActorDiedError: The actor died unexpectedly. Potential root causes: (1) The process is killed by SIGKILL "
     "by OOM killer due to high memory usage. (2) ray stop --force is called.", False),
    ("loss became nan at step 3", False), ("ValueError: room for doom", False)])
def test_what_counts_as_out_of_memory(reason, oom):
    from allocsearch.search.bookkeeping import is_out_of_memory

    assert is_out_of_memory(reason) is oom


def test_out_of_memory_is_infeasible_not_a_crash(tmp_path):
    from allocsearch.search.samplers import infeasibility

    clock = Clock()
    ctl = make(tmp_path, clock=clock, max_failures=1)
    n, _ = run_one(ctl, clock, 3.0, final(status="failed", objective=None,
                                          failure="CUDA out of memory. Tried to allocate 2.00 GiB"))
    t = trials(ctl)[n]
    assert t.user_attrs["state"] == "oom" and t.state.name == "PRUNED" and t.value is None
    assert infeasibility(t) == [1.0] and "out of memory" in t.user_attrs["failure"]
    from allocsearch.search.samplers import reads_trial_constraints

    if reads_trial_constraints():  # Optuna 5: the constraint the bookkeeper stored is what TPE / NSGA-II read
        assert t.constraints == {"out_of_memory": 1.0}
    assert ctl.failures_in_row == 0 and ctl.end_reason is None  # --max-failures 1 did not end the search
    from allocsearch.reports.status import summarize

    row = next(r for r in summarize(ctl.study.root)["trials"] if r["number"] == n)
    assert row["state"] == "oom" and "out of memory" in row["reason"]
    # its configuration runs once more with half the batch and twice the accumulation (SPACE: batch 4)
    retry = ctl.propose()
    assert trials(ctl)[retry.number].params == t.params and trials(ctl)[retry.number].user_attrs["retry_of"] == n
    assert (retry.spec["train"]["batch_size"], retry.spec["train"]["grad_accum"]) == (2, 2)
    assert (ctl.study.trial_dir(retry.number) / "trial.yaml").read_text().count("batch_size: 2") == 1
    ctl.on_start(retry.number)
    ctl.on_complete(retry.number, final(status="failed", objective=None, failure="CUDA out of memory"), error=False)
    nxt = ctl.propose()  # the retry that ran out of memory again is not retried
    assert trials(ctl)[nxt.number].user_attrs.get("retry_of") is None


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_records_running_trials_as_stopped_by_the_user(tmp_path, signal_name):
    clock = Clock()
    ctl = make(tmp_path, clock=clock)
    admitted, a, b = ctl.propose(), ctl.propose(), ctl.propose()  # the first (a paper prior): never started
    for c in (a, b):
        ctl.on_start(c.number)
    ctl.on_result(a.number, {"step": 2, "objective": 0.61, "wall_seconds": 1.0})
    clock.t += 6.0
    ctl.interrupt(signal_name)
    assert ctl.propose() == "finished"
    ctl.close(interrupted=signal_name)  # Tune ended both workers without telling the searcher
    t = trials(ctl)
    assert t[a.number].state.name == "PRUNED" and t[a.number].user_attrs["stop_reason"] == "user"
    assert t[a.number].value == 0.61 and t[a.number].intermediate_values == {2: 0.61}
    assert t[b.number].state.name == "FAIL" and signal_name in t[b.number].user_attrs["failure"]
    assert not [x for x in t.values() if x.state.name == "RUNNING"]
    # the one stopped before any checkpoint runs again first on the next start; the other does not
    queued = {x.system_attrs["fixed_params"]["lr"]: x for x in t.values() if x.state.name == "WAITING"}
    retry = queued[t[b.number].params["lr"]]
    assert retry.user_attrs == {"retry_of": b.number}
    # the admitted, never started one (a paper prior here) is recorded not run and queued again, label kept
    never = t[admitted.number]
    assert never.user_attrs["state"] == "not_run" and len(queued) == 2 and never.user_attrs["prior"] == "MoLA 5555"
    assert queued[never.params["lr"]].user_attrs == {"prior": "MoLA 5555"}
    assert ctl.study.ledger.trial_spend() == {a.number: pytest.approx(6.0), b.number: pytest.approx(6.0)}
    assert ctl.study.ledger.finished_trials() == {a.number, b.number}
    assert signal_name in ctl.end_reason
    # interrupted again before its first checkpoint, the retry is queued again (a user's stop is no crash)
    again = make(tmp_path, clock=clock)
    first = [again.propose() for _ in range(2)]
    rerun = next(c for c in first if c.number in {x.number for x in trials(again).values()
                                                       if x.user_attrs.get("retry_of") == b.number})
    again.on_start(rerun.number)
    again.interrupt(signal_name)
    again.close(interrupted=signal_name)
    waiting = [x for x in trials(again).values() if x.state.name == "WAITING"]
    assert [x.user_attrs.get("retry_of") for x in waiting].count(rerun.number) == 1


@pytest.mark.parametrize("status", ["completed", "stopped"])
def test_a_kill_between_the_result_and_optunas_tell_loses_nothing(tmp_path, status):
    """The worker wrote results.json, the ledger has its final record, the controller died before tell."""
    clock = Clock()
    ctl = make(tmp_path, clock=clock)
    c = ctl.propose()
    n = c.number
    ctl.on_start(n)
    ctl.on_result(n, {"step": 2, "objective": 0.6, "wall_seconds": 1.0})
    clock.t += 9.0
    checkpoints = [{"step": 2, "metrics": {"macro_balanced_accuracy": 0.6}},
                   {"step": 4, "metrics": {"macro_balanced_accuracy": 0.66}}]
    result = {"status": status, "steps": 4, "checkpoints": checkpoints, "trainable_params": 321,
              "validation": {"macro_balanced_accuracy": 0.7} if status == "completed" else None,
              "stop_reason": "scheduler" if status == "stopped" else None, "train_seconds": 2.0}
    (ctl.study.trial_dir(n) / "results.json").write_text(json.dumps(result))
    ctl.study.ledger.record_trial(n, 9.0, 1.0, final=True, session=ctl.session)
    del ctl  # kill -9 here: Optuna still has the trial RUNNING

    again = make(tmp_path, clock=clock)
    t = trials(again)[n]
    assert again.recovered["recovered"] == [n] and again.recovered["retried"] == []
    if status == "completed":
        assert t.state.name == "COMPLETE" and t.value == 0.7
    else:
        assert t.state.name == "PRUNED" and t.value == 0.66 and t.intermediate_values == {2: 0.6, 4: 0.66}
    assert t.user_attrs["device_seconds"] == pytest.approx(9.0) and t.user_attrs["recovered"]
    # its configuration is not queued again: nothing is paid twice
    assert not [x for x in trials(again).values() if x.state.name == "WAITING" and x.params == t.params]


def test_a_used_up_grid_ends_the_search_cleanly(tmp_path):
    from allocsearch.search.samplers import make_sampler
    from allocsearch.search.space.space import SearchSpace
    from allocsearch.search.controller import Controller
    from allocsearch.search.budget import Budget

    grid = {**SPACE, "train": {**SPACE["train"], "lr": 1.0e-3}, "methods": {"lora": {"rank": {"choice": [2, 4]}}}}
    space = SearchSpace.from_dict(grid)
    settings = {"name": "g", "model": space.model, "data": space.data, "data_dir": None, "space": "test",
                "space_fingerprint": space.fingerprint(), "objectives": ["accuracy"],
                "budget": Budget.parse("1cpu-h").to_dict(), "seed": 0, "storage": None, "priors": False,
                "num_layers": 4, "scheduler": "asha", "cpus_per_trial": 1.0, "gpus_per_trial": 0.0,
                "max_failures": 3, "sampler": "grid", "confirm": 0.0}
    study = Study.create(tmp_path, settings, "{}")
    clock = Clock()
    ctl = Controller(study, space, num_layers=4, sampler=make_sampler("grid", 0), clock=clock)
    ranks = []
    for _ in range(2):
        n, config = run_one(ctl, clock, 5.0, final())
        ranks.append(config.spec["allocation"]["rank"][0])
    assert sorted(ranks) == [2, 4]  # no error from the sampler's Study.stop() on the last tell
    assert ctl.propose() == "finished" and ctl.end_reason == "every point of the grid has run"
    ctl.close()
    states = sorted(t.user_attrs.get("state") for t in trials(ctl).values())
    assert states == ["completed", "completed", "not_run"]


def test_multi_objective_studies_are_not_pruned_on_accuracy(tmp_path):
    assert make(tmp_path, name="one").schedule("asha")["scheduler"] == "asha"
    assert make(tmp_path, name="two", objectives=["accuracy", "params"]).schedule("asha")["scheduler"] == "none"


def test_a_cluster_that_cannot_run_a_trial_is_refused_in_one_line(tmp_path):
    from allocsearch.search.ray import nodes
    ctl = make(tmp_path, cpus_per_trial=4.0)
    two = [{"id": "a", "ip": "10.0.0.1", "cpus": 2.0, "gpus": 0.0}, {"id": "b", "ip": "10.0.0.2", "cpus": 2.0, "gpus": 0.0}]
    too_big = nodes.largest_fit(two, 4.0, 0.0)
    assert too_big and "10.0.0.2: 2 CPU" in too_big and nodes.largest_fit(two, 2.0, 0.0) is None
    with pytest.raises(StudyError, match="no node has them") as exc:
        nodes.check_cluster(ctl.study.settings, ctl.budget, 4.0, 0.0, too_big=too_big)
    assert "\n" not in str(exc.value)
    with pytest.raises(StudyError, match=r"node 10.0.0.2 lacks the data folder /data; fix"):
        nodes.check_cluster(ctl.study.settings, ctl.budget, 4.0, 0.0, lacking={"10.0.0.2": ["the data folder /data"]})
    assert nodes._missing({"here": str(tmp_path), "gone": str(tmp_path / "nope")}) == [f"gone {tmp_path / 'nope'}"]


def test_required_paths_name_the_model_folder_data_dir_and_user_files(tmp_path):
    data = {"seed": 0, "tasks": [{"name": "mine", "path": "/srv/reviews.jsonl", "test_path": "/srv/test.jsonl"}]}
    from allocsearch.search.ray.nodes import required_paths

    ctl = make(tmp_path, model="/models/llama", data_dir="/datasets", data=data)
    assert required_paths(ctl.study.settings) == {"the model folder": "/models/llama", "the data folder": "/datasets",
                                    "the data file of task mine": "/srv/reviews.jsonl",
                                    "the test file of task mine": "/srv/test.jsonl"}


def test_the_budget_travels_as_a_duration_less_the_measured_worker_start_up(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock)
    c = ctl.propose()
    assert not hasattr(c, "deadline") and c.budget_seconds < c.cap_wall_seconds
    first = c.cap_wall_seconds - c.budget_seconds
    ctl.on_start(c.number)
    clock.t += 12.0
    ctl.on_result(c.number, {"step": 2, "objective": 0.5, "wall_seconds": 2.0})  # 10 s before its clock began
    assert ctl.startup_seconds() == pytest.approx(10.0)
    d = ctl.propose()
    assert d.cap_wall_seconds - d.budget_seconds == pytest.approx(first - 3.0 + 10.0 + 0.01 * (d.cap_wall_seconds - c.cap_wall_seconds), abs=1.0)


def _space_file(tmp_path):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return str(path)


def test_a_resume_keeps_every_stored_execution_setting_it_is_not_given(tmp_path):
    from allocsearch.search.session import StartOptions, prepare

    work = str(tmp_path / "runs")
    study, *_ = prepare(StartOptions(budget="1cpu-min", space=_space_file(tmp_path), study="s", workdir=work,
                                     cpus_per_trial=2.0, scheduler="none", max_failures=7, mlflow=False,
                                     max_concurrent=1))
    before = (study.root / "study.json").read_text()
    resumed, *_ = prepare(StartOptions(budget="2cpu-min", study="s", workdir=work))  # the CLI's resume example
    s = resumed.settings
    assert (s["cpus_per_trial"], s["scheduler"], s["max_failures"], s["mlflow"], s["max_concurrent"]) == \
        (2.0, "none", 7, False, 1)
    assert s["budget"]["text"] == "2cpu-min"
    assert (study.root / "study.json").read_text() == before  # written only once the start holds the lock
    again, *_ = prepare(StartOptions(budget="2cpu-min", study="s", workdir=work, scheduler="asha"))
    assert again.settings["scheduler"] == "asha" and again.settings["cpus_per_trial"] == 2.0


@pytest.mark.parametrize("options, needle", [
    ({"gpus_per_trial": 2.0}, "a trial trains on one GPU"),
    ({"scheduler": "hyperband"}, "not offered"),
    ({"max_failures": 0}, "--max-failures >= 1"),
])
def test_a_refused_start_is_one_line_and_changes_nothing(tmp_path, options, needle):
    from allocsearch.search.session import StartOptions, prepare, run

    work = str(tmp_path / "runs")
    study, *_ = prepare(StartOptions(budget="1cpu-min", space=_space_file(tmp_path), study="s", workdir=work))
    files = {p: p.read_bytes() for p in study.root.rglob("*") if p.is_file()}
    with pytest.raises(StudyError, match=needle) as exc:
        run(StartOptions(budget="2cpu-min", study="s", workdir=work, **options))
    assert "\n" not in str(exc.value)
    assert {p: p.read_bytes() for p in study.root.rglob("*") if p.is_file()} == files
    with pytest.raises(StudyError, match=needle):  # a new study asking the same: nothing written either
        run(StartOptions(budget="1cpu-min", space=_space_file(tmp_path), study="new", workdir=work, **options))
    assert not (tmp_path / "runs" / "new").exists()


def test_a_start_refused_by_the_lock_leaves_the_stored_settings(tmp_path, monkeypatch):
    from allocsearch.search.session import StartOptions, prepare, run

    work = str(tmp_path / "runs")
    study, *_ = prepare(StartOptions(budget="1cpu-min", space=_space_file(tmp_path), study="s", workdir=work))
    before = (study.root / "study.json").read_text()
    with study.lock():
        with pytest.raises(StudyError, match="already being searched") as exc:
            run(StartOptions(budget="5cpu-min", study="s", workdir=work, cpus_per_trial=2.0))
        # the fix names the study's folder: 'allocsearch stop' would look in ./allocsearch-runs otherwise
        assert f"--workdir {study.root.parent}" in str(exc.value)
    assert (study.root / "study.json").read_text() == before
    # the running controller saves its settings between this start reading study.json and being refused the
    # lock: the refused start must not write back what it read
    from allocsearch.fileio import write_text_atomic
    from allocsearch.search.budget import Budget
    from allocsearch.study.folder import Study

    real_lock = Study.lock

    def lock_taken_meanwhile(self):
        self.settings = {**self.settings, "budget": Budget.parse("3cpu-min").to_dict()}
        write_text_atomic(self.root / "study.json", json.dumps(self.settings))
        return real_lock(self)

    monkeypatch.setattr(Study, "lock", lock_taken_meanwhile)
    with real_lock(study):
        with pytest.raises(StudyError, match="already being searched"):
            run(StartOptions(budget="5cpu-min", study="s", workdir=work, cpus_per_trial=2.0))
    assert json.loads((study.root / "study.json").read_text())["budget"]["text"] == "3cpu-min"


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_the_sampler_is_told_an_out_of_memory_trial_is_infeasible(tmp_path, name):
    """What the bookkeeper stores when a trial runs out of memory is the constraint the sampler reads (Optuna 5:
    the trial's stored constraints; Optuna 4: the constraints function), with no warning on the way: a real
    controller ends one trial out of memory and one completed, with the sampler a study of that kind uses."""
    import warnings

    from allocsearch.search.samplers import infeasibility, make_sampler, reads_trial_constraints

    objectives = ["accuracy"] if name == "tpe" else ["accuracy", "params"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation or experimental-feature warning at each start
        sampler = make_sampler(name, 0)
        clock = Clock()
        ctl = make(tmp_path, clock=clock, sampler=sampler, objectives=objectives)
        oom, _ = run_one(ctl, clock, 3.0, final(status="failed", objective=None,
                                                failure="CUDA out of memory. Tried to allocate 2.00 GiB"))
        fits, _ = run_one(ctl, clock, 3.0, final(objective=0.7))

    def violation(t):
        if not reads_trial_constraints():  # Optuna 4 asks the constraints function
            return sum(infeasibility(t))
        c = t.constraints
        return sum(max(0.0, v) for v in (c.values() if isinstance(c, dict) else c))

    frozen = trials(ctl)
    assert frozen[oom].state.name == "PRUNED" and frozen[fits].state.name == "COMPLETE"
    assert violation(frozen[oom]) == 1.0 and violation(frozen[fits]) == 0.0


def test_one_best_for_status_and_mlflow(tmp_path):
    """The best the controller names at each trial's end (what the live view and MLflow log) is status's best,
    with its mean over seeds; a tie goes to the earlier trial."""
    from allocsearch.reports.status import summarize
    from allocsearch.study.choice import best_of
    from allocsearch.study.records import TrialRecord

    rows = [TrialRecord(0, "pruned", 0.9, {"x": 0}), TrialRecord(1, "completed", 0.8, {"x": 1}),
            TrialRecord(2, "completed", 0.8, {"x": 2}), TrialRecord(3, "oom", None, {"x": 3})]
    assert best_of(rows).trial == 1 and best_of(rows[:1]) is None
    events, clock = [], Clock()
    ctl = make(tmp_path, clock=clock, on_event=lambda kind, **data: events.append((kind, data)))
    for objective in (0.7, 0.75, 0.75):
        run_one(ctl, clock, 5.0, final(objective=objective))
    named = [data["best"] for kind, data in events if kind == "finished"]
    assert [b["trial"] for b in named] == [0, 1, 1] and named[-1]["value"] == 0.75 and named[-1]["n"] == 1
    assert summarize(ctl.study.root)["best"] == named[-1]


def test_with_json_only_the_document_reaches_stdout():
    """What Ray's processes (or anything) print on file descriptor 1 during `start --json` goes to stderr."""
    import subprocess
    import sys

    code = ("import os, subprocess, sys; from allocsearch.cli.options import stdout_to_stderr\n"
            "with stdout_to_stderr():\n"
            "    os.write(1, b'(raylet) A worker died\\n'); print('progress'); subprocess.run(['echo', 'child'])\n"
            "print('{\"doc\": 1}')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == '{"doc": 1}\n' and "(raylet) A worker died" in out.stderr and "child" in out.stderr


@pytest.mark.parametrize("name", ["tpe", "random"])
def test_a_resumed_sampler_does_not_replay_the_draws_of_the_sessions_before(name):
    """Found by the reliability run: every resume seeded the sampler alike, so TPE's random start-up (and a
    random sampler) drew the configurations of the first session again: paid twice."""
    import optuna

    from allocsearch.search.samplers import make_sampler, session_seed

    study = optuna.create_study(direction="maximize")
    drawn = []
    for session in range(3):  # each session: a fresh controller, sampler and a few trials
        study.sampler = make_sampler(name, session_seed(0, session))
        for _ in range(3):
            t = study.ask()
            drawn.append((t.suggest_int("rank", 1, 64), round(t.suggest_float("lr", 1e-5, 1e-2, log=True), 12)))
            study.tell(t, 0.5)
    assert len(set(drawn)) == len(drawn)
    assert session_seed(0, 0) == 0 and len({session_seed(0, s) for s in range(50)}) == 50


def test_a_records_dict_is_asdicts_and_owns_its_containers():
    from dataclasses import asdict

    from allocsearch.study.records import TrialRecord

    r = TrialRecord(number=1, state="completed", objective=0.5, params={"lr": 1e-3}, values=[0.5],
                    experts=[2, 4], intermediate={25: 0.4})
    d = r.to_dict()
    assert d == asdict(r)
    d["params"]["lr"], d["values"][0], d["intermediate"][25] = 9.0, 9.0, 9.0
    assert r.params == {"lr": 1e-3} and r.values == [0.5] and r.intermediate == {25: 0.4}
