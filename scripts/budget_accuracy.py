#!/usr/bin/env python3
"""How close real searches end to their budget: spend / budget, trials by state and the end reason.

    python3 scripts/budget_accuracy.py [--budgets 1cpu-min,2cpu-min,4cpu-min,2min] [--workdir DIR] [--out r.json]

Each budget runs one real ``allocsearch start --json`` on the random tiny-llama (the space of
scripts/kill_resume.py: trials of ~10-20 s) in a fresh study, then reads ``allocsearch status --json``.
A search passes when its spend is within 1% of the budget (0.99 <= spend / budget <= 1.01), or it ended
earlier saying why ("nothing more fits: ..."), and never spends more than 1.01 x the budget. Exit 1 if any
search fails. Ray's temp folders go to a temp dir that is removed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from kill_resume import SPACE  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="1cpu-min,2cpu-min,4cpu-min,2min")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--workdir", default=None, help="default: a new temp folder (kept)")
    p.add_argument("--out", default=None, help="JSON report (default: <workdir>/budget_accuracy.json)")
    args = p.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="budget-accuracy-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    space = base / "space.yaml"
    space.write_text(SPACE.replace("STEPS", str(args.steps)).replace("EVERY", str(max(1, args.steps // 4))))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ba-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(ray_tmp),
           "HF_HOME": str(base / "cache" / "hf"), "ALLOCSEARCH_CACHE": str(base / "cache" / "allocsearch")}
    rows = []
    try:
        for i, budget in enumerate(b.strip() for b in args.budgets.split(",")):
            study = f"b{i}-{budget.replace('.', '_')}"
            cli = [sys.executable, "-m", "allocsearch"]
            start = subprocess.run([*cli, "start", "--budget", budget, "--space", str(space), "--workdir", str(base),
                                    "--study", study, "--json"], cwd=REPO, env=env, capture_output=True, text=True)
            (base / f"{study}.err").write_text(start.stderr)
            status = subprocess.run([*cli, "status", "--workdir", str(base), "--study", study, "--json"], cwd=REPO,
                                    env=env, capture_output=True, text=True)
            s = json.loads(status.stdout)
            end = json.loads(start.stdout).get("end_reason") if start.returncode == 0 and start.stdout.strip() else None
            frac = s["budget"]["spent"] / s["budget"]["total"]
            early = bool(end and end.startswith("nothing more fits"))
            ok = start.returncode == 0 and frac <= 1.01 and (frac >= 0.99 or early)
            over = cap_overruns(base / study)
            rows.append({"budget": budget, "cap_overruns": over, "exit": start.returncode, "spent": s["budget"]["spent"],
                         "total": s["budget"]["total"], "fraction": frac, "end_reason": end, "ok": ok,
                         "counts": {k: v for k, v in s["counts"].items() if v},
                         "trials": [{k: t[k] for k in ("number", "state", "spend", "predicted", "steps", "reason")}
                                    for t in s["trials"]]})
            print(f"{budget:>9}: exit {start.returncode}, spend {s['budget']['spent']:.1f} / {s['budget']['total']:.0f} s"
                  f" = {frac:.4f}, {rows[-1]['counts']}, {'ok' if ok else 'FAIL'}: {end}", flush=True)
            for n, (spend, cap) in over.items():
                print(f"           trial {n} spent {spend:.2f} s, {spend - cap:+.2f} s past its cap {cap:.2f} s")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\n{'budget':>9} {'spent s':>8} {'total s':>7} {'spent/budget':>12} {'ok':>4}  trials by state / end reason")
    for r in rows:
        print(f"{r['budget']:>9} {r['spent']:>8.1f} {r['total']:>7.0f} {r['fraction']:>12.4f} {'yes' if r['ok'] else 'NO':>4}"
              f"  {r['counts']}\n{'':>45}{r['end_reason']}")
    out = Path(args.out or base / "budget_accuracy.json")
    out.write_text(json.dumps(rows, indent=2))
    print(f"report: {out}")
    return 0 if all(r["ok"] for r in rows) else 1


def cap_overruns(root: Path) -> dict[int, tuple[float, float]]:
    """Trials whose spend passed the cap they were admitted with: number -> (spend, cap)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=root.name, storage=f"sqlite:///{root / 'optuna.db'}")
    return {t.number: (t.user_attrs["device_seconds"], t.user_attrs["cap"]) for t in study.get_trials()
            if "cap" in t.user_attrs and t.user_attrs.get("device_seconds", 0) > t.user_attrs["cap"]}


if __name__ == "__main__":
    sys.exit(main())
