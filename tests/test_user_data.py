"""User tasks read from the user's own files (allocsearch.data.files): every shape in JSONL, JSON and CSV,
field mapping, a test file or a held-out ratio, deterministic disjoint splits, bad data as one line naming
file, record and fix, ``allocsearch data check`` and one tiny trial on a user task."""
from __future__ import annotations

import builtins
import csv
import json
from pathlib import Path

import pytest

from allocsearch.data import DataError, DataSpec, TaskSpec, load_splits, read_task, split_summary
from allocsearch.data.files import read_user_task
from allocsearch.errors import AllocsearchError

SHAPES = {
    "classification": [{"text": f"a {'fine' if i % 3 else 'poor'} film number {i}",
                        "label": "positive" if i % 3 else "negative"} for i in range(30)],
    "multiple_choice": [{"question": f"What is {i} + 1?", "choices": [str(i + 1), str(i + 2), str(i)],
                         "answer": i % 3} for i in range(30)],
    "generation": [{"prompt": f"What is {i} times 2?", "completion": str(2 * i)} for i in range(30)],
}
EXTRA = {"classification": {"labels": ["negative", "positive"]}, "multiple_choice": {}, "generation": {}}


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    else:
        cols = list(dict.fromkeys(k for r in records for k in r))
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, cols)
            w.writeheader()
            for r in records:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def user(name="mine", path=None, train=10, validation=5, test=5, **kw) -> TaskSpec:
    kw.setdefault("test_ratio", 0.2) if "test_path" not in kw else None
    return TaskSpec(name, train, validation, test, path=str(path), **kw)


def uids(examples):
    return [ex.uid for ex in examples]


def one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, AllocsearchError) and "\n" not in msg and "fix:" in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
@pytest.mark.parametrize("fmt", sorted(SHAPES))
def test_every_shape_reads_from_every_file_type(tmp_path, fmt, suffix):
    path = write(tmp_path / f"data{suffix}", SHAPES[fmt])
    pools = read_user_task(user(path=path, format=fmt, **EXTRA[fmt]))
    examples = sorted(pools["train"] + pools["test"], key=lambda e: int(e.uid.split("/")[-1]))
    assert (len(pools["train"]), len(pools["test"])) == (24, 6)
    assert [e.uid for e in examples] == [f"mine/{i}" for i in range(30)]
    ex = examples[4]
    assert ex.task == "mine" and ex.prompt.endswith("\nAnswer:")
    if fmt == "classification":  # rendered like SST-2: instruction, the text, Answer:, label words
        assert ex.prompt == "Classify the text as negative or positive.\nText: a fine film number 4\nAnswer:"
        sst2 = read_task("sst2")["test"][0]
        assert ex.choices == sst2.choices == (" negative", " positive")
        assert (ex.label, ex.target, ex.text_a, ex.text_b) == (1, " positive", "a fine film number 4", "")
    elif fmt == "multiple_choice":  # rendered like ARC
        assert ex.prompt == ("Choose the correct answer to the question.\nQuestion: What is 4 + 1?\n"
                             "A. 5\nB. 6\nC. 4\nAnswer:")
        assert ex.choices == (" A", " B", " C") and ex.label == 1 and ex.target == " B"
    else:
        assert ex.prompt == "What is 4 times 2?\nAnswer:"
        assert (ex.choices, ex.label, ex.target) == ((), None, "8")


def test_pair_classification_and_instruction(tmp_path):
    recs = [{"premise": f"p{i}", "hypothesis": f"h{i}", "gold": ["entailment", "not_entailment"][i % 2]}
            for i in range(6)]
    t = user(path=write(tmp_path / "rte.csv", recs), format="classification", labels=["entailment", "not_entailment"],
             fields={"text_a": "premise", "text_b": "hypothesis", "label": "gold"}, train=4, validation=0, test=0,
             test_ratio=None, instruction="Does the premise entail the hypothesis?")
    ex = read_user_task(t)["train"][1]
    assert ex.prompt == "Does the premise entail the hypothesis?\nText 1: p1\nText 2: h1\nAnswer:"
    assert (ex.choices, ex.label, ex.text_a, ex.text_b) == ((" entailment", " not_entailment"), 1, "p1", "h1")


def test_field_mapping_and_label_values(tmp_path):
    recs = [{"review_body": f"text {i}", "stars": [1, 5][i % 2], "rid": f"r{i}"} for i in range(10)]
    path = write(tmp_path / "reviews.jsonl", recs)
    t = user(path=path, format="classification", labels={1: "negative", 5: "positive"},
             fields={"text": "review_body", "label": "stars", "id": "rid"}, train=8, validation=0, test=0,
             test_ratio=None)
    train = read_user_task(t)["train"]
    assert [e.label for e in train[:3]] == [0, 1, 0] and train[1].uid == "mine/r1"
    assert t.labels == {"1": "negative", "5": "positive"}  # JSON-stable keys
    # with non-numeric label words, an integer label is an index into the list (Hugging Face ClassLabel)
    write(path, [{"text": f"t{i}", "label": i % 2} for i in range(4)])
    t2 = user(path=path, format="classification", labels=["neg", "pos"], train=4, validation=0, test=0, test_ratio=None)
    assert [e.target for e in read_user_task(t2)["train"]] == [" neg", " pos", " neg", " pos"]


def test_multiple_choice_answers_and_option_columns(tmp_path):
    recs = [{"q": "Sky?", "o1": "blue", "o2": "green", "o3": "", "ans": "green", "ctx": "Look up."},
            {"q": "Grass?", "o1": "blue", "o2": "green", "o3": "red", "ans": "B"},
            {"q": "Sun?", "o1": "yellow", "o2": "green", "o3": "red", "ans": "0"}]
    path = write(tmp_path / "mc.csv", recs)
    t = user(path=path, format="mc", fields={"question": "q", "choices": ["o1", "o2", "o3"], "answer": "ans",
                                             "context": "ctx"}, train=3, validation=0, test=0, test_ratio=None)
    a, b, c = read_user_task(t)["train"]
    assert t.format == "multiple_choice"
    assert a.choices == (" A", " B") and a.label == 1 and "Context: Look up.\nQuestion: Sky?" in a.prompt
    assert b.label == 1 and c.label == 0 and "C. red" in b.prompt
    write(path, [{"question": "Q?", "choices": "x|y|z", "answer": "z"}])
    t = user(path=path, format="multiple_choice", train=1, validation=0, test=0, test_ratio=None)
    assert read_user_task(t)["train"][0].label == 2


# ------------------------------------------------------------------------------------------------ splits

def spec_ratio(tmp_path, seed=0, **sizes) -> DataSpec:
    path = write(tmp_path / "data.jsonl", [{"text": f"t{i}", "label": ["a", "b"][i % 2]} for i in range(100)])
    size = {"train": 40, "validation": 20, "test": 20} | sizes
    return DataSpec([user(path=path, format="classification", labels=["a", "b"], **size),
                     TaskSpec("sst2", 10, 5, 5)], seed=seed)


def test_ratio_splits_are_deterministic_disjoint_and_seed_independent_for_test(tmp_path):
    a, b, c = (load_splits(spec_ratio(tmp_path, s)) for s in (0, 0, 1))
    for s in ("train", "validation", "test"):
        assert uids(a[s]) == uids(b[s])
    assert set(uids(a["train"])) != set(uids(c["train"]))
    assert uids(a["test"]) == uids(c["test"])  # held-out test depends on the task only
    for sp in (a, c):
        sets = [set(uids(sp[s])) for s in ("train", "validation", "test")]
        assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    held = set(uids(read_user_task(spec_ratio(tmp_path).tasks[0])["test"]))
    assert len(held) == 20 and {u for u in uids(a["test"]) if u.startswith("mine/")} <= held
    assert not held & set(uids(a["train"]) + uids(a["validation"]) + uids(c["train"]) + uids(c["validation"]))
    assert split_summary(a)["validation"] == {"mine": 20, "sst2": 5}
    # validation does not move when only train changes
    assert uids(load_splits(spec_ratio(tmp_path, train=60))["validation"]) == uids(a["validation"])


def test_test_file(tmp_path):
    train = write(tmp_path / "train.csv", [{"text": f"t{i}", "label": "yes" if i % 2 else "no"} for i in range(20)])
    test = write(tmp_path / "test.jsonl", [{"text": f"u{i}", "label": "no"} for i in range(8)])
    spec = DataSpec([user(path=train, test_path=test, format="classification", labels=["yes", "no"],
                          train=12, validation=6, test=8)])
    splits = load_splits(spec)
    assert {u.split("/")[1] for u in uids(splits["train"] + splits["validation"])} == {"train"}
    assert sorted(uids(splits["test"])) == sorted(f"mine/test/{i}" for i in range(8))
    assert all(e.text_a.startswith("u") for e in splits["test"])


def test_yaml_paths_are_relative_to_the_spec_and_round_trip(tmp_path):
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "r.jsonl", SHAPES["classification"])
    yml = tmp_path / "d" / "spec.yaml"
    yml.write_text("seed: 3\ntasks:\n  - {name: reviews, path: r.jsonl, format: classification, "
                   "labels: [negative, positive], test_ratio: 0.2, train: 10, validation: 4, test: 6}\n"
                   "  - {name: sst2, train: 10, validation: 5, test: 5}\n")
    spec = DataSpec.from_yaml(yml)
    assert spec.tasks[0].path == str((tmp_path / "d" / "r.jsonl").resolve())
    d = spec.to_dict()
    assert d["tasks"][1] == {"name": "sst2", "train": 10, "validation": 5, "test": 5}  # built-ins unchanged
    assert json.loads(json.dumps(d)) == d and DataSpec.from_dict(d).to_dict() == d
    assert split_summary(load_splits(spec))["test"] == {"reviews": 6, "sst2": 5}


# ------------------------------------------------------------------------------------------------ bad data

def bad_load(tmp_path, records=None, text=None, name="data.jsonl", **kw):
    path = tmp_path / name
    if text is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    elif records is not None:
        write(path, records)
    kw = {"format": "classification", "labels": ["neg", "pos"]} | kw
    with pytest.raises(DataError) as exc:
        load_splits(DataSpec([user(path=path, train=2, validation=1, test=1, **kw)]))
    return exc, str(path)


def test_bad_records_fail_with_one_line_naming_file_record_and_fix(tmp_path):
    ok = {"text": "x", "label": "neg"}
    exc, p = bad_load(tmp_path, [ok, {"label": "pos"}, ok])
    one_line(exc, p, "line 2", "missing field 'text'")
    exc, p = bad_load(tmp_path, [ok, ok, {"text": "y", "label": "meh"}])
    one_line(exc, p, "line 3", "'meh' is not in the declared labels")
    exc, p = bad_load(tmp_path, [ok] * 3 + [{"txt": "y", "label": "pos"}], name="d.csv")
    one_line(exc, p, "line 5", "missing field 'text'")
    exc, p = bad_load(tmp_path, text="")
    one_line(exc, p, "no records")
    exc, p = bad_load(tmp_path, text="text,label\n", name="e.csv")
    one_line(exc, p, "no records")
    exc, p = bad_load(tmp_path, text='{"text": "a", "label": "neg"}\n{oops\n')
    one_line(exc, p, "line 2", "bad JSON")
    exc, p = bad_load(tmp_path, text="text,label\na,neg\nb,pos,extra\n", name="c.csv")
    one_line(exc, p, "line 3", "3 columns")
    exc, p = bad_load(tmp_path, text=b'{"text": "\xff", "label": "neg"}\n')
    one_line(exc, p, "UTF-8")
    exc, p = bad_load(tmp_path, [{"id": 1, **ok}, {"id": 2, **ok}, {"id": 1, **ok}])
    one_line(exc, p, "line 3", "'1' is already used at", "line 1")
    exc, p = bad_load(tmp_path, name="missing.jsonl")
    one_line(exc, p, "file not found")
    exc, p = bad_load(tmp_path, text="x", name="data.xlsx")
    one_line(exc, p, "unknown file type '.xlsx'")
    exc, p = bad_load(tmp_path, [ok] * 3)  # 3 records: 20% held out = 1 test, 2 train < 3 asked
    one_line(exc, "asked for 2 train + 1 validation", p)
    exc, p = bad_load(tmp_path, [{"question": "Q", "choices": ["a", "b"], "answer": "c"}] * 4, format="mc",
                      labels=None)
    one_line(exc, p, "line 1", "answer 'c' is not one of the 2 choices")


def test_duplicate_ids_across_train_and_test_files(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"id": f"r{i}", "text": "x", "label": "neg"} for i in range(5)])
    test = write(tmp_path / "test.jsonl", [{"id": "t0", "text": "y", "label": "pos"},
                                           {"id": "r3", "text": "y", "label": "pos"}])
    with pytest.raises(DataError) as exc:
        load_splits(DataSpec([user(path=train, test_path=test, format="classification", labels=["neg", "pos"],
                                   train=2, validation=1, test=1)]))
    one_line(exc, str(test), "line 2", "'r3' is also in the train file", f"{train} line 4")


@pytest.mark.parametrize("kw, match", [
    ({"format": "regression"}, "format is 'regression'"),
    ({"format": "classification"}, "needs labels"),
    ({"format": "classification", "labels": ["very good", "very bad"]}, "distinct words"),
    ({"format": "classification", "labels": ["a", "a"]}, "lists a label twice"),
    ({"format": "generation", "labels": ["a", "b"]}, "labels is only for format: classification"),
    ({"format": "generation", "fields": {"text": "body"}}, "fields has 'text', not a generation field"),
    ({"format": "generation", "test_ratio": None}, "no test_path or test_ratio"),
    ({"format": "generation", "test_ratio": 1.5}, "test_ratio is 1.5"),
    ({"format": "generation", "test_path": "t.jsonl", "test_ratio": 0.2}, "both test_path and test_ratio"),
    ({"name": "sst2", "format": "generation"}, "the name is a built-in task"),
    ({"name": "my task", "format": "generation"}, "name must be"),
])
def test_bad_user_task_keys(tmp_path, kw, match):
    with pytest.raises(DataError) as exc:
        user(path=tmp_path / "x.jsonl", **kw)
    one_line(exc, match)


def test_bad_spec_mappings():
    with pytest.raises(DataError) as exc:
        DataSpec.from_dict({"tasks": [{"name": "sst2", "train": 1, "validation": 1, "test": 1, "format": "mc"}]})
    one_line(exc, "built-in task and takes no format")
    with pytest.raises(DataError) as exc:
        DataSpec.from_dict({"tasks": [{"name": "mine", "train": 1, "validation": 1, "test": 1, "format": "mc"}]})
    one_line(exc, "has format but no path")
    with pytest.raises(DataError) as exc:
        DataSpec.from_dict({"tasks": [{"name": "mine", "train": 1, "validation": 1, "test": 1, "pth": "x"}]})
    one_line(exc, "unknown key 'pth'")


@pytest.mark.parametrize("name", ["data.parquet", "data.arrow", "ds_folder"])
def test_datasets_formats_need_datasets(tmp_path, monkeypatch, name):
    real_import = builtins.__import__

    def no_datasets(mod, *a, **k):
        if mod == "datasets" or mod.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(mod, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    path = tmp_path / name
    path.mkdir() if "." not in name else path.write_bytes(b"PAR1")
    with pytest.raises(DataError) as exc:
        load_splits(DataSpec([user(path=path, format="generation")]))
    one_line(exc, str(path), "pip install datasets")


def test_datasets_folder_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"sentence": f"s{i}", "label": i % 2} for i in range(20)])
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "ds.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    for path in (tmp_path / "ds", tmp_path / "ds.parquet", tmp_path / "dd" / "train"):
        t = user(path=path, format="classification", labels=["neg", "pos"], fields={"text": "sentence"})
        pools = read_user_task(t)
        assert len(pools["train"]) == 16 and {e.target for e in pools["train"]} == {" neg", " pos"}
    with pytest.raises(DataError) as exc:
        load_splits(DataSpec([user(path=tmp_path / "dd", format="classification", labels=["neg", "pos"])]))
    one_line(exc, "DatasetDict", "point path at one split folder")


# ------------------------------------------------------------------------------------------------ CLI

def run_main(argv, capsys):
    from allocsearch.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_data_check_prints_tasks_splits_balance_and_a_prompt(tmp_path, capsys):
    write(tmp_path / "reviews.csv", [{"body": f"r{i}", "stars": "positive" if i < 30 else "negative"}
                                     for i in range(40)])
    write(tmp_path / "qa.jsonl", SHAPES["multiple_choice"])
    spec = tmp_path / "data.yaml"
    spec.write_text("seed: 1\ntasks:\n"
                    "  - {name: reviews, path: reviews.csv, format: classification, labels: [negative, positive],\n"
                    "     fields: {text: body, label: stars}, test_ratio: 0.25, train: 20, validation: 10, test: 10}\n"
                    "  - {name: qa, path: qa.jsonl, format: multiple_choice, test_ratio: 0.2, train: 10, "
                    "validation: 4, test: 6}\n"
                    "  - {name: sst2, train: 4, validation: 2, test: 2}\n")
    code, out, err = run_main(["data", "check", spec], capsys)
    assert code == 0 and err == ""
    splits = load_splits(DataSpec.from_yaml(spec))
    lines = out.splitlines()
    assert lines[0] == f"{spec}: valid (3 tasks, seed 1)"
    assert f"task reviews: classification from {tmp_path / 'reviews.csv'}; test: 25% of it held out" in lines
    assert "  splits   train 20, validation 10, test 10 (of 30 train and 10 test records)" in lines
    pos = sum(e.label == 1 for e in splits["train"] if e.task == "reviews")
    assert f"  balance  train: negative {20 - pos} ({(20 - pos) / 20:.0%}), positive {pos} ({pos / 20:.0%})" in lines
    first = next(e for e in splits["train"] if e.task == "reviews")
    assert f"  prompt ({first.uid}):" in lines
    assert "    | Classify the text as negative or positive." in lines and f"    | Text: {first.text_a}" in lines
    assert f"  choices  ' negative' | ' positive'; target {first.target!r}" in lines
    assert "task qa: multiple_choice" in out and "  choices  ' A' | ' B' | ' C'" in out
    assert "task sst2: built-in classification, GLUE SST-2 sentiment (from the bundled demo)" in lines


def test_data_check_says_how_generation_is_scored(tmp_path, capsys):
    write(tmp_path / "math.jsonl", SHAPES["generation"])
    write(tmp_path / "qa.jsonl", [{"prompt": f"Say word {i}", "completion": f"word {i}"} for i in range(20)])
    spec = tmp_path / "data.yaml"
    spec.write_text("tasks:\n" + "".join(f"  - {{name: {n}, path: {n}.jsonl, format: generation, test_ratio: 0.2, "
                                          "train: 4, validation: 2, test: 2}\n" for n in ("math", "qa")))
    code, out, err = run_main(["data", "check", spec], capsys)
    assert code == 0 and err == ""
    math_part, qa_part = out.split("task qa:")
    assert "(scored by the first number generated)" in math_part and "exact match" not in math_part
    assert "(scored by normalised exact match)" in qa_part


def test_data_check_bad_data_is_one_line(tmp_path, capsys):
    write(tmp_path / "r.jsonl", [{"text": "a", "label": "negative"}, {"text": "b", "label": "neutral"}])
    spec = tmp_path / "data.yaml"
    spec.write_text("tasks:\n  - {name: r, path: r.jsonl, format: classification, labels: [negative, positive],"
                    " train: 1, validation: 0, test: 0}\n")
    code, out, err = run_main(["data", "check", spec], capsys)
    assert code == 2 and out == ""
    assert err == (f"error: {tmp_path / 'r.jsonl'} line 2: label 'neutral' is not in the declared labels "
                   "['negative', 'positive']; fix: correct the record or add the label to labels\n")


# ------------------------------------------------------------------------------------------------ a trial

@pytest.mark.slow
def test_a_user_task_runs_through_run_trial(tmp_path, one_thread):
    from allocsearch.training.trial import TrialSpec, run_trial

    path = write(tmp_path / "reviews.jsonl", [{"text": f"{'good' if i % 2 else 'bad'} {i}",
                                              "label": ["negative", "positive"][i % 2]} for i in range(24)])
    data = DataSpec([user("reviews", path=path, format="classification", labels=["negative", "positive"],
                          train=8, validation=4, test=4, test_ratio=0.25)])
    spec = TrialSpec(name="user", model="tiny-llama", allocation={"method": "mola", "experts": 2, "rank": 2},
                     data=data, train={"steps": 4, "batch_size": 2, "max_length": 64, "warmup_ratio": 0.0})
    r = run_trial(spec, out_dir=tmp_path / "run")
    assert r.status == "completed", r.failure
    assert r.steps == 4 and r.validation["tasks"]["reviews"]["n"] == 4 and r.test["tasks"]["reviews"]["n"] == 4
    assert r.spec["data"]["tasks"][0]["path"] == str(path)


def test_a_trial_configs_user_task_paths_are_relative_to_the_config(tmp_path, monkeypatch):
    from allocsearch.training.trial import TrialSpec

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "reviews.jsonl").write_text("")
    (tmp_path / "cfg" / "trial.yaml").write_text(
        "model: tiny-llama\nallocation: {preset: lora}\ndata:\n  tasks:\n"
        "    - {name: reviews, path: reviews.jsonl, format: classification, labels: [neg, pos],"
        " test_ratio: 0.2, train: 4, validation: 2, test: 2}\n")
    monkeypatch.chdir(tmp_path)  # elsewhere than the config's folder
    spec = TrialSpec.from_yaml(tmp_path / "cfg" / "trial.yaml")
    assert spec.data.tasks[0].path == str((tmp_path / "cfg" / "reviews.jsonl").resolve())
