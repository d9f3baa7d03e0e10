"""How close real searches end to their budget. One test per budget of ALLOCSEARCH_RELIABILITY_BUDGETS
(comma-separated; default 1cpu-min,2cpu-min,4cpu-min,2min): one real ``allocsearch start --json`` on the
random tiny-llama (trials of ~10-20 s) in a fresh study, then ``allocsearch status --json``. A search passes
when it exits 0 with one JSON document, never spends more than 1.01 x the budget, and either spends within 1%
of it (0.99 <= spend / budget) or ended earlier saying that nothing more fits ("nothing more fits: ..." in the
search phase; "confirmation ended: no finalist's next whole run fits in what is left of the budget (...)" in
the confirmation race); the usual end checks hold (nothing duplicated, paid twice or left RUNNING). A trial
whose spend passed the cap it was admitted with is printed as a note (the budget is what is held).
"""
from __future__ import annotations

import pytest

from allocsearch.search.confirmation import OUT_OF_BUDGET
from allocsearch.study.folder import Study
from allocsearch.study.records import Attr
from allocsearch.study.storage import TrialStore

from .harness import STUDY, Knobs, Run, allocsearch_json, audit_end, snapshot

pytestmark = pytest.mark.system


def _budgets() -> list[str]:
    try:
        return Knobs.from_env().budget_list()
    except Exception:  # noqa: BLE001 - the knobs fixture reports a bad setting; collection must not break
        return Knobs().budget_list()


@pytest.mark.parametrize("budget", _budgets())
def test_a_search_ends_at_its_budget(new_case, knobs, budget):
    case = new_case(f"budget-{budget}", f"budget accuracy {budget}")
    space = case.space(knobs.steps)
    run = Run(case, ["--budget", budget, "--space", str(space)])
    rc = run.wait(knobs.timeout)
    run.close()
    doc = audit_end(case, snapshot(case.root), run, rc)
    status, p = allocsearch_json(case, "status")
    assert status is not None, f"'status --json' exit {p.returncode}: {p.stderr[-500:]}"
    spent, total = status["budget"]["spent"], status["budget"]["total"]
    frac = spent / total
    end = doc.get("end_reason") or ""
    early = end.startswith("nothing more fits") or OUT_OF_BUDGET in end  # the search / the confirmation race
    counts = {k: v for k, v in status["counts"].items() if v}
    case.say(f"{budget}: exit {rc}, spend {spent:.1f} / {total:.0f} s = {frac:.4f}, {counts}: {end}")
    if frac < 0.99 and not early:  # above 1.01: audit_end's check
        case.fail(f"spend / budget {frac:.4f} < 0.99 and the search did not say nothing more fits ({end!r})")
    for n, (spend, cap) in cap_overruns(case).items():
        case.notes.append(f"trial {n} spent {spend:.2f} s, {spend - cap:+.2f} s past its cap {cap:.2f} s")
    case.summary = f"spend / budget {frac:.4f}; {counts}; {end[:80]}"
    case.verify()


def cap_overruns(case) -> dict[int, tuple[float, float]]:
    """Trials whose spend passed the cap they were admitted with: number -> (spend, cap)."""
    store = TrialStore.read(Study.open(case.dir, STUDY))
    trials = store.trials() if store is not None else []
    return {t.number: (t.user_attrs[Attr.DEVICE_SECONDS], t.user_attrs[Attr.CAP]) for t in trials
            if Attr.CAP in t.user_attrs and t.user_attrs.get(Attr.DEVICE_SECONDS, 0) > t.user_attrs[Attr.CAP]}
