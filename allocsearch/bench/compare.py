"""``allocsearch bench search``: strategies replayed on a recorded table, many seeds, several budgets, and
what a user pays for: the true quality of what each would export (its mean over the table's seeds, not
the lucky seed it was seen on), as a function of device-seconds.

Per strategy and budget (a share of the grid: every configuration once, in full), mean +- standard error
over the replay seeds:
- ``quality``: the exported configuration's true mean (``test_quality``: its mean test score, never used
  for any choice);
- ``regret``: normalised, 0 = the table's best true mean, 1 = the median configuration's;
- ``to_noise``: device-seconds until the export is within the seed noise of the best true mean (median over
  seeds; a seed that never gets there counts as never), and that as a share of the grid's device-seconds;
- ``hit``: how often the export is the true best or statistically tied with it: its true mean less than
  ``1.96 * noise * sqrt(1/n_best + 1/n)`` below the best's, with the table's seed noise (the median rule
  of ``confidence.pooled_noise``), and ``argmax_hit`` the same for the single-seed argmax the search had
  before its confirmation phase. Not a paired t-test on the table's 3 seeds (2 degrees of freedom): that
  called 29 of the SST-2 table's 33 configurations tied with the best, one whose seed collapsed (true
  mean 0.72 against 0.83) among them, so a search scored higher the more it exported such configurations;
  with the pooled noise 22 are;
- ``spent_share``: what the search spent, as a share of its budget (what it left unused: the rest);
- ``confirm_share``: what the confirmation runs spent, as a share of the budget;
- on a known-answer table (its card names the answer's layer group): ``placed``, how often the export puts
  strictly the most rank units in that group, and ``holds``, how often it has an adapter there at all.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable

from allocsearch.bench.placement import holds_any, holds_most
from allocsearch.bench.peers import replay_peer
from allocsearch.bench.replay import STRATEGIES, Trace, replay
from allocsearch.bench.table import Table
from allocsearch.study.confidence import beyond_noise
from allocsearch.errors import AllocsearchError

CURVE_POINTS = 40
GOAL_SHARE = 0.25  # the issues' goals are read at this share of the grid (the nearest replayed budget)


def parse_budgets(text: str) -> list[float]:
    """``10%,25%,50%`` -> [0.1, 0.25, 0.5] (shares of the grid's device-seconds)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise AllocsearchError(f"--budgets {text!r}: {part!r} is not a share; write e.g. 10%,25%,50%") from None
        if not 0 < value <= 10:
            raise AllocsearchError(f"--budgets {text!r}: {part} must be above 0% (and at most 1000% of the grid)")
        out.append(value)
    if not out:
        raise AllocsearchError("--budgets is empty; write e.g. 10%,25%,50%")
    return sorted(set(out))


def parse_strategies(text: str) -> list[str]:
    """Built-in strategies and peers (``optuna:tpe-hb``, ``ray:asha``, ...: ``allocsearch.bench.peers``)."""
    from allocsearch.bench.peers import PEERS, check_installed

    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [n for n in names if n not in STRATEGIES and n not in PEERS]
    if bad or not names:
        raise AllocsearchError(f"--strategies: {', '.join(bad) or '(none)'} unknown; use some of "
                               f"{', '.join([*STRATEGIES, *PEERS])}")
    for n in names:
        if n in PEERS:
            check_installed(n)
    return names


def confirm_reserve(name: str) -> float:
    """The share of the budget a strategy keeps for its confirmation runs (peers: none)."""
    return STRATEGIES[name]["confirm"] if name in STRATEGIES else 0.0


def run(table: Table, strategies: list[str], budgets: list[float], seeds: int, *, max_concurrent: int = 1,
        progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Replay every (strategy, budget, seed); returns {"rows": [...], "curves": {...}, "table": summary}."""
    import tempfile

    grid = table.grid_seconds()
    total, done = len(strategies) * len(budgets) * seeds, 0
    traces: dict[tuple[str, float], list[Trace]] = {}
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # no fsync cost for throw-away studies
    with tempfile.TemporaryDirectory(prefix="as-bench-", dir=shm) as work:
        for name in strategies:
            for share in budgets:
                for seed in range(seeds):
                    if progress:
                        progress(done, total, f"{name} at {share:.0%} of the grid, seed {seed}")
                    if name in STRATEGIES:
                        trace = replay(table, name, budget_seconds=share * grid, seed=seed,
                                       max_concurrent=max_concurrent, workdir=work)
                    else:
                        trace = replay_peer(table, name, budget_seconds=share * grid, seed=seed,
                                            max_concurrent=max_concurrent)
                    traces.setdefault((name, share), []).append(trace)
                    done += 1
    scorer = _Scorer(table)
    rows = [scorer.row(name, share, ts) for (name, share), ts in traces.items()]
    top = max(budgets)
    curves = {name: scorer.curve(traces[(name, top)], top * grid) for name in strategies}
    return {"rows": rows, "curves": curves, "table": table.summary(), "budgets": budgets, "seeds": seeds,
            "strategies": strategies, "curve_budget": top, "known_answer": table.card.get("known_answer")}


class _Scorer:
    def __init__(self, table: Table):
        self.table, self.grid = table, table.grid_seconds()
        ests = table.estimates()
        self.by_key = {e.key: e for e in ests}
        self.best, self.noise = ests[0], table.noise()
        self.median = statistics.median(e.mean for e in ests)
        self.answer = table.card.get("known_answer")
        self.test = table.truth("test") if all(r.test is not None for by in table.runs.values()
                                               for r in by.values()) else None

    def trainable(self, key: str | None) -> float | None:
        """The exported configuration's trainable parameters (None before any export)."""
        return next(iter(self.table.runs[key].values())).trainable_params if key else None

    def quality(self, key: str | None) -> float:
        return self.by_key[key].mean if key else self.median  # nothing exported yet: a configuration at random

    def regret(self, key: str | None) -> float:
        span = self.best.mean - self.median
        return (self.best.mean - self.quality(key)) / span if span > 0 else 0.0

    def hit(self, key: str | None) -> bool:
        return key is not None and (key == self.best.key or not beyond_noise(self.best, self.by_key[key], self.noise))

    def placed(self, traces: list[Trace], rule) -> float | None:
        """The share of ``traces`` whose export satisfies ``rule(params, answer)``; None off known-answer tables."""
        if not self.answer:
            return None
        return statistics.fmean(t.final is not None and rule(self.by_key[t.final].params, self.answer)
                                for t in traces)

    def to_noise(self, trace: Trace) -> float:
        for spent, key, _ in trace.points:
            if key and self.best.mean - self.quality(key) <= self.noise:
                return spent
        return math.inf

    def row(self, name: str, share: float, traces: list[Trace]) -> dict:
        q = [self.quality(t.final) for t in traces]
        reg = [self.regret(t.final) for t in traces]
        reach = [self.to_noise(t) for t in traces]
        med = statistics.median(reach)
        test = [self.test[t.final] if t.final else statistics.median(self.test.values()) for t in traces] \
            if self.test else None
        return {"strategy": name, "budget": share, "seeds": len(traces),
                "quality": _mean_se(q), "test_quality": _mean_se(test) if test else None, "regret": _mean_se(reg),
                "to_noise_seconds": med, "to_noise_share": med / self.grid,
                "reached": sum(math.isfinite(r) for r in reach) / len(reach),
                "hit": statistics.fmean(self.hit(t.final) for t in traces),
                "argmax_hit": statistics.fmean(self.hit(t.argmax) for t in traces),
                "placed": self.placed(traces, holds_most), "holds": self.placed(traces, holds_any),
                "trials": statistics.fmean(t.trials for t in traces),
                "spent_share": statistics.fmean(t.spent / t.budget for t in traces),
                "trainable": _mean_or_none([self.trainable(t.final) for t in traces]),
                "confirm_share": statistics.fmean(t.confirm_seconds / t.budget for t in traces),
                "confirm_reserve": confirm_reserve(name),
                "confirm_over": max(max(0.0, t.confirm_seconds - t.confirm_given) / t.budget for t in traces)}

    def curve(self, traces: list[Trace], budget: float) -> dict:
        xs = [budget * i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)]
        ys = [[self.quality(t.export_at(x)) for t in traces] for x in xs]
        return {"seconds": xs, "mean": [statistics.fmean(y) for y in ys],
                "se": [_mean_se(y)[1] for y in ys]}


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def _mean_or_none(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def cheapest_effect(result: dict) -> list[tuple[float, float, float, float]]:
    """``--prefer cheapest`` against the default at each budget: (budget, trainable parameters saved as a share
    of what the default exports, true quality given up (default minus cheapest), its standard error)."""
    rows = {(r["strategy"], r["budget"]): r for r in result["rows"]}
    out = []
    for b in result["budgets"]:
        d, c = rows.get(("default", b)), rows.get(("default-cheapest", b))
        if d and c and d["trainable"] and c["trainable"] is not None:
            se = math.hypot(d["quality"][1], c["quality"][1])
            out.append((b, 1 - c["trainable"] / d["trainable"], d["quality"][0] - c["quality"][0], se))
    return out


def _best_hit(rows: dict, budget: float) -> str:
    """The highest hit rate any replayed strategy reached at ``budget`` (what the budget allows at all)."""
    name, hit = max(((s, r["hit"]) for (s, b), r in rows.items() if b == budget), key=lambda x: x[1])
    return f"{name} {hit:.0%}"


def goals(result: dict) -> list[tuple[str, bool, str]]:
    """The issue's goals, measured: (goal, met, the numbers)."""
    rows = {(r["strategy"], r["budget"]): r for r in result["rows"]}
    out = []
    if any(s == "default" for s, _ in rows):
        d = [rows[("default", b)] for b in result["budgets"] if ("default", b) in rows]
        best = min(d, key=lambda r: r["to_noise_share"])
        share = best["to_noise_share"]
        out.append(("default within noise of the grid's best at <= 20% of the grid's device-seconds (median)",
                    share <= 0.2, f"{share:.0%} (at the {best['budget']:.0%} budget; reached in "
                                  f"{best['reached']:.0%} of seeds)" if math.isfinite(share) else "never"))
        if any(s == "random" for s, _ in rows):
            worse = [f"{b:.0%}" for b in result["budgets"] if ("random", b) in rows and ("default", b) in rows
                     and rows[("default", b)]["regret"][0] > rows[("random", b)]["regret"][0]]
            out.append(("default's normalised regret <= random search's at every budget", not worse,
                        "worse at " + ", ".join(worse) if worse else "at or below at every budget"))
        hit = min(r["hit"] for r in d)
        per = ", ".join(f"{r['hit']:.0%} (argmax {r['argmax_hit']:.0%}"
                        + ("" if r["confirm_share"] > 0 else ", no confirmation run")
                        + f"; best strategy {_best_hit(rows, r['budget'])}) at {r['budget']:.0%}" for r in d)
        out.append(("with confirmation, the export is the true best or tied in >= 90% of seeds", hit >= 0.9, per))
        over = max(r["confirm_over"] for r in d)
        spent = max(r["confirm_share"] for r in d)
        out.append(("the confirmation phase costs at most what it was given (its reserve + what the search "
                    "phase left)", over <= 0.005, f"spent up to {spent:.1%} of the budget on average at a budget; "
                    f"largest overspend {over:.1%}"))
    at = min(result["budgets"], key=lambda b: abs(b - GOAL_SHARE))  # the budget nearest 25% of the grid
    d, p = rows.get(("default", at)), rows.get(("priors-only", at))
    if d and p:
        gap, se = d["quality"][0] - p["quality"][0], math.hypot(d["quality"][1], p["quality"][1])
        out.append((f"default beats priors-only by >= 2 standard errors at {at:.0%} of the grid, and hits >= 90%",
                    gap >= 2 * se > 0 and d["hit"] >= 0.9,
                    f"{d['quality'][0]:.4f} vs {p['quality'][0]:.4f}: {gap:+.4f} = {in_se(gap, se)}; "
                    f"hit {d['hit']:.0%}"))
    answer = result.get("known_answer")
    if d and answer:
        out.append(placement_goal(answer, d))
    return out


def in_se(gap: float, se: float) -> str:
    """A difference in standard errors; without spread (every replay exported the same) "no SE": a zero
    difference is no evidence either way (it printed "+inf SE" before)."""
    if se:
        return f"{gap / se:+.1f} SE"
    return "+0.0 SE (identical exports)" if gap == 0 else f"{gap:+.4f} with no spread"


def placement_goal(answer: dict, row: dict, table: str = "") -> tuple[str, bool, str]:
    """The known-answer goal on default's ``row`` at a budget: the most rank in the answer's group in >= 90%."""
    where = f"{table} " if table else ""
    return (f"{where}known answer ({answer['group']} group): default's export puts the most rank in it in >= 90% "
            f"of replays at {row['budget']:.0%} of the grid", row["placed"] >= 0.9,
            f"{row['placed']:.0%} (an adapter there at all: {row['holds']:.0%})")


__all__ = ["cheapest_effect", "goals", "in_se", "parse_budgets", "parse_strategies", "placement_goal", "run"]
