"""The field's optimizers (Optuna alone, Ray Tune's ASHA, Tune + OptunaSearch, Tune's BOHB, SMAC3, Syne Tune) replayed on a recorded table:
their own objects, fed as their loops feed them, on the simulated clock and budget of the built-in
strategies (synthetic tables whose truth is known)."""
from __future__ import annotations

import pytest
from test_bench_placement import ka_table
from test_bench_replay import make_table

from allocsearch.bench import compare, peers
from allocsearch.bench.peers import PEERS, replay_peer
from allocsearch.errors import AllocsearchError
from allocsearch.study.confidence import config_key


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return make_table(tmp_path_factory.mktemp("table"))


@pytest.mark.parametrize("name", list(PEERS))
def test_a_peer_spends_its_budget_exactly_and_exports_a_configuration_it_ran(table, name):
    budget = 0.3 * table.grid_seconds()
    trace = replay_peer(table, name, budget_seconds=budget, seed=0, max_concurrent=2)
    assert trace.spent == pytest.approx(budget, rel=1e-9)  # cut at the budget, never past it
    ran = {key for key, _, _ in trace.runs}
    assert trace.final in ran and trace.trials == len(trace.runs)
    spends = [p[0] for p in trace.points]
    assert spends == sorted(spends) and spends[-1] <= budget + 1e-9
    again = replay_peer(table, name, budget_seconds=budget, seed=0, max_concurrent=2)
    assert again.runs == trace.runs and again.final == trace.final  # seeded: the same replay


@pytest.mark.parametrize("name, stops", [("optuna:tpe", False), ("optuna:tpe-hb", True), ("optuna:tpe-sh", True),
                                         ("ray:asha", True), ("ray:tpe-asha", True), ("ray:bohb", True),
                                         ("smac:mf", True), ("syne:asha", True), ("syne:bohb", True),
                                         ("syne:asha-bore", True)])
def test_pruners_and_schedulers_stop_trials_and_plain_tpe_does_not(table, name, stops, monkeypatch):
    stopped = []
    original = peers._Loop._close

    def spy(self, i, completed, stopped_=False, **kw):
        stopped.append(kw.get("stopped", stopped_))
        return original(self, i, completed, kw.get("stopped", stopped_))

    monkeypatch.setattr(peers._Loop, "_close", spy)
    replay_peer(table, name, budget_seconds=2.0 * table.grid_seconds(), seed=1)
    assert any(stopped) is stops


def test_a_tune_peer_exports_the_best_last_result_stopped_trials_included(table):
    """get_best_result(scope="last"): the highest last reported score of any trial, a stopped one too; an
    Optuna peer's best_trial counts completed trials only."""
    from allocsearch.search.space.space import SearchSpace

    space = SearchSpace.from_dict(table.space)
    tune = peers._TuneAgent(PEERS["ray:tpe-asha"], space, 4, table, seed=0)
    a, pa = tune.suggest("0")
    b, pb = tune.suggest("1")
    assert tune.report(a, 2, 0.9)  # the first result at the grace period: ASHA lets it on
    tune.stopped(a, 2, 0.9)  # then stopped (by the budget or a rung)
    tune.complete(b, 8, 0.8)
    assert tune.best() == config_key(pa) != config_key(pb)
    states = sorted(t.state.name for t in tune.searcher._ot_study.trials)
    assert states == ["COMPLETE", "COMPLETE"]  # Tune tells OptunaSearch a stopped trial completed
    optuna_peer = peers._OptunaAgent(PEERS["optuna:tpe-hb"], space, 4, table, seed=0)
    a, pa = optuna_peer.suggest("0")
    b, pb = optuna_peer.suggest("1")
    optuna_peer.report(a, 2, 0.9)
    optuna_peer.stopped(a, 2, 0.9)
    optuna_peer.complete(b, 8, 0.8)
    assert optuna_peer.best() == config_key(pb)


def test_draws_that_train_nothing_are_not_trials_and_cost_nothing(tmp_path):
    table = ka_table(tmp_path / "ka", (-0.03, 0.2, -0.03))
    for name in PEERS:
        for seed in range(5):
            trace = replay_peer(table, name, budget_seconds=table.grid_seconds(), seed=seed)
            assert trace.runs and all(key in table.runs for key, _, _ in trace.runs)
            assert all(exported is None or exported in table.runs for _, exported, _ in trace.points)


def test_smac_never_exports_a_draw_that_trains_nothing_on_a_recorded_known_answer_table():
    """SMAC's incumbent was the all-frozen draw (told crashed, nothing else at the top budget yet) on seed 3
    at 10% of benchmarks/ka-middle's grid."""
    from pathlib import Path

    from allocsearch.bench.table import Table

    table = Table.load(Path(__file__).resolve().parents[1] / "benchmarks" / "ka-middle")
    trace = replay_peer(table, "smac:mf", budget_seconds=0.1 * table.grid_seconds(), seed=3, max_concurrent=2)
    assert trace.points and all(e is None or e in table.runs for _, e, _ in trace.points)


def test_peers_are_strategies_of_bench_search_and_a_missing_package_is_one_line(table, monkeypatch):
    assert compare.parse_strategies("default,optuna:tpe-hb,ray:asha") == ["default", "optuna:tpe-hb", "ray:asha"]
    with pytest.raises(AllocsearchError, match="hyperopt:tpe unknown"):
        compare.parse_strategies("default,hyperopt:tpe")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ray.tune" else real(n, *a))
    with pytest.raises(peers.PeerError, match=r"ray.tune is not installed; fix: pip install 'allocsearch\[peers\]'"):
        compare.parse_strategies("ray:asha")
    result = compare.run(table, ["optuna:tpe", "default"], [0.25], 2)
    assert {r["strategy"]: r["confirm_reserve"] for r in result["rows"]} == {"optuna:tpe": 0.0, "default": 0.2}


def test_smac_running_out_of_configurations_ends_its_search_without_an_error(table, monkeypatch):
    """SMAC's ask raised StopIteration (its trial generator ended) in a 100-replay suite: the peer stops
    starting trials there, as on ConfigurationSpaceExhaustedException."""
    from allocsearch.bench.peer_smac import SmacAgent
    from allocsearch.search.space.space import SearchSpace

    agent = SmacAgent(PEERS["smac:mf"], SearchSpace.from_dict(table.space), 4, table, seed=0)

    def ended():
        raise StopIteration

    monkeypatch.setattr(agent.smac, "ask", ended)
    assert agent.suggest("0") is None


class _PausingAgent:
    """Pauses its one trial at its first checkpoint, resumes it at the next ask, then lets it finish."""

    def __init__(self, params):
        self.params, self.handle, self.calls = params, object(), []

    def suggest(self, trial_id):
        self.calls.append("suggest")
        if self.calls.count("suggest") == 1:
            return self.handle, self.params
        if "pause" in self.calls and "resume" not in self.calls:
            self.calls.append("resume")
            return peers.Resume(self.handle)
        return None

    def report(self, handle, step, value):
        if step == 2 and "pause" not in self.calls:
            self.calls.append("pause")
            return peers.PAUSE
        if step == 2:
            raise AssertionError("a resumed trial reported its paused checkpoint again")
        self.calls.append(("report", step))
        return True

    def complete(self, handle, step, value):
        self.calls.append(("complete", step))

    def best(self):
        return config_key(self.params) if ("complete", 8) in self.calls else None


def test_a_paused_trial_spends_nothing_and_resumes_from_its_checkpoint(table, monkeypatch):
    """Pause and resume (Tune's HyperBandForBOHB): the trial is charged its recorded device-seconds once, its
    reports go on from the checkpoint after the pause, and it counts as one trial."""
    params = {"method": "lora", "lora.rank": 4, "lr": 1e-3}
    agent = _PausingAgent(params)
    monkeypatch.setattr(peers, "_OptunaAgent", lambda *a, **k: agent)
    trace = replay_peer(table, "optuna:tpe", budget_seconds=1e6, seed=0)
    run = table.run(params, trace.runs[0][1])
    assert agent.calls[:4] == ["suggest", "pause", "suggest", "resume"]
    assert [c for c in agent.calls if c != "suggest"] == ["pause", "resume", ("report", 4), ("report", 6),
                                                          ("complete", 8)]
    assert trace.spent == pytest.approx(run.device_seconds, rel=1e-12)  # paused: no spend; resumed: the rest
    assert trace.trials == 1 and trace.final == config_key(params)


def test_ray_bohb_pauses_and_resumes_trials_and_leaves_numpys_global_generator_alone(table, monkeypatch):
    """Ray's HyperBandForBOHB over TuneBOHB: a bracket's trials pause at its milestone, the better are resumed
    where they paused (a trial's reported steps only grow), the rest stopped; hpbandster's draws from
    numpy's global generator do not move the caller's."""
    import numpy as np

    from allocsearch.bench import peer_bohb

    seen: dict[str, list[int]] = {}
    events = []
    report = peer_bohb.BohbAgent.report

    def spy(self, trial, step, value):
        seen.setdefault(trial.trial_id, []).append(step)
        decision = report(self, trial, step, value)
        events.append(decision)
        return decision

    monkeypatch.setattr(peer_bohb.BohbAgent, "report", spy)
    resumed = []
    original = peers._Loop._resume
    monkeypatch.setattr(peers._Loop, "_resume", lambda self, h: (resumed.append(h.trial_id), original(self, h)))
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    ever_resumed = 0
    for seed in range(4):
        seen.clear(), resumed.clear()
        replay_peer(table, "ray:bohb", budget_seconds=1.5 * table.grid_seconds(), seed=seed, max_concurrent=2)
        for trial_id in resumed:  # on from the checkpoint after its pause, never a step again
            assert seen[trial_id] == sorted(set(seen[trial_id])) and len(seen[trial_id]) > 1
        ever_resumed += len(resumed)
    assert (np.random.get_state()[1] == state).all()
    assert peers.PAUSE in events and False in events and ever_resumed


def test_a_missing_hpbandster_names_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "hpbandster" else real(n, *a))
    with pytest.raises(peers.PeerError, match=r"ray:bohb: hpbandster is not installed; fix: pip install"):
        compare.parse_strategies("default,ray:bohb")


def test_syne_tune_hears_what_its_tuner_sends_and_exports_the_best_result_ever_reported(table):
    """Tuner._update_running_trials: a stop decision removes the trial from the scheduler (no completion); a
    trial's end is a last result, then on_trial_complete unless that result stopped it. best_config() is the
    configuration of the highest result in the results, an intermediate one of a stopped trial included. A
    flat draw is read through the table's space: only the drawn method's parameters."""
    from allocsearch.bench.peer_syne import SyneAgent
    from allocsearch.search.space.space import SearchSpace

    space = SearchSpace.from_dict(table.space)
    agent = SyneAgent(PEERS["syne:asha"], space, 4, table, seed=0)
    calls = []
    for name in ("on_trial_result", "on_trial_remove", "on_trial_complete", "on_trial_error"):
        method = getattr(agent.scheduler, name)
        setattr(agent.scheduler, name, lambda *a, _n=name, _m=method, **k: (calls.append(_n), _m(*a, **k))[1])
    drawn = [agent.suggest(str(i)) for i in range(4)]
    for trial, params in drawn:
        assert set(trial.config) == {"method", "lr", "lora.rank", "mola.experts", "mola.top_k", "mola.rank"}
        assert config_key(params) in table.runs  # the drawn method's parameters, nothing else
        assert all(k.split(".")[0] == params["method"] for k in params if "." in k)
        assert all(trial.config[k] == v for k, v in params.items())
    (a, pa), (b, _), (c, _), (d, pd) = drawn
    assert agent.report(a, 2, 0.9)  # the first result in the rung: on
    assert not agent.report(b, 2, 0.1)  # ranked below 1/3 of the rung: stopped and removed
    assert calls[-2:] == ["on_trial_result", "on_trial_remove"]
    agent.stopped(b, 2, 0.1)
    calls.clear()
    agent.complete(a, 8, 0.85)  # at max_t its last result stops it: removed, not completed
    assert calls == ["on_trial_result", "on_trial_remove"]
    agent.fail(c)
    assert calls[-1] == "on_trial_error"
    agent.report(d, 2, 0.5)
    assert agent.best() == config_key(pa) != config_key(pd)  # 0.9 at step 2 is the highest result reported
    assert b.trial_id not in agent.scheduler.trial_info and a.trial_id not in agent.scheduler.trial_info


def test_syne_tune_replays_are_functions_of_their_seed_and_leave_numpys_global_generator_alone(table):
    import numpy as np

    np.random.seed(7)
    state = np.random.get_state()[1].copy()
    runs = {}
    for name in ("syne:asha", "syne:bohb", "syne:asha-bore"):
        runs[name] = replay_peer(table, name, budget_seconds=table.grid_seconds(), seed=3, max_concurrent=2).runs
        np.random.rand(5)  # the caller's draws between replays do not change the next one
        again = replay_peer(table, name, budget_seconds=table.grid_seconds(), seed=3, max_concurrent=2).runs
        assert again == runs[name]
        state = np.random.get_state()[1].copy()
    assert (np.random.get_state()[1] == state).all()


def test_syne_tunes_bohb_draws_from_its_density_model_once_it_has_the_data():
    """Syne Tune's BOHB is ASHA's rungs with a kernel density model for new configurations once the good 15% of
    the trials' last results hold enough points: on a recorded 33-configuration table the two part ways."""
    from pathlib import Path

    from allocsearch.bench.table import Table

    table = Table.load(Path(__file__).resolve().parents[1] / "benchmarks" / "sst2-minilm")
    asha, bohb = (replay_peer(table, name, budget_seconds=table.grid_seconds(), seed=1, max_concurrent=2).runs
                  for name in ("syne:asha", "syne:bohb"))
    assert asha[:10] == bohb[:10] and asha != bohb


@pytest.mark.parametrize("name, missing", [("syne:asha", "syne_tune"), ("syne:asha-bore", "xgboost")])
def test_a_missing_syne_tune_or_xgboost_names_it(monkeypatch, name, missing):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == missing else real(n, *a))
    with pytest.raises(peers.PeerError, match=rf"{name}: {missing} is not installed; fix: pip install") as err:
        compare.parse_strategies(f"default,{name}")
    assert "pip install 'xgboost-cpu>=2'" in str(err.value) and "\n" not in str(err.value)  # the way without CUDA
    import re

    assert not re.search(r"[<>]", re.sub(r"'[^']*'", "", str(err.value)))  # a bare >= in a shell is a redirect


def test_the_cpu_install_of_syne_tune_is_one_list_in_the_error_the_makefile_and_pyproject():
    """The missing-package line, `make install-syne-cpu` and the peers extra name the same packages and spec."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    make = root.joinpath("Makefile").read_text()
    target = make[make.index("\ninstall-syne-cpu:"):].split("\n\n")[0]
    lines = [ln.split("install -q", 1)[1] for ln in target.splitlines() if "install -q" in ln]
    assert [re.findall(r'"[^"]+"|\S+', ln.replace("--no-deps", "")) for ln in lines] == \
        [[f'"{d}"' if ">" in d else d for d in peers.SYNE_CPU_DEPS], [f'"{peers.SYNE_SPEC}"']]
    extra = tomllib.loads(root.joinpath("pyproject.toml").read_text())["project"]["optional-dependencies"]["peers"]
    assert peers.SYNE_SPEC in extra
    assert peers.SYNE_SPEC in peers.FIXES["syne"] and all(d in peers.FIXES["syne"] for d in peers.SYNE_CPU_DEPS)
