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


def check_cluster(settings: dict, budget, cpus: float, gpus: float, *, too_big: str | None = None,
                  lacking: dict[str, list[str]] | None = None) -> None:
    """Refuse in one line (a ``StudyError``) a cluster that cannot run a trial of the study's ``settings``:
    fewer CPUs / GPUs than a trial asks for, too few on any one node (``too_big``: why, ``largest_fit``),
    or nodes that cannot see the trials' files (``lacking``: node -> what, ``required_paths``)."""
    from allocsearch.study.folder import StudyError

    budget.check_resources(settings["gpus_per_trial"], gpus)
    if settings["cpus_per_trial"] > cpus:
        raise StudyError(f"a trial asks for {settings['cpus_per_trial']:g} CPUs but the cluster has {cpus:g}; "
                         f"fix: lower --cpus-per-trial")
    if too_big:
        raise StudyError(f"{too_big}; fix: lower --cpus-per-trial / --gpus-per-trial or add a bigger node")
    if lacking:
        node, what = next(iter(lacking.items()))
        more = f" (and {len(lacking) - 1} more nodes)" if len(lacking) > 1 else ""
        raise StudyError(f"node {node}{more} lacks {', '.join(what)}; fix: put it on a filesystem every node "
                         f"mounts at the same path, or copy it there")


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
