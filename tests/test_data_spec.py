"""DataSpec validation and YAML, and the train/validation/test splits built from it."""
from __future__ import annotations

from pathlib import Path

import pytest

from allocsearch.data import DEMO_TASKS, DataError, DataSpec, TaskSpec, load_splits, read_task, split_summary
from allocsearch.errors import AllocsearchError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def uids(examples):
    return [ex.uid for ex in examples]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, AllocsearchError) and "\n" not in msg and "fix:" in msg
    return msg


def small(seed: int = 0, **sizes) -> DataSpec:
    size = dict(train=40, validation=20, test=30) | sizes
    return DataSpec(tasks=[TaskSpec(n, **size) for n in DEMO_TASKS], seed=seed)


def test_demo_spec_loads():
    spec = DataSpec.demo()
    assert [t.name for t in spec.tasks] == ["arc_easy", "openbookqa", "boolq_llm_adapters", "sst2"]
    splits = load_splits(spec)
    assert split_summary(splits) == {
        "train": {n: 400 for n in DEMO_TASKS},
        "validation": {n: 100 for n in DEMO_TASKS},
        "test": {n: 200 for n in DEMO_TASKS},
    }


def test_same_seed_same_splits_other_seed_other_train():
    a, b, c = load_splits(small(0)), load_splits(small(0)), load_splits(small(1))
    for split in ("train", "validation", "test"):
        assert uids(a[split]) == uids(b[split])
    assert set(uids(a["train"])) != set(uids(c["train"]))
    assert set(uids(a["validation"])) != set(uids(c["validation"]))
    assert uids(a["test"]) == uids(c["test"])  # every seed is scored on the same test examples


def test_validation_is_carved_from_train_and_disjoint():
    splits = load_splits(small(3))
    train, val, test = (set(uids(splits[s])) for s in ("train", "validation", "test"))
    assert not train & val and not train & test and not val & test
    for name in DEMO_TASKS:
        pools = read_task(name)
        train_file, test_file = set(uids(pools["train"])), set(uids(pools["test"]))
        assert {u for u in train | val if u.startswith(name + "/")} <= train_file
        assert {u for u in test if u.startswith(name + "/")} <= test_file
    assert all("/train/" in u for u in train | val)
    assert all("/test/" in u or "/dev/" in u for u in test)


def test_validation_does_not_move_when_train_size_changes():
    a, b = load_splits(small(0, train=40)), load_splits(small(0, train=80))
    assert uids(a["validation"]) == uids(b["validation"])
    assert set(uids(a["train"])) < set(uids(b["train"]))


def test_mix_is_interleaved():
    train = load_splits(small(0))["train"]
    assert [ex.task for ex in train[:4]] == list(DEMO_TASKS)
    uneven = DataSpec(tasks=[TaskSpec("sst2", 30, 5, 5), TaskSpec("arc_easy", 10, 5, 5)])
    tasks = [ex.task for ex in load_splits(uneven)["train"]]
    assert tasks[:5] == ["sst2", "sst2", "arc_easy", "sst2", "sst2"]
    assert max(len(run) for run in "".join("s" if t == "sst2" else "a" for t in tasks).split("a")) <= 3


def test_full_data_dir_and_single_file_split(tmp_path):
    if not SHARED.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED}")
    spec = DataSpec(tasks=[TaskSpec("boolq_with_passage", 100, 50, 80), TaskSpec("rte", 20, 10, 10)])
    splits = load_splits(spec, data_dir=SHARED)
    index = {s: [int(u.rsplit("/", 1)[1]) for u in uids(splits[s]) if u.startswith("boolq_with")] for s in splits}
    assert all(i % 4 for i in index["train"] + index["validation"]) and all(i % 4 == 0 for i in index["test"])
    with pytest.raises(DataError) as exc:  # neither task is in the bundled demo
        load_splits(spec)
    assert "boolq_with_passage/dev.jsonl, which is missing" in one_line(exc) and "arc_easy" in str(exc.value)


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("seed: 7\ndata_dir: data\ntasks:\n"
                    "  - {name: arc_easy, train: 10, validation: 5, test: 5}\n"
                    "  - {name: sst2, train: 20, validation: 5, test: 5}\n")
    spec = DataSpec.from_yaml(path)
    assert spec.seed == 7 and spec.data_dir == str((tmp_path / "data").resolve())
    assert spec.tasks[1] == TaskSpec("sst2", 20, 5, 5)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    assert DataSpec.from_dict(DataSpec.demo().to_dict()) == DataSpec.demo()


@pytest.mark.parametrize("text, match", [
    ("tasks: []\nseeds: 1\n", "unknown key 'seeds'"),
    ("tasks:\n  - {name: sst2, train: 1, validation: 1, test: 1, epochs: 2}\n", "tasks\\[0\\]: unknown key 'epochs'"),
    ("tasks:\n  - {name: sst2, train: 1, test: 1}\n", "missing key 'validation'"),
    ("tasks:\n  - {name: sst3, train: 1, validation: 1, test: 1}\n", "unknown task 'sst3'"),
    ("tasks:\n  - {name: sst2, train: -1, validation: 1, test: 1}\n", "train is -1"),
    ("tasks:\n  - {name: sst2, train: true, validation: 1, test: 1}\n", "train is True"),
    ("seed: 1\n", "missing key 'tasks'"),
    ("tasks: []\n", "'tasks' must be a non-empty list"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("tasks: [\n", "not valid YAML at line"),
])
def test_bad_yaml(tmp_path, text, match):
    path = tmp_path / "data.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as exc:
        DataSpec.from_yaml(path)
    one_line(exc)


def test_missing_yaml_and_duplicate_task(tmp_path):
    with pytest.raises(DataError, match="data spec file .* does not exist") as exc:
        DataSpec.from_yaml(tmp_path / "absent.yaml")
    one_line(exc)
    with pytest.raises(DataError, match="listed twice"):
        DataSpec(tasks=[TaskSpec("sst2", 1, 1, 1), TaskSpec("sst2", 1, 1, 1)])


def test_too_many_requested_says_how_many_exist():
    with pytest.raises(DataError) as exc:
        load_splits(DataSpec(tasks=[TaskSpec("arc_easy", 550, 100, 10)]))
    assert "650 examples but its train split" in one_line(exc) and "has 600" in str(exc.value)
    with pytest.raises(DataError) as exc:
        load_splits(DataSpec(tasks=[TaskSpec("sst2", 10, 10, 873)]))
    assert "test split" in one_line(exc) and "has 872" in str(exc.value)


def test_empty_split():
    with pytest.raises(DataError) as exc:
        load_splits(DataSpec(tasks=[TaskSpec("sst2", 10, 0, 10), TaskSpec("arc_easy", 10, 0, 10)]))
    assert "validation split is empty" in one_line(exc)


def test_test_only_task_cannot_give_train():
    if not SHARED.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED}")
    spec = DataSpec(tasks=[TaskSpec("svamp", 10, 0, 10), TaskSpec("sst2", 10, 10, 10)], data_dir=str(SHARED))
    with pytest.raises(DataError) as exc:
        load_splits(spec)
    assert "no train split" in one_line(exc)
    ok = DataSpec(tasks=[TaskSpec("svamp", 0, 0, 10), TaskSpec("sst2", 10, 10, 10)], data_dir=str(SHARED))
    assert split_summary(load_splits(ok))["test"] == {"svamp": 10, "sst2": 10}
