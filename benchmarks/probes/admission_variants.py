"""Probe: would the default start more configurations at small budgets, as the peers do, under another
admission rule? Replays the `default` strategy on every recorded table with one change to
``allocsearch.search.budget.BudgetKeeper`` or the controller, and prints each table's mean normalised regret
and trials at 10 / 25 / 50% of its grid (the suite's numbers; compare with `base`).

    python benchmarks/probes/admission_variants.py base 100       # the default as it ships
    python benchmarks/probes/admission_variants.py tight 100      # caps of predicted x margin (1.2), not x 2.5
    python benchmarks/probes/admission_variants.py nowait 100     # a cut trial admitted beside running ones
    python benchmarks/probes/admission_variants.py unseen1 100    # no headroom before two trials are seen

Run from the repository root; writes benchmarks/probes/admission-<variant>-<seeds>.json. The changes are
made in this process only (monkeypatched): none is in the package.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from allocsearch.bench import compare
from allocsearch.bench.table import Table
from allocsearch.search import budget, controller

TABLES = ["ka-middle", "ka-top", "ka-top-split", "sst2-minilm", "sst2-minilm-b", "sst2-placement", "sst2-split"]


def tight() -> None:
    init = budget.BudgetKeeper.__init__

    def patched(self, b, spent, *, margin=1.2, room=2.5, **kw):
        init(self, b, spent, margin=margin, room=margin, **kw)

    budget.BudgetKeeper.__init__ = patched


def nowait() -> None:
    admit = budget.BudgetKeeper.admit

    def patched(self, number, predicted, first, *, running, whole=False):
        return admit(self, number, predicted, first, running=0, whole=whole)

    budget.BudgetKeeper.admit = patched


def unseen1() -> None:
    controller.UNSEEN_FACTOR = 1.0


VARIANTS = {"base": lambda: None, "tight": tight, "nowait": nowait, "unseen1": unseen1}


def main(variant: str, seeds: int) -> None:
    VARIANTS[variant]()
    root = Path(__file__).resolve().parents[1]
    out = {}
    for name in TABLES:
        table = Table.load(root / name)
        result = compare.run(table, ["default"], [0.1, 0.25, 0.5], seeds,
                             max_concurrent=int(table.card.get("max_concurrent") or 1))
        out[name] = [{"budget": r["budget"], "regret": r["regret"], "trials": r["trials"]} for r in result["rows"]]
        print(variant, name, " ".join(f"{r['budget']:.0%}: regret {r['regret'][0]:.2f} +- {r['regret'][1]:.2f}, "
                                      f"{r['trials']:.2f} trials;" for r in out[name]), flush=True)
    (root / "probes" / f"admission-{variant}-{seeds}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python {sys.argv[0]} {{{'|'.join(VARIANTS)}}} SEEDS")
    main(sys.argv[1], int(sys.argv[2]))
