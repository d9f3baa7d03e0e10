"""What the nodes of a Ray cluster have, asked before any trial runs: their resources (a trial must fit on
one node) and whether the files a trial reads are there (one tiny Ray task per node, pinned to it).

A user's first hour on a cluster fails here in one line ("node 10.0.0.7 lacks the model folder ...")
instead of every trial failing the same way after Ray scheduled it.
"""
from __future__ import annotations

import os

CHECK_TIMEOUT_S = 120.0


def alive_nodes() -> list[dict]:
    """``[{"id", "ip", "cpus", "gpus"}]`` of the cluster's alive nodes (Ray must be initialised)."""
    import ray

    return [{"id": n["NodeID"], "ip": n.get("NodeManagerAddress", "?"), "cpus": n["Resources"].get("CPU", 0.0),
             "gpus": n["Resources"].get("GPU", 0.0)} for n in ray.nodes() if n.get("Alive")]


def largest_fit(nodes: list[dict], cpus: float, gpus: float) -> str | None:
    """None when some node can hold a trial of ``cpus`` / ``gpus``; else why not, in words."""
    if any(n["cpus"] >= cpus and n["gpus"] >= gpus for n in nodes):
        return None
    biggest = ", ".join(f"{n['ip']}: {n['cpus']:g} CPU {n['gpus']:g} GPU" for n in nodes) or "no alive node"
    return f"a trial needs {cpus:g} CPUs and {gpus:g} GPUs on one node, but no node has them ({biggest})"


def _missing(paths: dict[str, str]) -> list[str]:
    return [f"{label} {path}" for label, path in paths.items() if not os.path.exists(path)]


def missing_paths(nodes: list[dict], paths: dict[str, str]) -> dict[str, list[str]]:
    """``{node ip: [what it lacks]}`` for every node that cannot see one of ``paths`` (label -> path)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not paths or not nodes:
        return {}
    check = ray.remote(num_cpus=0)(_missing)
    refs = {n["ip"]: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False))
            .remote(paths) for n in nodes}
    answers = ray.get(list(refs.values()), timeout=CHECK_TIMEOUT_S)
    return {ip: lacks for ip, lacks in zip(refs, answers) if lacks}


def required_paths(settings: dict) -> dict[str, str]:
    """The files and folders every node running a study's trials must see (label -> absolute path)."""
    out = {}
    if os.path.isabs(str(settings.get("model", ""))):
        out["the model folder"] = settings["model"]
    if settings.get("data_dir"):
        out["the data folder"] = settings["data_dir"]
    for task in (settings.get("data") or {}).get("tasks", []):
        for key, what in (("path", "data file"), ("test_path", "test file")):
            if isinstance(task, dict) and task.get(key):
                out[f"the {what} of task {task.get('name')}"] = str(task[key])
    return out
