"""The controller's decisions without Ray: admission under the budget, what Optuna is told for every way a
trial can end, the ledger, resume after a crash, stop requests and failure limits. Trials are simulated by
calling the controller's hooks the way the Ray executor does."""
from __future__ import annotations

import json

import pytest

from allocsearch.search.budget import Budget
from allocsearch.search.controller import Controller
from allocsearch.study.records import NOTHING_TO_TRAIN
from allocsearch.search.samplers import OUT_OF_MEMORY
from allocsearch.search.space.space import SearchSpace
from allocsearch.study.folder import CRASHED, NOT_STARTED, Study, StudyError, check_name

SPACE = {
    "version": 1, "model": "tiny-llama",
    "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 16, "validation": 8, "test": 8}]},
    "train": {"steps": 8, "batch_size": 4, "max_length": 64, "eval_every": 2, "eval_examples": 8,
              "lr": {"float": [1.0e-4, 1.0e-2], "log": True}},
    "methods": {"mola": {"experts": {"int": [2, 4]}, "top_k": {"int": [1, 2]}, "rank": {"choice": [2, 4]}},
                "lora": {"rank": {"choice": [2, 4]}}},
}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(tmp_path, budget="10cpu-min", clock=None, name="s", sampler=None, on_event=None, space=None, **settings):
    space = SearchSpace.from_dict(space or SPACE)
    base = {"name": name, "model": space.model, "data": space.data, "data_dir": None, "space": "test",
            "space_fingerprint": space.fingerprint(), "objectives": ["accuracy"],
            "budget": Budget.parse(budget).to_dict(), "seed": 0, "storage": None, "priors": True,
            "num_layers": 4, "scheduler": "asha", "cpus_per_trial": 1.0, "gpus_per_trial": 0.0,
            "max_failures": 3, "sampler": "random", "confirm": 0.0}
    base.update(settings)
    study = Study.open(tmp_path, name) if Study.exists(tmp_path, name) else Study.create(tmp_path, base, "{}")
    import optuna

    return Controller(study, space, num_layers=4, sampler=sampler or optuna.samplers.RandomSampler(seed=0),
                      clock=clock or Clock(), on_event=on_event)


def final(status="completed", objective=0.75, steps=8, failure=None, train_seconds=3.0):
    payload = {"name": "t", "status": status, "failure": failure, "stop_reason": None, "validation": None,
               "test": None, "zero_shot": None, "checkpoints": [], "losses": [], "trainable_params": 123,
               "steps": steps, "train_seconds": train_seconds}
    out = {"final": True, "step": steps, "status": status, "failure": failure, "trainable_params": 123,
           "result_json": json.dumps(payload) if status != "failed" else None}
    if objective is not None:
        out["objective"] = objective
    return out


def run_one(ctl, clock, seconds, end):
    config = ctl.propose()
    n = config.number
    ctl.on_start(n)
    clock.t += seconds
    ctl.on_complete(n, end, error=False)
    return n, config


def trials(ctl):
    return {t.number: t for t in ctl.store.trials()}


def test_priors_come_first_and_a_completed_trial_is_told_with_its_value(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock)
    labels = [label for label, _ in ctl.space.priors(4)]
    n, config = run_one(ctl, clock, 30.0, final(objective=0.8))
    t = trials(ctl)[n]
    assert t.user_attrs["prior"] == labels[0] and t.state.name == "COMPLETE" and t.values == [0.8]
    assert config.spec["name"] == f"trial-{n:04d}" and config.devices == 1.0
    assert (ctl.study.trial_dir(n) / "trial.yaml").exists()
    # the controller writes results.json from what came back through Ray when the worker could not
    assert json.loads((ctl.study.trial_dir(n) / "results.json").read_text())["steps"] == 8
    # spend: 30 s x 1 CPU, in the ledger (the study's record) and the keeper
    assert ctl.study.ledger.trial_spend() == {n: pytest.approx(30.0)}
    assert ctl.keeper.spent() == pytest.approx(30.0) and t.user_attrs["device_seconds"] == pytest.approx(30.0)
    assert ctl.cost.n_observed == 1


def test_a_pruned_trial_teaches_the_step_time_but_not_the_overhead(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock)
    overhead, step = ctl.cost.overhead_seconds, ctl.cost.step_seconds
    c = ctl.propose()
    ctl.on_start(c.number)
    clock.t += 9.0
    # stopped by the scheduler at step 4 after 2 s of training (0.5 s a step): no final evaluation ran
    ctl.on_complete(c.number, {"step": 4, "objective": 0.55, "train_seconds": 2.0}, error=False)
    assert ctl.cost.n_observed == 1 and ctl.cost.overhead_seconds == overhead  # 9 - 2 s is not a whole overhead
    method = c.spec["allocation"]["method"]
    features = {"method": method, "steps": 1, "tokens_per_step": ctl.cost.ref_tokens, "eval_examples": 8}
    assert ctl.cost.step_cost(features) == pytest.approx(0.5) and ctl.cost.step_seconds != step
    # resumed: the stored trial teaches the same
    again = make(tmp_path, clock=clock)
    assert again.cost.n_observed == 1 and again.cost.overhead_seconds == overhead
    assert again.cost.step_cost(features) == pytest.approx(0.5)


def test_every_way_a_trial_ends(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock, max_failures=10)
    # stopped by the scheduler: Tune hands the result that stopped it to on_complete (not final)
    c = ctl.propose()
    ctl.on_start(c.number)
    ctl.on_result(c.number, {"step": 2, "objective": 0.6, "train_seconds": 1.0})
    ctl.on_complete(c.number, {"step": 4, "objective": 0.55, "train_seconds": 2.0}, error=False)
    pruned = trials(ctl)[c.number]
    assert pruned.state.name == "PRUNED" and pruned.user_attrs["stop_reason"] == "scheduler"
    # the checkpoint ASHA acted on reaches Optuna: it is the pruned trial's last intermediate value and value
    assert pruned.user_attrs["objective"] == 0.55 and pruned.intermediate_values == {2: 0.6, 4: 0.55}
    assert pruned.value == 0.55
    # a trial whose run_trial failed (NaN): FAIL with its reason
    n, _ = run_one(ctl, clock, 5.0, final(status="failed", objective=None, failure="loss became nan at step 3"))
    assert trials(ctl)[n].state.name == "FAIL" and "nan" in trials(ctl)[n].user_attrs["failure"]
    # a worker that died, in Tune's order: the searcher hears of it first, the callbacks' error text after
    c = ctl.propose()
    ctl.on_start(c.number)
    ctl.on_complete(c.number, None, error=True)
    ctl.note_error(c.number, "ActorDiedError: the actor died unexpectedly | worker stderr: Segmentation fault")
    dead = trials(ctl)[c.number]
    assert dead.state.name == "FAIL" and "Segmentation fault" in dead.user_attrs["failure"]
    # stopped by its budget cap: a final report with status stopped
    n, _ = run_one(ctl, clock, 5.0, {**final(status="stopped", steps=3), "result_json": json.dumps(
        {"stop_reason": "budget", "train_seconds": 1.0, "steps": 3})})
    assert trials(ctl)[n].state.name == "PRUNED" and trials(ctl)[n].user_attrs["stop_reason"] == "budget"
    assert ctl.failures_in_row == 0


def test_failures_in_a_row_end_the_search(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock, max_failures=2)
    for _ in range(2):
        run_one(ctl, clock, 1.0, final(status="failed", objective=None, failure="ValueError: boom"))
    assert "2 trials in a row failed" in ctl.end_reason and "boom" in ctl.end_reason
    assert ctl.propose() == "finished"


def test_admission_never_overspends_and_ends_when_nothing_fits(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, budget="1cpu-min", clock=clock)  # 60 device-seconds; a tiny-llama trial ~12 s
    done = 0
    while True:
        c = ctl.propose()
        if c == "finished":
            break
        assert c is not None  # nothing runs concurrently here: a None would wait forever
        ctl.on_start(c.number)
        clock.t += min(c.cap_wall_seconds, 15.0)  # 15 s trials, unless their cap cuts them
        ctl.on_complete(c.number, final(), error=False)
        done += 1
    assert done >= 2 and "nothing more fits" in ctl.end_reason
    import re

    left, need = (float(x) for x in re.findall(r"([0-9.]+) CPU-min", ctl.end_reason))
    assert left < need, ctl.end_reason  # the reason's numbers are the ones admission compared
    assert ctl.study.ledger.spent("cpu") <= 60.0
    states = [t.user_attrs.get("state") for t in trials(ctl).values()]
    assert states.count("not_run") == 1  # the one sampled when nothing fitted is recorded, not left RUNNING
    assert not [t for t in trials(ctl).values() if t.state.name == "RUNNING"]


def test_resume_after_a_crash_fails_and_retries_once_keeps_spend(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock)
    done, _ = run_one(ctl, clock, 20.0, final(objective=0.7))
    c = ctl.propose()  # running when the controller dies
    ctl.on_start(c.number)
    clock.t += 7.0
    ctl.tick()  # heartbeat: the ledger knows 7 s of it
    waiting = ctl.propose()  # sampled, never started
    crashed, never = c.number, waiting.number
    del ctl  # kill -9: nothing else runs

    clock.t += 3600.0  # downtime costs nothing
    ctl2 = make(tmp_path, clock=clock)
    assert ctl2.recovered == {"crashed": [crashed], "not_started": [never], "retried": [crashed], "recovered": []}
    t = trials(ctl2)
    assert t[crashed].state.name == "FAIL" and t[crashed].user_attrs["failure"] == CRASHED
    assert t[never].user_attrs["failure"] == NOT_STARTED and t[done].state.name == "COMPLETE"
    assert ctl2.keeper.spent() == pytest.approx(27.0)  # 20 s done + 7 s of the crashed one
    # the queue: both configurations again (the crashed one marked as its retry), before new samples
    first, second = ctl2.propose(), ctl2.propose()
    by_number = trials(ctl2)
    assert {first.number, second.number}.isdisjoint({done, crashed, never})
    assert by_number[first.number].params == t[crashed].params or by_number[second.number].params == t[crashed].params
    retry = [n for n in (first.number, second.number) if by_number[n].user_attrs.get("retry_of") == crashed]
    assert len(retry) == 1
    # a retry that crashes again is not retried a second time
    ctl2.on_start(retry[0])
    del ctl2
    ctl3 = make(tmp_path, clock=clock)
    assert retry[0] in ctl3.recovered["crashed"] and retry[0] not in ctl3.recovered["retried"]
    numbers = [tr.number for tr in ctl3.store.trials()]
    assert len(numbers) == len(set(numbers))


def test_stop_request_ends_proposals_and_stops_running_trials(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock)
    c = ctl.propose()
    ctl.on_start(c.number)
    ctl.study.request_stop()
    clock.t += 5.0
    ctl.tick()
    assert ctl.stopping() and ctl.propose() == "finished"
    ctl.on_complete(c.number, {"step": 2, "objective": 0.5}, error=False)
    assert trials(ctl)[c.number].user_attrs["stop_reason"] == "user"
    ctl.close()
    assert not ctl.study.stop_requested() and ctl.end_reason == "stopped by 'allocsearch stop'"


def test_resume_refuses_contradicting_settings_and_shrinking_budgets(tmp_path):
    ctl = make(tmp_path)
    study = ctl.study
    with pytest.raises(StudyError, match="model"):
        study.check_resume({"model": "smollm2-135m"})
    with pytest.raises(StudyError, match="objectives"):
        study.check_resume({"objectives": ["accuracy", "params"]})
    with pytest.raises(StudyError, match="may grow but not shrink"):
        study.check_resume({"budget": Budget.parse("5cpu-min").to_dict()})
    with pytest.raises(StudyError, match="same unit"):
        study.check_resume({"budget": Budget.parse("10gpu-min").to_dict()})
    assert study.check_resume({"budget": Budget.parse("1cpu-h").to_dict()})["budget"]["seconds"] == 3600


def test_second_controller_on_a_study_is_refused(tmp_path):
    study = make(tmp_path).study
    with study.lock():
        assert study.running_pid() is not None
        with pytest.raises(StudyError, match="already being searched"):
            with study.lock():
                pass
    assert study.running_pid() is None


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "-x", "x" * 65, "a b"])
def test_study_names_never_leave_the_workdir(name):
    with pytest.raises(StudyError) as exc:
        check_name(name)
    assert "\n" not in str(exc.value)


def test_multi_objective_tells_every_value_and_status_shows_the_pareto_front(tmp_path):
    from allocsearch.reports.status import summarize

    clock = Clock()
    ctl = make(tmp_path, clock=clock, objectives=["accuracy", "params"])
    for objective, params in ((0.8, 500), (0.7, 100), (0.6, 600)):
        run_one(ctl, clock, 5.0, {**final(objective=objective), "trainable_params": params})
    assert [t.values for t in ctl.store.trials()] == [[0.8, 500], [0.7, 100], [0.6, 600]]
    summary = summarize(ctl.study.root)
    assert [t["values"] for t in summary["pareto"]] == [[0.8, 500], [0.7, 100]]  # 0.6 @ 600 is dominated


def test_a_draw_that_freezes_every_layer_is_not_run_and_marked_infeasible(tmp_path):
    """Placement: rank 0 leaves a layer group frozen; a draw with every group at 0 trains nothing, so it
    is told NOT_RUN and infeasible (the sampler learns it) before it costs anything, and the search goes on."""
    space = {**SPACE, "methods": {"lora": {"rank": {"groups": 2, "each": {"choice": [0, 2]}}}}}
    clock = Clock()
    ctl = make(tmp_path, clock=clock, space=space, priors=False, budget="60cpu-min")
    launched = []
    for _ in range(12):
        n, config = run_one(ctl, clock, 10.0, final(objective=0.7))
        launched.append(n)
        ranks = config.spec["allocation"]["rank"]
        assert any(ranks) and ranks[:2] in ([0, 0], [2, 2]) and ranks[2:] in ([0, 0], [2, 2])  # 2 groups of 2
    skipped = [t for t in ctl.store.trials() if t.number not in launched]
    assert skipped, "random draws over 2 groups x {0, 2} freeze everything about 1 time in 4"
    spent = ctl.study.ledger.trial_spend()
    for t in skipped:
        assert t.state.name == "FAIL" and t.user_attrs["state"] == "not_run"
        assert t.user_attrs["failure"] == NOTHING_TO_TRAIN and t.user_attrs["infeasible"] == 1.0
        assert t.constraints == {OUT_OF_MEMORY: 1.0}  # what Optuna's samplers read
        assert t.params["lora.rank_g0"] == t.params["lora.rank_g1"] == 0
        assert not ctl.study.trial_dir(t.number).exists() and t.number not in spent
    # a recording's next part re-queues the grid points that ran and failed, never these (they train nothing)
    from allocsearch.bench.record import _requeue_unfinished

    _requeue_unfinished(ctl.study)
    assert not [t for t in ctl.store.trials() if t.state.name == "WAITING"]
