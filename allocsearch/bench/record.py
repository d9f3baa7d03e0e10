"""``allocsearch bench record``: run every point of a finite space on several seeds, through the search
service itself (a study with the grid sampler over the space x seeds, no early stopping, no priors, no
confirmation), then write its table (``allocsearch.bench.table``). The study under ``<workdir>/<name>``
is the recording's state: a second call resumes it with this call's budget on top of what was spent, so a
table is recorded in parts and in parallel (``--max-concurrent``, ``--ray-address``) like any search.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from allocsearch.bench.table import write
from allocsearch.errors import AllocsearchError


def recording_space(space_path: str, seeds: list[int]) -> tuple[dict, dict]:
    """(the table's space, the recording's space: the same with ``train.seed`` searched over ``seeds``)."""
    from allocsearch.search.space.space import SearchSpace, load_space, model_depth, resolve_space_path

    space = load_space(resolve_space_path(space_path))
    if "seed" in space.train_dims:
        raise AllocsearchError(f"{space.source}: train.seed is searched; fix: fix it, bench record adds the seeds")
    if space.grid_size(model_depth(space.model)) is None:
        raise AllocsearchError(f"{space.source}: a dimension is continuous ({', '.join(space.continuous())}); "
                               f"fix: write it as a {{choice: [...]}} list: a table covers a finite space")
    table_space = space.to_dict()
    rec = json.loads(json.dumps(table_space))
    rec["train"] = {**rec.get("train", {}), "seed": {"choice": list(seeds)}}
    SearchSpace.from_dict(rec, source=space.source)  # valid as a space
    return table_space, rec


def record(space_path: str, name: str, *, seeds: list[int], budget: str, workdir: str, out: str | None = None,
           data_dir: str | None = None, cpus_per_trial: float | None = None, max_concurrent: int | None = None,
           ray_address: str | None = None, on_event: Callable | None = None) -> dict:
    """Record (or go on recording) the table; returns {"study", "table", "runs", "expected", "complete"}."""
    import yaml

    from allocsearch.search.budget import Budget
    from allocsearch.search.session import StartOptions, run
    from allocsearch.search.space.space import model_depth, SearchSpace
    from allocsearch.study.folder import Study, check_name

    if len(set(seeds)) < 2:
        raise AllocsearchError(f"--seeds {seeds}: a table needs at least 2 seeds (3 or more to see seed noise)")
    check_name(name, "table name")
    part = Budget.parse(budget)
    table_space, rec = recording_space(space_path, seeds)
    work = Path(workdir)
    opts = StartOptions(study=name, workdir=str(work), data_dir=data_dir, cpus_per_trial=cpus_per_trial,
                        max_concurrent=max_concurrent, ray_address=ray_address, mlflow=False)
    if Study.exists(work, name):  # this part's budget on top of what the recording has spent
        study = Study.open(work, name)
        total = Budget.from_dict(study.settings["budget"])
        spent = study.ledger.spent(total.unit)
        if part.unit != total.unit:
            raise AllocsearchError(f"the recording {name!r} counts {total.unit} time; fix: give --budget in "
                                   f"{total.unit} (e.g. 1{total.unit}-h)")
        opts.budget = Budget.of_seconds(spent + part.seconds, part.unit).text
        _requeue_unfinished(study)
    else:
        opts.budget, opts.sampler, opts.scheduler, opts.priors, opts.confirm = part.text, "grid", "none", False, 0.0
    with tempfile.TemporaryDirectory(prefix="as-record-") as tmp:  # the study keeps its own space.yaml
        space_file = Path(tmp) / f"{name}.yaml"
        space_file.write_text(yaml.safe_dump(rec, sort_keys=False))
        if opts.sampler == "grid":
            opts.space = str(space_file)
        outcome = run(opts, on_event=on_event)
    study = Study.open(work, name)
    rows = table_rows(study)
    space = SearchSpace.from_dict(table_space)
    layers = model_depth(space.model)
    expected = space.grid_size(layers) * len(seeds)
    runs = len({(r["config"], r["seed"]) for r in rows})
    card = {"name": name, "task": space.data, "data_dir": study.settings.get("data_dir"),  # None: bundled data
            "model": space.model, "num_layers": layers, "train": space.train,
            "space": str(Path(space_path)), "seeds": sorted(seeds), "configurations": expected // len(seeds),
            "runs": runs, "complete": runs == expected, "objective": "validation macro balanced accuracy",
            "cpus_per_trial": study.settings["cpus_per_trial"], "gpus_per_trial": study.settings["gpus_per_trial"],
            "max_concurrent": study.settings.get("max_concurrent"),
            "budget_unit": Budget.from_dict(study.settings["budget"]).unit, "commit": _commit(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "spent_device_seconds": study.ledger.spent(Budget.from_dict(study.settings["budget"]).unit),
            "end_reason": outcome.end_reason}
    answer = known_answer_of(space.model)
    folder = Path(out) if out else Path("benchmarks") / name
    if answer:  # the model folder stays on this machine: its config.json travels with the table (the replay's
        card["known_answer"] = answer  # cost model and depth read it), the table's space points at it
        (folder / "model").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(space.model).expanduser() / "config.json", folder / "model" / "config.json")
        table_space = {**table_space, "model": "model"}
    write(folder, rows, card, yaml.safe_dump(table_space, sort_keys=False))
    return {"study": str(study.root), "table": str(folder), "runs": runs, "expected": expected,
            "complete": runs == expected}


def known_answer_of(model: str) -> dict | None:
    """The answer of a known-answer model folder (``bench known-answer`` writes ``<out>/model`` beside
    ``<out>/card.json``): its group, the group's index and the layer groups, the layers and the construction;
    None for any other model."""
    from allocsearch.bench.known_answer import GROUPS

    card_file = Path(model).expanduser().parent / "card.json"
    if not Path(model).expanduser().is_dir() or not card_file.is_file():
        return None
    try:
        card = json.loads(card_file.read_text())
        answer, construction = card["answer"], card["construction"]
        return {**answer, "index": GROUPS.index(answer["group"]), "groups": int(construction["groups"]),
                "construction": construction}
    except (ValueError, KeyError, TypeError):
        return None  # not a known-answer card


def _requeue_unfinished(study) -> None:
    """Points of the grid that ran but did not complete (cut by the last part's budget, failed) go back to
    the front of the queue: the grid sampler alone would count them as run."""
    from optuna.trial import TrialState

    from allocsearch.study.records import NOTHING_TO_TRAIN, Attr
    from allocsearch.study.storage import TrialStore

    store = TrialStore.open(study)
    trials = store.trials()
    done = [t.params for t in trials if t.state == TrialState.COMPLETE]
    queued = [t.params for t in trials if t.state == TrialState.WAITING]
    for t in trials:
        if t.user_attrs.get(Attr.FAILURE) == NOTHING_TO_TRAIN:
            continue  # not a point of the grid: it trains nothing
        if t.state in (TrialState.PRUNED, TrialState.FAIL) and t.params and t.params not in done + queued:
            store.enqueue(t.params, {Attr.RETRY_OF: t.number})
            queued.append(t.params)


def table_rows(study) -> list[dict]:
    """The table's rows from a recording study: every completed trial's checkpoints and end."""
    from allocsearch.study.confidence import config_key
    from allocsearch.study.records import Attr, State, state_of
    from allocsearch.study.storage import TrialStore
    from allocsearch.training.scoring import OBJECTIVE_METRIC as M

    store = TrialStore.read(study)
    rows = []
    for t in store.trials() if store is not None else []:
        result = study.read_result(t.number)
        if state_of(t)[0] != State.COMPLETED or not result:
            continue
        params = {k: v for k, v in t.params.items() if k != "seed"}
        base = {"config": config_key(params), "seed": int(t.params.get("seed", t.user_attrs.get(Attr.SEED, 0))),
                "trainable_params": t.user_attrs.get(Attr.TRAINABLE)}
        seconds = t.user_attrs.get(Attr.CHECKPOINT_SECONDS) or {}
        for c in result.get("checkpoints") or []:
            rows.append({**base, "step": c["step"], "final": 0, "validation": c["metrics"][M],
                         "test": (c.get("test") or {}).get(M), "device_seconds": seconds.get(str(c["step"]))})
        rows.append({**base, "step": result.get("steps"), "final": 1, "validation": t.values[0],
                     "test": (result.get("test") or {}).get(M),
                     "device_seconds": t.user_attrs.get(Attr.DEVICE_SECONDS),
                     "train_seconds": result.get("train_seconds"), "peak_memory_mb": result.get("peak_memory_mb"),
                     "expert_load": result.get("expert_load") or None})
    return rows


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


__all__ = ["known_answer_of", "record", "recording_space", "table_rows"]
