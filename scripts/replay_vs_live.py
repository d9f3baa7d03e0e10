#!/usr/bin/env python3
"""Does the replay tell the truth? Run live searches on a recorded table's own space and budget, and check
that the true quality of what each exports (its mean over the table's seeds) falls inside the distribution
the replay predicts for the same strategy and budget.

    python3 scripts/replay_vs_live.py --table benchmarks/sst2-minilm --budget 0.25cpu-h --live 3 --seeds 20

Live: ``allocsearch start --space <table>/space.yaml --budget B --seed k`` (k = 0..live-1, each its own
study, with the recording's --cpus-per-trial / --max-concurrent and no --noise: a live search measures its
seed noise from its own repeats, as the replay's strategies do), then the configuration ``status`` names best. Replay: the ``default`` strategy at the same budget, ``--seeds`` replays. Prints both, each live
search's percentile in the replay's distribution, and writes JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True)
    ap.add_argument("--budget", required=True, help="e.g. 0.25cpu-h (the live searches' and the replay's)")
    ap.add_argument("--live", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--strategy", default="default")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from allocsearch.bench.replay import replay
    from allocsearch.bench.table import Table
    from allocsearch.study.confidence import config_key
    from allocsearch.search.budget import Budget

    table = Table.load(args.table)
    truth = table.truth()
    budget = Budget.parse(args.budget)
    cpus = str(table.card.get("cpus_per_trial") or 1)
    concurrent = str(table.card.get("max_concurrent") or 1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="as-live-"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    live = []
    for k in range(args.live):
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "allocsearch", "start", "--space", str(Path(args.table) / "space.yaml"),
                               "--budget", args.budget, "--study", f"live-{k}", "--workdir", str(work), "--seed", str(k),
                               "--cpus-per-trial", cpus, "--max-concurrent", concurrent, "--no-mlflow", "--json"],
                              capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        summary = json.loads(proc.stdout)
        best = summary["best"]
        key = config_key(best["params"]) if best else None
        live.append({"study": f"live-{k}", "seconds": time.time() - t0, "exported": best["summary"] if best else None,
                     "true": truth.get(key), "seen": (summary.get("evidence") or {}).get("winner", {}).get("mean"),
                     "trials": len(summary["trials"]), "end": summary.get("end_reason")})
        print(f"live {k}: {live[-1]['exported']}  true {live[-1]['true']}  seen {live[-1]['seen']}  "
              f"({live[-1]['trials']} trials, {live[-1]['seconds']:.0f} s)", flush=True)
    traces = [replay(table, args.strategy, budget_seconds=budget.seconds, seed=s, max_concurrent=int(concurrent))
              for s in range(args.seeds)]
    dist = sorted(truth[t.final] if t.final else statistics.median(truth.values()) for t in traces)
    mean, sd = statistics.fmean(dist), statistics.pstdev(dist)
    print(f"replay ({args.strategy}, {args.seeds} seeds, {args.budget}): true quality mean {mean:.4f} sd {sd:.4f} "
          f"range {dist[0]:.4f}-{dist[-1]:.4f}")
    for r in live:
        if r["true"] is None:
            print(f"{r['study']}: exported a configuration outside the table")
            continue
        r["percentile"] = sum(v <= r["true"] for v in dist) / len(dist)
        r["inside_range"] = dist[0] <= r["true"] <= dist[-1]
        print(f"{r['study']}: true {r['true']:.4f}, at the replay's {r['percentile']:.0%} percentile, "
              f"{'inside' if r['inside_range'] else 'OUTSIDE'} its range, {(r['true'] - mean) / sd if sd else 0:+.2f} sd")
    if args.out:
        args.out.write_text(json.dumps({"live": live, "replay": dist, "budget": args.budget}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
