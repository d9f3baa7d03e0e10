"""A reader's plain-SQL read of a study's sqlite storage gives exactly Optuna's ``FrozenTrial`` s (every
state, value kind, distribution, attribute), falls back to Optuna on a schema it does not know, and
filters states as Optuna does."""
from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from allocsearch.study import storage as storage_mod
from allocsearch.study.folder import Study
from allocsearch.study.storage import TrialStore


@pytest.fixture()
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = Study.create(tmp_path, {"name": "s", "objectives": ["accuracy"]}, "version: 1\n")
    o = optuna.create_study(storage=st.storage_url, study_name="s", direction="maximize")
    for i, (state, value) in enumerate([("COMPLETE", 0.8), ("COMPLETE", math.inf), ("PRUNED", None),
                                        ("FAIL", None), ("COMPLETE", -math.inf), ("RUNNING", None)]):
        t = o.ask()
        t.suggest_float("lr", 1e-4, 1e-2, log=True)
        t.suggest_int("rank", 1, 16)
        t.suggest_categorical("method", ["lora", "mola", None])
        t.set_user_attr("seed", i)
        t.set_user_attr("summary", {"experts": [1, 2], "text": f"trial {i}"})
        t.report(0.5 + i / 10, 10)
        t.report(math.nan, 20)
        if state == "COMPLETE":
            o.tell(t, value)
        elif state != "RUNNING":
            o.tell(t, state=TrialState[state])
    o.enqueue_trial({"lr": 1e-3, "rank": 8, "method": "lora"})  # a WAITING trial
    return st, o


def test_the_sql_read_gives_optunas_trials_exactly(study):
    st, o = study
    store = TrialStore.read(st)
    assert store.sqlite_path is not None
    fast = storage_mod._sqlite_trials(store.sqlite_path, "s")
    assert fast is not None and len(fast) == 7
    slow = o.get_trials(deepcopy=False)
    for a, b in zip(fast, slow):
        assert a.__dict__.keys() == b.__dict__.keys()
        for k in a.__dict__:
            va, vb = a.__dict__[k], b.__dict__[k]
            if k.lstrip("_") == "intermediate_values":
                assert va.keys() == vb.keys()
                assert all(va[s] == vb[s] or (math.isnan(va[s]) and math.isnan(vb[s])) for s in va)
            else:
                assert va == vb, k
    assert [t.state for t in store.trials()] == [t.state for t in slow]
    kept = store.trials(states=(TrialState.COMPLETE,))
    assert [t.number for t in kept] == [0, 1, 4] and kept[1].value == math.inf and kept[2].value == -math.inf


def test_an_unknown_schema_is_read_through_optuna(study, monkeypatch):
    st, o = study
    monkeypatch.setattr(storage_mod, "_KNOWN_SCHEMA", (99, "v9"))
    store = TrialStore.read(st)
    assert storage_mod._sqlite_trials(store.sqlite_path, "s") is None
    assert [t.number for t in store.trials()] == [t.number for t in o.get_trials()]


def test_a_reader_of_trials_never_loads_optunas_study_and_a_missing_study_is_none(study, tmp_path):
    """optuna.load_study costs about 1 s (status on 5,316 trials: 2.3 s -> 1.7 s without it): a reader that
    only reads trials does not load it; one that needs it (a trial by number) does, on first use."""
    st, o = study
    store = TrialStore.read(st)
    assert len(store.trials()) == 7 and store._ostudy is None
    assert store.trial(0).number == 0 and store._ostudy is not None
    other = Study.create(tmp_path / "w2", {"name": "other", "objectives": ["accuracy"]}, "version: 1\n")
    (other.root / "optuna.db").write_bytes((st.root / "optuna.db").read_bytes())  # a database without "other"
    assert other.storage_url.endswith("optuna.db") and TrialStore.read(other) is None


def test_the_controllers_records_make_a_finished_trial_once_and_follow_every_running_one(tmp_path):
    """``TrialStore.records()`` (no spend: the controller's read, several per trial) keeps a finished trial's
    record, which cannot change (Optuna refuses writes to a finished trial), and makes the others again:
    equal to a fresh read after every write."""
    from allocsearch.study.records import records_of

    st = Study.create(tmp_path, {"name": "w", "objectives": ["accuracy"]}, "version: 1\n")
    store = TrialStore.open(st)
    for _ in range(3):
        store.ask().suggest_int("rank", 1, 16)

    def fresh():
        return [r.to_dict() for r in records_of(store.trials())]

    store.report(0, 10, 0.7)
    store.set_attrs(0, {"seed": 3})
    store.tell(0, "completed", [0.8])
    store.report(1, 10, 0.6)
    first = store.records()
    assert [r.to_dict() for r in first] == fresh()
    store.report(1, 20, 0.65)  # a running trial's new checkpoint shows at the next read
    store.set_attrs(2, {"seed": 1})
    second = store.records()
    assert [r.to_dict() for r in second] == fresh()
    assert second[0] is first[0] and second[1].intermediate == {10: 0.6, 20: 0.65} and second[2].seed == 1
    store.tell(1, "pruned")
    third = store.records()
    assert [r.to_dict() for r in third] == fresh() and third[1].state != first[1].state
    with pytest.raises(Exception, match="finished"):  # the premise: a finished trial takes no write
        store.set_attrs(0, {"seed": 4})
