"""``allocsearch bench suite``: every recorded table, every strategy (the built-in ones and the peers), as
the field reports a benchmark suite: per table and over the suite, at each budget, the exported
configuration's true quality (mean +- standard error over replays), normalised regret, hit rate, and each
strategy's average rank across tables (by mean regret; ties share their ranks).

A table **with signal**: the allocations at its best configuration's training settings (its learning rate)
spread, as the standard deviation of their true means, at least ``SIGNAL_RATIO`` times the table's seed
noise. The goals (the issues'): on the tables with signal, default's regret at or below every peer's at 25%
and 50% of the grid, and below priors-only's by >= 2 standard errors where the table's space uses the
papers' priors (priors-only is not replayed where the space has none: it would export nothing); on the
known-answer tables, default's export puts the most rank in the answer's group in
>= 90% of replays at 25% of the grid.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable

from allocsearch.bench import compare
from allocsearch.bench.peers import PEERS
from allocsearch.bench.table import Table

SIGNAL_RATIO = 3.0
GOAL_BUDGETS = (0.25, 0.5)


def allocation_ratio(table: Table) -> float | None:
    """Spread (std) of the true means of the configurations that share the best one's training settings
    (parameters outside any method: the learning rate), over the table's seed noise; None without noise."""
    ests = table.estimates()
    settings = lambda p: {k: v for k, v in p.items() if "." not in k and k != "method"}  # noqa: E731
    peers = [e.mean for e in ests if settings(e.params) == settings(ests[0].params)]
    noise = table.noise()
    return statistics.pstdev(peers) / noise if noise and len(peers) > 1 else None


def run(tables: dict[str, Table], strategies: list[str], budgets: list[float], seeds: int, *,
        progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Replay every strategy on every table; returns per-table results, average ranks and the goals."""
    per: dict[str, dict] = {}
    for i, (name, table) in enumerate(tables.items()):
        step = (lambda done, total, what, name=name, i=i: progress(  # noqa: E731
            i * total + done, len(tables) * total, f"{name}: {what}")) if progress else None
        priors = bool((table.space or {}).get("priors", True))
        # priors-only on a space without priors (a known-answer placement space) would export nothing
        here = [s for s in strategies if priors or s != "priors-only"]
        result = compare.run(table, here, budgets, seeds,
                             max_concurrent=int(table.card.get("max_concurrent") or 1), progress=step)
        ratio = allocation_ratio(table)
        result.update(ratio=ratio, signal=ratio is not None and ratio >= SIGNAL_RATIO, priors=priors)
        per[name] = result
    out = {"tables": per, "strategies": strategies, "budgets": budgets, "seeds": seeds,
           "ranks": average_ranks(per, strategies, budgets)}
    out["goals"] = goals(out)
    return out


def average_ranks(per: dict[str, dict], strategies: list[str], budgets: list[float]) -> dict:
    """{budget: {strategy: its rank by mean regret among the strategies replayed on a table, averaged over
    the tables it was replayed on}} (1 = best)."""
    out = {}
    for b in budgets:
        ranks: dict[str, list[float]] = {s: [] for s in strategies}
        for result in per.values():
            regret = {r["strategy"]: r["regret"][0] for r in result["rows"] if r["budget"] == b}
            for s in regret:
                below = sum(v < regret[s] for v in regret.values())
                ties = sum(v == regret[s] for v in regret.values())
                ranks[s].append(below + (ties + 1) / 2)  # the mean of the ranks the ties share
        out[b] = {s: statistics.fmean(r) if r else None for s, r in ranks.items()}
    return out


def goals(suite: dict) -> list[tuple[str, bool | None, str]]:
    """(goal, met (None: nothing to judge it on), the numbers)."""
    peers = [s for s in suite["strategies"] if s in PEERS]
    out = []
    signal = {n: r for n, r in suite["tables"].items() if r["signal"] and not r.get("known_answer")}
    for b in [b for b in GOAL_BUDGETS if b in suite["budgets"]]:
        if not peers or "default" not in suite["strategies"]:
            break
        losses = []
        for name, result in signal.items():
            regret = {r["strategy"]: r["regret"] for r in result["rows"] if r["budget"] == b}
            losses += [f"{name}: {p} {regret[p][0]:.2f} < default {regret['default'][0]:.2f}" for p in peers
                       if regret[p][0] < regret["default"][0]]
        out.append((f"tables with signal: default's regret at or below every peer's at {b:.0%} of the grid",
                    (not losses) if signal else None,
                    "; ".join(losses) if losses else (f"on {', '.join(signal)}" if signal else
                                                      "no real-task table with signal in the suite")))
    judged = []
    for name, result in signal.items():
        if "priors-only" not in suite["strategies"] or not result["priors"]:
            continue
        rows = {(r["strategy"], r["budget"]): r for r in result["rows"]}
        for b in GOAL_BUDGETS:
            d, p = rows.get(("default", b)), rows.get(("priors-only", b))
            if d and p:
                se = math.hypot(d["regret"][1], p["regret"][1])
                judged.append((name, b, p["regret"][0] - d["regret"][0], se))
    out.append(("tables with signal: default's regret below priors-only's by >= 2 standard errors at 25% and 50%",
                all(gap >= 2 * se > 0 for _, _, gap, se in judged) if judged else None,
                "; ".join(f"{n} at {b:.0%}: {gap:+.2f} ({compare.in_se(gap, se)})"
                          for n, b, gap, se in judged) or "no real-task table with signal and priors"))
    for name, result in suite["tables"].items():
        answer = result.get("known_answer")
        row = next((r for r in result["rows"] if r["strategy"] == "default" and r["budget"] == 0.25), None)
        if answer and row:
            out.append(compare.placement_goal(answer, row, name))
    return out


__all__ = ["SIGNAL_RATIO", "allocation_ratio", "average_ranks", "goals", "run"]
