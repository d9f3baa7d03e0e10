"""The data spec of a search (which tasks, how many examples per split, seed) and the split builder.

Splits, per task, for a seed:
    validation  the first ``validation`` examples of a seeded shuffle of the task's TRAIN pool
    train       the next ``train`` examples of that shuffle (disjoint from validation; validation does not
                change when only ``train`` changes)
    test        the first ``test`` examples of a shuffle of the task's TEST pool that depends on the task
                only, so every seed is scored on the same test examples
Multi-task mixes are interleaved proportionally (each task spread evenly through the list), in spec order.

YAML form (``data_dir`` optional: None means the bundled demo; a relative path is taken from the YAML's folder):

    seed: 0
    data_dir: null
    tasks:
      - {name: arc_easy, train: 400, validation: 100, test: 200}
      - {name: sst2, train: 400, validation: 100, test: 200}
      - {name: reviews, path: reviews.jsonl, format: classification, labels: [negative, positive],
         test_ratio: 0.2, train: 400, validation: 100, test: 100}

A task with a ``path`` is a user task read from the user's own file (see :mod:`allocsearch.data.files`);
its ``path`` / ``test_path`` are taken from the YAML's folder when relative. Its splits follow the same rules.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any


import allocsearch.data.files as user_files
from allocsearch.data.formats import DataError, Example
from allocsearch.data.tasks import TASKS, default_data_dir, get_task, read_task

SPLITS = ("train", "validation", "test")
SPEC_KEYS = ("tasks", "seed", "data_dir")
DEMO_TASKS = ("arc_easy", "openbookqa", "boolq_llm_adapters", "sst2")


def _check_keys(given: dict, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r}; fix: use only {', '.join(allowed)}")
    missing = [k for k in required if k not in given]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r}; fix: give {', '.join(required)}")


@dataclass
class TaskSpec:
    """How many examples of one task each split takes; with ``path`` a user task read from that file."""

    name: str
    train: int
    validation: int
    test: int
    path: str | None = None
    format: str | None = None
    labels: list | dict | None = None
    fields: dict | None = None
    test_path: str | None = None
    test_ratio: float | None = None
    instruction: str | None = None

    @property
    def is_user(self) -> bool:
        return self.path is not None

    def __post_init__(self) -> None:
        if self.path is None:
            given = [k for k in user_files.USER_KEYS if getattr(self, k) is not None]
            if given and self.name not in TASKS:
                raise DataError(f"task {self.name!r} has {given[0]} but no path; fix: add path: <your data file>")
            get_task(self.name)
            if given:
                raise DataError(f"task {self.name!r} is a built-in task and takes no {given[0]}; fix: drop it, or "
                                "give your own data a path and another name")
        elif self.name in TASKS:
            raise DataError(f"task {self.name!r}: the name is a built-in task; fix: give your data another name")
        for split in SPLITS:
            n = getattr(self, split)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise DataError(f"task {self.name!r}: {split} is {n!r}; fix: give a whole number >= 0")
        if self.path is not None:
            user_files.check_user_task(self)

    def resolve_paths(self, base: str | Path) -> None:
        """Make a user task's relative ``path`` / ``test_path`` absolute, taken from ``base``."""
        for key in ("path", "test_path"):
            value = getattr(self, key)
            if value is not None and not Path(value).expanduser().is_absolute():
                setattr(self, key, str((Path(base) / value).resolve()))
            elif value is not None:
                setattr(self, key, str(Path(value).expanduser()))

    def to_dict(self) -> dict[str, Any]:
        """The mapping form; a built-in task's has only name, train, validation and test."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in ("name", *SPLITS) or getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: Any, where: str = "task") -> TaskSpec:
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a mapping {{name, train, validation, test}}, got {d!r:.60}; "
                            "fix: write it as - {name: arc_easy, train: 400, validation: 100, test: 200}")
        names = tuple(f.name for f in fields(cls))
        _check_keys(d, names, where, required=("name", *SPLITS))
        return cls(**d)


@dataclass
class DataSpec:
    """Tasks and sample sizes of a search's data; validated on construction."""

    tasks: list[TaskSpec]
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise DataError("data spec: 'tasks' is empty; fix: list at least one "
                            "{name, train, validation, test} entry")
        self.tasks = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t, f"data spec tasks[{i}]")
                      for i, t in enumerate(self.tasks)]
        seen = set()
        for t in self.tasks:
            if t.name in seen:
                raise DataError(f"data spec: task {t.name!r} is listed twice; fix: list each task once")
            seen.add(t.name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"data spec: seed is {self.seed!r}; fix: give a whole number")
        if self.data_dir is not None:
            if not isinstance(self.data_dir, (str, Path)) or not str(self.data_dir).strip():
                raise DataError(f"data spec: data_dir is {self.data_dir!r}; fix: give a folder path or null")
            self.data_dir = str(self.data_dir)

    @classmethod
    def from_dict(cls, d: Any, where: str = "data spec") -> DataSpec:
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a mapping with tasks, seed, data_dir; "
                            "fix: see allocsearch.data.spec for the YAML form")
        _check_keys(d, SPEC_KEYS, where, required=("tasks",))
        tasks = d["tasks"]
        if not isinstance(tasks, list) or not tasks:
            raise DataError(f"{where}: 'tasks' must be a non-empty list; fix: list "
                            "{name, train, validation, test} entries")
        return cls(tasks=[TaskSpec.from_dict(t, f"{where} tasks[{i}]") for i, t in enumerate(tasks)],
                   seed=d.get("seed", 0), data_dir=d.get("data_dir"))

    @classmethod
    def from_yaml(cls, path: str | Path) -> DataSpec:
        from allocsearch.fileio import read_yaml

        path = Path(path)
        d = read_yaml(path, "data spec file", DataError)
        return cls.from_dict(d, where=str(path)).resolve_paths(path.parent)

    def resolve_paths(self, base: str | Path) -> DataSpec:
        """Make a relative ``data_dir`` and the user tasks' relative file paths absolute, taken from ``base``
        (the folder of the file that wrote them)."""
        if self.data_dir:
            folder = Path(self.data_dir).expanduser()
            self.data_dir = str(folder if folder.is_absolute() else (Path(base) / folder).resolve())
        for t in self.tasks:
            t.resolve_paths(base)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [t.to_dict() for t in self.tasks], "seed": self.seed, "data_dir": self.data_dir}

    @classmethod
    def demo(cls, seed: int = 0) -> DataSpec:
        """The bundled demo mix: ARC-Easy, OpenBookQA, BoolQ (question only), SST-2; 400/100/200 each."""
        return cls(tasks=[TaskSpec(n, 400, 100, 200) for n in DEMO_TASKS], seed=seed)


def _shuffled(n: int, key: str) -> list[int]:
    """A permutation of range(n) fixed by ``key`` (string seeding is stable across runs and platforms)."""
    order = list(range(n))
    random.Random(key).shuffle(order)
    return order


def _interleave(groups: list[list[Example]]) -> list[Example]:
    """Spread each group evenly: item j of a group of n sits at position (j + 1/2) / n; ties by group order."""
    keyed = [(Fraction(2 * j + 1, 2 * len(g)), t, j) for t, g in enumerate(groups) for j in range(len(g))]
    return [groups[t][j] for _, t, j in sorted(keyed)]


def load_splits(spec: DataSpec, data_dir: str | Path | None = None) -> dict[str, list[Example]]:
    """``train``, ``validation`` and ``test`` lists for ``spec`` (``data_dir`` overrides ``spec.data_dir``).

    Raises DataError before any training when a task is unknown or missing from the data dir, a split
    asks for more examples than exist, or a split would be empty.
    """
    root = data_dir if data_dir is not None else spec.data_dir
    root = Path(root) if root is not None else default_data_dir()
    groups: dict[str, list[list[Example]]] = {s: [] for s in SPLITS}
    for t in spec.tasks:
        if t.is_user:
            pools = user_files.read_user_task(t)
            source = t.path if not t.test_path else f"{t.path} / {t.test_path}"
        else:
            pools = read_task(t.name, root)
            source = root / get_task(t.name).folder
        train_pool, test_pool = pools["train"], pools["test"]
        wanted = t.train + t.validation
        if wanted and not train_pool:
            raise DataError(f"task {t.name!r} has no train split (test only), so train and validation cannot "
                            "come from it; fix: set train: 0 and validation: 0 for it")
        if wanted > len(train_pool):
            raise DataError(f"task {t.name!r}: asked for {t.train} train + {t.validation} validation = {wanted} "
                            f"examples but its train split in {source} has {len(train_pool)}; "
                            + ("fix: ask for fewer or add records" if t.is_user
                               else "fix: ask for fewer or pass --data-dir with the full data"))
        if t.test > len(test_pool):
            raise DataError(f"task {t.name!r}: asked for {t.test} test examples but its test split in "
                            f"{source} has {len(test_pool)}; fix: ask for at most {len(test_pool)}")
        order = _shuffled(len(train_pool), f"allocsearch/{spec.seed}/{t.name}/train")
        groups["validation"].append([train_pool[i] for i in order[: t.validation]])
        groups["train"].append([train_pool[i] for i in order[t.validation: wanted]])
        test_order = _shuffled(len(test_pool), f"allocsearch/{t.name}/test")
        groups["test"].append([test_pool[i] for i in test_order[: t.test]])
    splits = {s: _interleave([g for g in groups[s] if g]) for s in SPLITS}
    for s in SPLITS:
        if not splits[s]:
            raise DataError(f"the {s} split is empty (every task has {s}: 0); "
                            f"fix: set {s} > 0 for at least one task")
    return splits


def split_summary(splits: dict[str, list[Example]]) -> dict[str, dict[str, int]]:
    """Examples per task per split, e.g. {"train": {"arc_easy": 400, ...}, ...}, for logs and reports."""
    out: dict[str, dict[str, int]] = {}
    for s, examples in splits.items():
        counts: dict[str, int] = {}
        for ex in examples:
            counts[ex.task] = counts.get(ex.task, 0) + 1
        out[s] = counts
    return out
