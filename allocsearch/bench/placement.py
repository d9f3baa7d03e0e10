"""Where a configuration puts its capacity, for the known-answer tables: rank units per layer group (an
expert count times its rank), and whether the group the table's construction names holds the most.

A known-answer table (``allocsearch bench known-answer`` then ``bench record``) carries its answer in its
card: ``known_answer = {"group": "middle", "index": 1, "groups": 3, "layers": [2, 3], ...}``. A
configuration of its space names each group's rank as ``<method>.rank_g<i>`` (and, for an MoE, its experts
as ``<method>.experts_g<i>``), or all groups' at once as a split of a fixed total, ``<method>.rank_split =
"0/2/4"``; a uniform ``<method>.rank`` / ``<method>.experts`` counts for every group.
"""
from __future__ import annotations

from allocsearch.search.space.dims import parse_split


def group_capacity(params: dict, groups: int) -> list[float]:
    """Rank units (experts x rank) of each of ``groups`` layer groups under ``params``."""
    methods = {k.split(".", 1)[0] for k in params if "." in k}
    if len(methods) != 1:
        raise ValueError(f"a placement is read from one method's parameters, got {sorted(methods) or 'none'}")
    m = methods.pop()

    def per_group(what: str, default: float) -> list[float]:
        split = params.get(f"{m}.{what}_split")
        if split is not None:
            values = [float(v) for v in parse_split(split)]
            if len(values) != groups:
                raise ValueError(f"{m}.{what}_split = {split!r} has {len(values)} groups, the answer {groups}")
            return values
        uniform = params.get(f"{m}.{what}", default)
        return [float(params.get(f"{m}.{what}_g{g}", uniform)) for g in range(groups)]

    return [e * r for e, r in zip(per_group("experts", 1), per_group("rank", 0))]


def holds_most(params: dict, answer: dict) -> bool:
    """The answer's group holds strictly more rank units than every other group."""
    cap = group_capacity(params, int(answer["groups"]))
    i = int(answer["index"])
    return cap[i] > max(c for g, c in enumerate(cap) if g != i)


def holds_any(params: dict, answer: dict) -> bool:
    """The answer's group holds some capacity (an adapter there at all)."""
    return group_capacity(params, int(answer["groups"]))[int(answer["index"])] > 0


__all__ = ["group_capacity", "holds_any", "holds_most"]
