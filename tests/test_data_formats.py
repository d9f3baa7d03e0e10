"""Readers and the task registry on the real shared files, the bundled demo, and broken files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from allocsearch.data import (DEMO_TASKS, TASKS, DataError, Example, available_tasks, default_data_dir,
                              get_task, read_task, task_names)
from allocsearch.data import formats as F
from allocsearch.errors import AllocsearchError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# (train, test) records per task in the shared datasets (README table; boolq_with_passage: dev split 3:1).
SHARED_COUNTS = {
    "arc_easy": (2251, 2376), "arc_challenge": (1119, 1172), "openbookqa": (4957, 500),
    "boolq_llm_adapters": (9427, 3270), "boolq_with_passage": (2452, 818), "scienceqa_mola": (200, 200),
    "rte": (2490, 277), "mrpc": (3667, 408), "sst2": (67349, 872), "cola": (8551, 1043),
    "gsm8k": (7473, 1319), "svamp": (0, 1000), "addsub": (0, 395),
}


@pytest.fixture(scope="module")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED} (a developer checkout has them at ../shared/datasets)")
    return SHARED


def check_example(ex: Example, kind: str) -> None:
    assert ex.prompt.endswith("\nAnswer:") and ex.text_a.strip()
    assert ex.uid.startswith(f"{ex.task}/")
    if kind == "math":
        assert ex.choices == () and ex.label is None
        float(ex.target)
        assert "," not in ex.target
    else:
        assert ex.target == ex.choices[ex.label]
        assert all(c.startswith(" ") for c in ex.choices)
        assert len({c.split()[0] for c in ex.choices}) == len(ex.choices)
    if kind == "mc":
        for j, choice in enumerate(ex.choices):
            assert choice == f" {'ABCDEFGH'[j]}" and f"\n{'ABCDEFGH'[j]}. " in ex.prompt


def test_registry_covers_every_shared_folder(shared):
    folders = {p.name for p in shared.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert folders == {t.folder for t in TASKS.values()}
    assert set(SHARED_COUNTS) == set(task_names())


@pytest.mark.parametrize("name", sorted(SHARED_COUNTS))
def test_every_shared_task_reads(shared, name):
    pools = read_task(name, shared)
    assert (len(pools["train"]), len(pools["test"])) == SHARED_COUNTS[name]
    kind = get_task(name).kind
    uids = [ex.uid for ex in pools["train"] + pools["test"]]
    assert len(set(uids)) == len(uids)
    for ex in pools["train"][:200] + pools["test"][:200]:
        check_example(ex, kind)


def test_arc_label_matches_answer(shared):
    raw = json.loads((shared / "arc_easy" / "train.json").read_text())
    examples = read_task("arc_easy", shared)["train"]
    for rec, ex in zip(raw, examples):
        assert ex.label == int(rec["answer"].removeprefix("answer")) - 1
    first = examples[0]
    assert first.uid == "arc_easy/train/0" and first.label == 1 and first.target == " B"
    assert "\nB. a bacterial population in the bloodstream\n" in first.prompt
    assert first.prompt.startswith("Choose the correct answer to the question.\nQuestion: Which factor")
    assert any(len(ex.choices) == 5 for ex in examples) and any(len(ex.choices) == 3 for ex in examples)


def test_answer_extraction(shared):
    gsm = read_task("gsm8k", shared)
    assert gsm["train"][0].target == "72" and gsm["train"][1].target == "10"
    assert read_task("svamp", shared)["test"][0].target == "8"  # "8.0" in the file
    assert read_task("addsub", shared)["test"][1].target == "9.8"
    boolq = read_task("boolq_llm_adapters", shared)["train"][0]
    assert boolq.choices == (" yes", " no") and boolq.target == " yes"
    assert boolq.prompt == ("Answer the question with yes or no.\n"
                            "Question: do iran and afghanistan speak the same language?\nAnswer:")
    passage = read_task("boolq_with_passage", shared)
    assert passage["test"][0].uid == "boolq_with_passage/dev/0" and passage["test"][0].target == " no"
    assert passage["test"][0].text_b.startswith("All biomass goes through")
    sqa = read_task("scienceqa_mola", shared)["train"][1]
    assert sqa.target == " B" and sqa.choices == (" A", " B") and "\nB. acquired\n" in sqa.prompt


def test_glue_labels(shared):
    sst = read_task("sst2", shared)["test"][0]
    assert sst.target == " positive" and sst.text_a == "it 's a charming and often affecting journey ."
    rte = read_task("rte", shared)["train"][0]
    assert rte.target == " no" and rte.text_b == "Weapons of Mass Destruction Found in Iraq."
    mrpc = read_task("mrpc", shared)["train"]  # header starts with a byte-order mark
    assert mrpc[0].target == " yes" and mrpc[1].target == " no"
    cola = read_task("cola", shared)["train"]  # no header
    assert cola[0].text_a.startswith("Our friends won't buy this analysis")
    assert sum(ex.label for ex in cola) == 6023


def test_demo_reads_with_the_same_readers():
    assert available_tasks() == sorted(DEMO_TASKS)
    for name in DEMO_TASKS:
        pools = read_task(name)
        assert (len(pools["train"]), len(pools["test"])) == ((3000, 872) if name == "sst2" else (600, 200))
        for ex in pools["train"] + pools["test"]:
            check_example(ex, get_task(name).kind)
    notice = (default_data_dir() / "NOTICE").read_text()
    for name in DEMO_TASKS:
        assert f"{get_task(name).folder}/" in notice
    assert "816657208af4db747803f87ba40a4c71383fed7a" in notice and "CC BY-SA 4.0" in notice
    size = sum(p.stat().st_size for p in default_data_dir().rglob("*") if p.is_file())
    assert size < 2_000_000


def test_demo_is_a_subset_of_the_shared_files(shared):
    for name in DEMO_TASKS:
        for split in ("train", "test"):
            full = {(ex.prompt, ex.label) for ex in read_task(name, shared)[split]}
            demo = read_task(name)[split]
            assert all((ex.prompt, ex.label) in full for ex in demo), (name, split)


def test_unknown_task_lists_known_names():
    with pytest.raises(DataError, match=r"unknown task 'arc'.*arc_easy.*sst2"):
        get_task("arc")


# --- broken files ---------------------------------------------------------------------------------------

def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, AllocsearchError) and "\n" not in msg and "fix:" in msg
    return msg


MC_RECORD = {
    "instruction": "Please choose the correct answer to the question: Q?\n\nAnswer1: x Answer2: y\n\n"
                   "Answer format: answer1/answer2",
    "input": "", "output": "the correct answer is answer2", "answer": "answer2",
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as exc:
        F.read_llm_adapters_mc(tmp_path / "nope.json", "arc_easy")
    assert "nope.json: file not found" in one_line(exc)
    write(tmp_path / "arc_easy" / "test.json", json.dumps([MC_RECORD]))
    with pytest.raises(DataError) as exc:
        read_task("arc_easy", tmp_path)
    assert "train.json, which is missing" in one_line(exc)
    with pytest.raises(DataError) as exc:
        read_task("arc_easy", tmp_path / "absent")
    assert "does not exist" in one_line(exc)


def test_bad_json(tmp_path):
    path = write(tmp_path / "t.json", '[{"instruction": "x",\n "answer": }]')
    with pytest.raises(DataError) as exc:
        F.read_llm_adapters_mc(path, "arc_easy")
    assert "t.json: bad JSON at line 2" in one_line(exc)
    path = write(tmp_path / "t.jsonl", '{"question": "a", "answer": "#### 1"}\n\n{oops\n')
    with pytest.raises(DataError) as exc:
        F.read_gsm8k(path, "gsm8k")
    assert "t.jsonl line 3: bad JSON" in one_line(exc)


def test_missing_or_wrong_field(tmp_path):
    path = write(tmp_path / "t.json", json.dumps([MC_RECORD, {"instruction": MC_RECORD["instruction"]}]))
    with pytest.raises(DataError) as exc:
        F.read_llm_adapters_mc(path, "arc_easy")
    assert re.search(r"t.json record 1: missing field 'answer'", one_line(exc))
    path = write(tmp_path / "p.jsonl", json.dumps({"question": "q", "passage": "p", "answer": "yes"}) + "\n")
    with pytest.raises(DataError) as exc:
        F.read_boolq_passage(path, "boolq_with_passage")
    assert "field 'answer' is 'yes', expected a non-empty bool" in one_line(exc)
    path = write(tmp_path / "g.jsonl", json.dumps({"question": "q", "answer": "it is 4"}) + "\n")
    with pytest.raises(DataError) as exc:
        F.read_gsm8k(path, "gsm8k")
    assert "no '#### N'" in one_line(exc)
    path = write(tmp_path / "m.json", json.dumps([{"instruction": "q", "answer": "four"}]))
    with pytest.raises(DataError) as exc:
        F.read_llm_adapters_math(path, "svamp")
    assert "is not a number" in one_line(exc)


def test_label_not_among_choices(tmp_path):
    path = write(tmp_path / "t.json", json.dumps([dict(MC_RECORD, answer="answer3")]))
    with pytest.raises(DataError) as exc:
        F.read_llm_adapters_mc(path, "arc_easy")
    assert "label 'answer3' is not among the choices" in one_line(exc)
    rec = {"question": "q", "choices": ["a", "b"], "answer": "C", "hint": ""}
    with pytest.raises(DataError) as exc:
        F.read_scienceqa(write(tmp_path / "s.jsonl", json.dumps(rec)), "scienceqa_mola")
    assert "label 'C'" in one_line(exc)
    with pytest.raises(DataError) as exc:
        F.read_glue_sst2(write(tmp_path / "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n"), "sst2")
    assert "dev.tsv line 3: label '2'" in one_line(exc)
    with pytest.raises(DataError):
        Example("t", "t/0", "p\nAnswer:", (" yes", " no"), 2, " yes", "p")


def test_tsv_shape(tmp_path):
    with pytest.raises(DataError) as exc:
        F.read_glue_sst2(write(tmp_path / "a.tsv", "text\tlabel\ngood\t1\n"), "sst2")
    assert "line 1: header" in one_line(exc)
    with pytest.raises(DataError) as exc:
        F.read_glue_cola(write(tmp_path / "b.tsv", "gj04\t1\t\tok\ngj04\t1\n"), "cola")
    assert "b.tsv line 2: 2 tab-separated columns, expected 4" in one_line(exc)


def test_empty_file(tmp_path):
    write(tmp_path / "glue_SST-2" / "train.tsv", "sentence\tlabel\n")
    write(tmp_path / "glue_SST-2" / "dev.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError) as exc:
        read_task("sst2", tmp_path)
    assert "has no records" in one_line(exc)


def test_choices_must_start_differently():
    with pytest.raises(DataError):
        Example("t", "t/0", "p\nAnswer:", (" yes", " yes please"), 0, " yes", "p")
