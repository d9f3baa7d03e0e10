"""Task registry: which folder and files hold each benchmark, which reader parses them, and its kind.

A data directory has one folder per task with the files named as in the shared datasets
(``arc_easy/train.json``, ``glue_SST-2/dev.tsv``, ...). The bundled demo (``allocsearch/data/demo``) has
the same layout, so ``--data-dir /path/to/datasets`` swaps in the full data. GLUE's dev file is the test
split. ``boolq_with_passage`` ships only its dev file: record i goes to test when i % 4 == 0, the rest to
train. svamp and addsub have only a test split.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import allocsearch.data.formats as F
from allocsearch.data.formats import DataError, Example

KINDS = ("mc", "yesno", "classification", "math")


@dataclass(frozen=True)
class Task:
    """One benchmark: ``folder`` under the data dir, its train/test files, reader and kind."""

    name: str
    folder: str
    kind: str
    reader: Callable[[Path, str], list[Example]]
    train_file: str | None
    test_file: str
    holdout_every: int = 0  # >0: one file holds both splits; record i is test when i % holdout_every == 0
    description: str = ""


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("arc_easy", "arc_easy", "mc", F.read_llm_adapters_mc, "train.json", "test.json",
         description="ARC-Easy science questions, 3-5 options"),
    Task("arc_challenge", "arc_challenge", "mc", F.read_llm_adapters_mc, "train.json", "test.json",
         description="ARC-Challenge science questions, 3-5 options"),
    Task("openbookqa", "openbookqa", "mc", F.read_llm_adapters_mc, "train.json", "test.json",
         description="OpenBookQA, 4 options"),
    Task("boolq_llm_adapters", "boolq_llm_adapters", "yesno", F.read_llm_adapters_boolq, "train.json",
         "test.json", description="BoolQ question only (no passage)"),
    Task("boolq_with_passage", "boolq_with_passage", "yesno", F.read_boolq_passage, None, "dev.jsonl",
         holdout_every=4, description="BoolQ with passage (dev file split 3:1 into train/test)"),
    Task("scienceqa_mola", "scienceqa_mola", "mc", F.read_scienceqa, "train.jsonl", "test.jsonl",
         description="ScienceQA natural-science sample from MoLA, 2-4 options"),
    Task("rte", "glue_RTE", "classification", F.read_glue_rte, "train.tsv", "dev.tsv",
         description="GLUE RTE entailment"),
    Task("mrpc", "glue_MRPC", "classification", F.read_glue_mrpc, "train.tsv", "dev.tsv",
         description="GLUE MRPC paraphrase"),
    Task("sst2", "glue_SST-2", "classification", F.read_glue_sst2, "train.tsv", "dev.tsv",
         description="GLUE SST-2 sentiment"),
    Task("cola", "glue_CoLA", "classification", F.read_glue_cola, "train.tsv", "dev.tsv",
         description="GLUE CoLA acceptability"),
    Task("gsm8k", "gsm8k", "math", F.read_gsm8k, "train.jsonl", "test.jsonl",
         description="GSM8K grade-school math"),
    Task("svamp", "svamp", "math", F.read_llm_adapters_math, None, "test.json",
         description="SVAMP math word problems (test only)"),
    Task("addsub", "addsub", "math", F.read_llm_adapters_math, None, "test.json",
         description="AddSub math word problems (test only)"),
)}


def task_names() -> list[str]:
    """All registered task names, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The registered task, or a DataError listing the known names."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; fix: use one of {', '.join(task_names())}")
    return TASKS[name]


def default_data_dir() -> Path:
    """The bundled demo subset (same layout as a full data dir)."""
    return Path(__file__).resolve().with_name("demo")


def available_tasks(data_dir: str | Path | None = None) -> list[str]:
    """Registered tasks whose test file exists under ``data_dir`` (default: the bundled demo)."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    return [n for n in task_names() if (root / TASKS[n].folder / TASKS[n].test_file).is_file()]


def read_task(name: str, data_dir: str | Path | None = None) -> dict[str, list[Example]]:
    """The full ``train`` and ``test`` pools of a task, in file order (``train`` is [] for test-only tasks)."""
    task = get_task(name)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; fix: pass --data-dir pointing at a folder "
                        "with one sub-folder per task (as in the shared datasets)")
    files = [f for f in (task.train_file, task.test_file) if f]
    for file in files:
        if not (root / task.folder / file).is_file():
            have = ", ".join(available_tasks(root)) or "none"
            raise DataError(f"task {name!r} needs {root / task.folder / file}, which is missing (tasks found "
                            f"in {root}: {have}); fix: pass --data-dir with a {task.folder}/ folder")
    test = _read(task, root / task.folder / task.test_file)
    if task.holdout_every:
        train = [ex for i, ex in enumerate(test) if i % task.holdout_every]
        test = [ex for i, ex in enumerate(test) if not i % task.holdout_every]
    else:
        train = _read(task, root / task.folder / task.train_file) if task.train_file else []
    return {"train": list(train), "test": list(test)}


def _read(task: Task, path: Path) -> tuple[Example, ...]:
    stat = path.stat()
    return _read_cached(task.name, str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _read_cached(name: str, path: str, mtime_ns: int, size: int) -> tuple[Example, ...]:
    """Parsed file, cached per (path, mtime, size): repeated trials do not re-parse SST-2's 67k rows."""
    examples = TASKS[name].reader(Path(path), name)
    if not examples:
        raise DataError(f"{path}: file has no records; fix: use the original, non-empty file")
    return tuple(examples)
