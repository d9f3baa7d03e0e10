"""``allocsearch bench live``: does the replay tell the truth? Run live searches on a recorded table's own
space and budget, and check that the true quality of what each exports (its mean over the table's seeds)
falls inside the distribution the replay (``allocsearch.bench.replay``) predicts for the same strategy and
budget.

Live: ``allocsearch start`` on ``<table>/space.yaml`` with the budget, as study ``live-K`` (seed K,
K = 0..live-1), with the recording's cpus-per-trial and max-concurrent and no declared noise (a live search
measures its seed noise from its own repeats, as the replay's strategies do); its export is the
configuration ``status`` names best. Replay: the strategy (default: ``default``, what ``start`` runs) at the
same budget, once per replay seed.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from allocsearch.errors import AllocsearchError


class LiveError(AllocsearchError):
    """A live-vs-replay check that cannot run (bad numbers, a budget the table cannot replay); one line."""


@dataclass
class Check:
    """A checked live-vs-replay run (:func:`prepare`; nothing run or written yet)."""
    table_dir: Path
    table: object  # bench.table.Table
    budget: object  # search.budget.Budget
    live: int
    seeds: int
    strategy: str
    cpus_per_trial: float
    max_concurrent: int
    data_dir: str | None


def prepare(table_dir: str | Path, budget: str, *, live: int = 3, seeds: int = 20, strategy: str = "default",
            data_dir: str | None = None) -> Check:
    """Check the table, budget and numbers; one-line errors, nothing written."""
    from allocsearch.bench.replay import STRATEGIES
    from allocsearch.bench.table import Table
    from allocsearch.search.budget import Budget

    if live < 1:
        raise LiveError(f"--live {live}: run at least one live search; fix: e.g. --live 3")
    if seeds < 2:
        raise LiveError(f"--seeds {seeds}: a predicted distribution needs at least 2 replays; fix: e.g. --seeds 20")
    if strategy not in STRATEGIES:
        raise LiveError(f"--strategy {strategy!r} is not a replayed strategy; fix: use one of "
                        f"{', '.join(STRATEGIES)} (default: what allocsearch start runs)")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise LiveError(f"--data-dir {data_dir} is not a folder; fix: point it at the datasets folder")
    parsed = Budget.parse(budget)
    table = Table.load(table_dir)
    if table.space is None or not (Path(table_dir) / "space.yaml").is_file():
        raise LiveError(f"{table_dir} has no space.yaml; fix: give a table folder written by "
                        f"'allocsearch bench record' whole (table.csv, card.json, space.yaml)")
    unit = table.card.get("budget_unit") or "cpu"
    if parsed.unit != unit:
        raise LiveError(f"--budget {budget}: the table counts {unit} device-time and the replay can only spend "
                        f"that; fix: give a {unit} budget, e.g. --budget 0.25{unit}-h")
    return Check(Path(table_dir), table, parsed, live, seeds, strategy,
                 float(table.card.get("cpus_per_trial") or 1.0), int(table.card.get("max_concurrent") or 1),
                 str(Path(data_dir).expanduser().resolve()) if data_dir else None)


# ------------------------------------------------------------------------------------------ the live searches
def live_search(check: Check, k: int, workdir: str | Path, on_event: Callable | None = None) -> dict:
    """Run live search ``k`` (study ``live-K`` in ``workdir``; one already there is resumed, a finished one
    read as it ended) and return what it exported, with its true quality from the table."""
    import time

    from allocsearch.reports.status import summarize
    from allocsearch.search.session import StartOptions, run

    t0 = time.time()
    opts = StartOptions(budget=check.budget.text, space=str(check.table_dir / "space.yaml"), study=f"live-{k}",
                        workdir=str(workdir), data_dir=check.data_dir, seed=k, cpus_per_trial=check.cpus_per_trial,
                        max_concurrent=check.max_concurrent, mlflow=False)
    outcome = run(opts, on_event=on_event)
    return exported(f"live-{k}", summarize(outcome.root), check.table.truth(), time.time() - t0,
                    outcome.end_reason)


def exported(study: str, summary: dict, truth: dict[str, float], seconds: float, end_reason: str | None) -> dict:
    """One live search's row: the configuration its summary names best, its true quality (None: no export,
    or one outside the table), the score the search itself saw (its mean over its seeds)."""
    from allocsearch.study.confidence import config_key

    best = summary.get("best")
    key = config_key(best["params"]) if best else None
    return {"study": study, "exported": best["summary"] if best else None, "params": best["params"] if best else None,
            "true": truth.get(key) if key else None, "seen": best["value"] if best else None,
            "seen_n": best["n"] if best else None, "trials": len(summary.get("trials") or []),
            "seconds": seconds, "end": end_reason}


# ------------------------------------------------------------------------------------------ the prediction
def predicted(check: Check, progress: Callable[[int, int, str], None] | None = None) -> list[float]:
    """The true quality of what the replayed strategy exports at the budget, one per replay seed, sorted.
    A replay that exported nothing counts as the table's median configuration (regret 1)."""
    from allocsearch.bench.replay import replay

    progress = progress or (lambda i, n, what: None)
    truth = check.table.truth()
    median = statistics.median(truth.values())
    out = []
    for s in range(check.seeds):
        progress(s, check.seeds, f"{check.strategy} seed {s}")
        trace = replay(check.table, check.strategy, budget_seconds=check.budget.seconds, seed=s,
                       max_concurrent=check.max_concurrent)
        out.append(truth[trace.final] if trace.final else median)
    progress(check.seeds, check.seeds, "done")
    return sorted(out)


def compare(live: list[dict], dist: list[float]) -> dict:
    """Each live search's true quality placed in the replay's distribution: its percentile (the share of
    replays at or below it), whether it lies inside the replays' range, its distance from their mean in
    their standard deviations; ``inside``: how many of the live searches with a true quality lie inside,
    ``agrees``: every live search exported a configuration of the table and each lies inside."""
    if len(dist) < 1:
        raise LiveError("no replayed searches to compare with; fix: --seeds 2 or more")
    dist = sorted(dist)
    mean, sd = statistics.fmean(dist), statistics.pstdev(dist)
    rows = []
    for r in live:
        r = dict(r)
        if r.get("true") is None:
            r.update(percentile=None, inside_range=None, sd_from_mean=None)
        else:
            r["percentile"] = sum(v <= r["true"] for v in dist) / len(dist)
            r["inside_range"] = dist[0] <= r["true"] <= dist[-1]
            r["sd_from_mean"] = (r["true"] - mean) / sd if sd else 0.0
        rows.append(r)
    judged = [r for r in rows if r["inside_range"] is not None]
    inside = sum(r["inside_range"] for r in judged)
    return {"live": rows, "replay": {"values": dist, "mean": mean, "sd": sd, "low": dist[0], "high": dist[-1]},
            "inside": inside, "judged": len(judged), "outside_table": len(rows) - len(judged),
            "agrees": bool(rows) and inside == len(rows)}


__all__ = ["Check", "LiveError", "compare", "exported", "live_search", "predicted", "prepare"]
