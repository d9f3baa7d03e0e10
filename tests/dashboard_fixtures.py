"""Fixture studies for the dashboard tests, built by driving the search controller by hand (no Ray, no
training; see test_search_controller) and writing the results.json a real trial writes: losses,
checkpoints, per-task validation / test metrics, expert load, redundancy and costs. Also the broken
kinds of study a workdir can hold: empty, half-written, corrupt JSON, missing or garbage optuna.db."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

from test_search_controller import SPACE, Clock, final

from allocsearch.search.budget import Budget
from allocsearch.search.controller import Controller
from allocsearch.search.space.space import SearchSpace
from allocsearch.study.folder import Study

NUM_LAYERS = 4
TASKS = ("sst2", "rte")
# MoLA's shape families, as the shipped demo space searches them
SHAPE_SPACE = {**SPACE, "data": {"seed": 0, "tasks": [{"name": t, "train": 16, "validation": 8, "test": 8}
                                                     for t in TASKS]},
               "methods": {"mola": {"experts": {"shape": {"choice": ["inverted_triangle", "triangle", "rectangle"]},
                                                "per_layer": {"int": [2, 4]}},
                                    "top_k": {"int": [1, 2]}, "rank": {"choice": [2, 4]}},
                           "lora": {"rank": {"choice": [2, 4]}}}}
BROKEN = ("empty", "half", "badjson", "nodb", "garbagedb", "jsononly")


def make_study(workdir: Path, name: str, clock: Clock, objectives=("accuracy",), budget="30cpu-min") -> Controller:
    import optuna

    space = SearchSpace.from_dict(SHAPE_SPACE)
    settings = {"name": name, "model": space.model, "data": space.data, "data_dir": None, "space": "test",
                "space_fingerprint": space.fingerprint(), "objectives": list(objectives),
                "budget": Budget.parse(budget).to_dict(), "seed": 0, "storage": None, "priors": True,
                "num_layers": NUM_LAYERS, "scheduler": "asha", "cpus_per_trial": 1.0, "gpus_per_trial": 0.0,
                "max_failures": 5, "sampler": "random"}
    study = Study.create(workdir, settings, json.dumps(SHAPE_SPACE))
    return Controller(study, space, num_layers=NUM_LAYERS, sampler=optuna.samplers.RandomSampler(seed=0),
                      clock=clock)


def _metrics(score: float, n: int = 8) -> dict:
    tasks = {t: {"n": n, "accuracy": round(score + 0.02 * (i - 0.5), 4),
                 "balanced_accuracy": round(score + 0.03 * (i - 0.5), 4), "predicted": {"0": n // 2, "1": n - n // 2}}
             for i, t in enumerate(TASKS)}
    return {"n": n * len(TASKS), "tasks": tasks, "macro_accuracy": score, "macro_balanced_accuracy": score}


def results(spec: dict, score: float, steps: int, status: str = "completed", seed: int = 0,
            trainable: int = 4096) -> dict:
    """A results.json as allocsearch.training.trial writes it."""
    rng = random.Random(seed)
    alloc = spec["allocation"]
    experts = alloc.get("experts") if isinstance(alloc.get("experts"), list) else [1] * NUM_LAYERS
    load = {}
    for j, e in enumerate(experts):
        if e > 1:
            w = [rng.random() + 0.2 for _ in range(e)]
            load[str(j)] = {t: [x / sum(w) for x in w] for t in ("q_proj", "v_proj")}
    done = status == "completed"
    return {
        "name": spec["name"], "status": status, "failure": None, "stop_reason": None if done else "scheduler",
        "validation": _metrics(score) if done else None, "test": _metrics(score - 0.03) if done else None,
        "zero_shot": None,
        "checkpoints": [{"step": s, "metrics": _metrics(score * s / steps + 0.5 * (1 - s / steps), n=4)}
                        for s in range(2, steps + 1, 2)],
        "losses": [[s, 0.7 * math.exp(-s / steps) + 0.05 * rng.random()] for s in range(1, steps + 1)],
        "trainable_params": trainable, "total_params": 1_000_000, "steps": steps, "tokens": steps * 256,
        "wall_seconds": 12.5, "train_seconds": 9.0, "eval_seconds": 3.0, "device_seconds": 12.5, "devices": 1,
        "device": "cpu", "dtype": "fp32", "threads": 1, "peak_memory_mb": 812.5, "memory_kind": "process peak RSS",
        "tokens_per_second": 280.0, "seconds_per_step": 1.1, "expert_load": load,
        "redundancy": {str(j): 0.2 + 0.05 * j for j, e in enumerate(experts) if e > 1},
        "allocation": {"method": alloc.get("method"), "num_layers": NUM_LAYERS, "experts": experts,
                       "top_k": alloc.get("top_k", [1] * NUM_LAYERS), "rank": alloc.get("rank", [4] * NUM_LAYERS),
                       "targets": ["q_proj", "v_proj"], "options": {}, "schema_version": 1},
        "spec": spec, "adapter_dir": None}


def _finish(ctl: Controller, clock: Clock, config: dict, seconds: float, end: dict, result: dict | None) -> int:
    n = config.number
    ctl.on_start(n)
    clock.t += seconds / 2
    ctl.tick()
    if result is not None:  # the worker writes results.json before it reports its final result
        (ctl.study.trial_dir(n) / "results.json").write_text(json.dumps(result, indent=2))
    clock.t += seconds / 2
    ctl.on_complete(n, end, error=False)
    return n


def build_main(workdir: Path, name: str = "demo") -> dict:
    """A single-objective study: completed, pruned, failed and one still-running trial."""
    clock = Clock()
    ctl = make_study(workdir, name, clock)
    numbers: dict[str, list[int]] = {"completed": [], "pruned": [], "failed": [], "running": []}
    for i, score in enumerate((0.71, 0.78, 0.64, 0.82, 0.69, 0.66)):
        if i == 5:  # a plain LoRA trial among the MoLA priors
            ctl.store.enqueue({"method": "lora", "lora.rank": 4, "lr": 0.002})
        c = ctl.propose()
        steps = 8
        end = {**final(objective=score, steps=steps), "trainable_params": 4096 + 512 * i}
        numbers["completed"].append(_finish(ctl, clock, c, 20.0 + i, end,
                                            results(c.spec, score, steps, seed=i, trainable=4096 + 512 * i)))
    c = ctl.propose()  # stopped by the scheduler at step 4
    ctl.on_start(c.number)
    ctl.on_result(c.number, {"step": 2, "objective": 0.52, "train_seconds": 1.0})
    (ctl.study.trial_dir(c.number) / "results.json").write_text(
        json.dumps(results(c.spec, 0.55, 4, status="stopped", seed=9)))
    clock.t += 8.0
    ctl.on_complete(c.number, {"step": 4, "objective": 0.55, "train_seconds": 2.0}, error=False)
    numbers["pruned"].append(c.number)
    c = ctl.propose()  # NaN: failed, no results.json
    numbers["failed"].append(_finish(ctl, clock, c, 3.0, final(status="failed", objective=None,
                                                              failure="loss became nan at step 3"), None))
    c = ctl.propose()  # running when the fixture is read
    ctl.on_start(c.number)
    clock.t += 5.0
    ctl.tick()
    ctl.on_result(c.number, {"step": 2, "objective": 0.6, "train_seconds": 1.0})
    numbers["running"].append(c.number)
    return numbers


def build_multi(workdir: Path, name: str = "multi") -> None:
    """Two objectives (accuracy, params): a Pareto front of two of three trials."""
    clock = Clock()
    ctl = make_study(workdir, name, clock, objectives=("accuracy", "params"))
    for i, (score, params) in enumerate(((0.8, 5000), (0.7, 1000), (0.6, 6000))):
        c = ctl.propose()
        _finish(ctl, clock, c, 10.0, {**final(objective=score), "trainable_params": params},
                results(c.spec, score, 8, seed=i, trainable=params))


def build_broken(workdir: Path, source: str = "demo") -> None:
    """Every kind of study the dashboard must show as a message (needs ``source`` built first)."""
    make_study(workdir, "empty", Clock())  # created, Optuna study made, no trial
    half = workdir / "half"  # the start was interrupted before study.json was written
    (half / "trials").mkdir(parents=True)
    (half / "space.yaml").write_text("{}")
    (workdir / "badjson").mkdir()
    (workdir / "badjson" / "study.json").write_text('{"name": "badjson", "model": ')
    shutil.copytree(workdir / source, workdir / "nodb")
    _rename(workdir / "nodb")
    (workdir / "nodb" / "optuna.db").unlink()
    shutil.copytree(workdir / source, workdir / "garbagedb")
    _rename(workdir / "garbagedb")
    (workdir / "garbagedb" / "optuna.db").write_bytes(b"this is not a database\n" * 10)
    (workdir / "jsononly").mkdir()  # study.json only: no space, no database, no trial folders
    settings = json.loads((workdir / source / "study.json").read_text())
    (workdir / "jsononly" / "study.json").write_text(json.dumps({**settings, "name": "jsononly"}))


def _rename(root: Path) -> None:
    path = root / "study.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "name": root.name}))


def build_workdir(workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    numbers = build_main(workdir)
    build_multi(workdir)
    build_broken(workdir)
    return numbers


_BUILT: dict[str, Path] = {}


def shared_workdir(tmp_path_factory) -> Path:
    """One fixture workdir per test session (building it commits a few hundred sqlite transactions);
    tests that change a study copy it first."""
    if "workdir" not in _BUILT:
        workdir = tmp_path_factory.mktemp("dashboard-studies")
        build_workdir(workdir)
        _BUILT["workdir"] = workdir
    return _BUILT["workdir"]
