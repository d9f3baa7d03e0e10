"""Benchmark data for fine-tuning trials: readers, the task registry, user tasks from files
(:mod:`allocsearch.data.files`, read by :mod:`allocsearch.data.records`), the data spec and its splits.

Light on purpose: no torch here. The bundled demo subset lives in ``allocsearch/data/demo`` (see NOTICE).
"""
from __future__ import annotations

from allocsearch.data.files import FORMATS as USER_FORMATS
from allocsearch.data.files import read_user_task
from allocsearch.data.formats import DataError, Example
from allocsearch.data.spec import DEMO_TASKS, SPLITS, DataSpec, TaskSpec, load_splits, split_summary
from allocsearch.data.tasks import (KINDS, TASKS, Task, available_tasks, default_data_dir, get_task,
                                    read_task, task_names)

__all__ = [
    "DEMO_TASKS",
    "KINDS",
    "SPLITS",
    "TASKS",
    "DataError",
    "DataSpec",
    "Example",
    "Task",
    "TaskSpec",
    "USER_FORMATS",
    "available_tasks",
    "default_data_dir",
    "get_task",
    "load_splits",
    "read_task",
    "read_user_task",
    "split_summary",
    "task_names",
]
