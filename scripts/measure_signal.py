#!/usr/bin/env python3
"""Does a search space have signal? Compare the spread of validation scores across the space with the
seed-to-seed noise of one configuration, on whole trials (no early stopping), as the demo's choice needs.

    python3 scripts/measure_signal.py [--space demo] [--configs 6] [--seeds 3] [--out signal.json]

Noise: the first prior of the space (LoRA r8 where the space has LoRA; ``--noise-from first``: the first
sampled configuration) trained with seeds 0..S-1 (data split fixed). Spread: C distinct configurations
sampled uniformly from the space (Optuna RandomSampler, seed 0), seed 0. Prints a table and the ratio spread /
noise (standard deviations); writes the numbers as JSON.

``--every-seed`` runs every sampled configuration on every seed, so that the spread is the one of the
configurations' means over seeds, the noise the pooled one of all of them (``confidence.pooled_noise``),
and each configuration's distance below the best is printed in standard errors of that difference (a
configuration more than 3 below the best is separated from it). ``--reuse OLD.json`` takes the runs an
earlier probe already made (same configuration and seed) instead of training them again.
A verdict needs ``--every-seed``: twice (mix4, SmolLM2 on SST-2) the one configuration whose noise the
first mode measures had seeds that happened to agree, and ratios of 3.4-5.6 fell to 0.49-0.54.

Probing a benchmark task (issue 14): a probe space fixes a good learning rate, so the spread is the
allocations' alone; ``benchmarks/probes/*.yaml`` are the candidates measured for the README, e.g.

    python3 scripts/measure_signal.py --space benchmarks/probes/sst2-low-rank.yaml --noise-from first \
        --data-dir ../shared/datasets --out benchmarks/probes/sst2-low-rank.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="demo")
    ap.add_argument("--configs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--noise-from", choices=["prior", "first"], default="prior",
                    help="the configuration whose seed noise is measured: the space's first prior (LoRA r8 where "
                         "it has one) or the first sampled configuration (a probe space without usable priors)")
    ap.add_argument("--every-seed", action="store_true",
                    help="run every sampled configuration on every seed (the spread of means against pooled noise)")
    ap.add_argument("--reuse", type=Path, default=None, help="an earlier probe's JSON whose runs are taken as made")
    ap.add_argument("--out", type=Path, default=Path("signal.json"))
    args = ap.parse_args()
    if args.reuse is not None and not args.reuse.is_file():
        print(f"error: --reuse {args.reuse}: no such file; give an earlier probe's JSON output", file=sys.stderr)
        return 2

    import optuna

    from allocsearch.search.space.space import load_space, model_depth, resolve_space_path
    from allocsearch.training.trial import TrialSpec, run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(resolve_space_path(args.space))
    layers = model_depth(space.model)
    priors = dict(space.priors(layers))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    sampled: list[dict] = []
    for _ in range(50 * args.configs):  # distinct configurations (a finite space repeats draws)
        params = space.sample(study.ask(), layers)
        if params not in sampled:
            sampled.append(params)
        if len(sampled) == args.configs:
            break
    if args.noise_from == "prior" and priors:
        label = "LoRA r8" if "LoRA r8" in priors else next(iter(priors))
        noise_params = priors[label]
    else:
        label, noise_params = "random config 0", sampled[0]
    # (name, params, seed, counts in the spread); with --noise-from first, config 0's seed-0 run is both
    first = label == "random config 0"
    runs = [(f"{label} seed {s}", noise_params, s, first and s == 0) for s in range(args.seeds)]
    seeds = range(args.seeds) if args.every_seed else range(1)
    runs += [(f"random config {i} seed {s}" if args.every_seed else f"random config {i}", params, s,
              s == 0) for i, params in enumerate(sampled) for s in seeds if i >= int(first) or s > 0]
    made = {}
    if args.reuse is not None:
        made = {(r["summary"], r["seed"]): r for r in json.loads(args.reuse.read_text())["rows"]}

    rows = []
    for name, params, seed, in_spread in runs:
        if (space.summarize(params), seed) in made:
            rows.append({**made[(space.summarize(params), seed)], "run": name, "in_spread": in_spread, "reused": True})
            print(f"{name:<18} {space.summarize(params):<60} {rows[-1]['objective']:.4f}  (reused)", flush=True)
            continue
        spec = space.trial_spec(params, layers)
        spec["train"] = {**spec["train"], "seed": seed, "threads": args.threads, "evaluate_test": False}
        spec["name"] = name.replace(" ", "-")
        t0 = time.perf_counter()
        result = run_trial(TrialSpec.from_dict(spec), data_dir=args.data_dir)
        rows.append({"run": name, "summary": space.summarize(params), "seed": seed, "status": result.status,
                     "in_spread": in_spread, "objective": result.objective, "seconds": time.perf_counter() - t0})
        print(f"{name:<18} {space.summarize(params):<60} {result.objective if result.objective is not None else float('nan'):.4f}"
              f"  {rows[-1]['seconds']:.0f} s", flush=True)

    noise = [r["objective"] for r in rows[:args.seeds] if r["objective"] is not None]
    spread = [r["objective"] for r in rows if r["in_spread"] and r["objective"] is not None]
    out = {"space": args.space, "model": space.model, "rows": rows, "seconds": sum(r["seconds"] for r in rows),
           "noise": {"label": label, "mean": statistics.mean(noise), "std": statistics.stdev(noise),
                     "range": max(noise) - min(noise)},
           "spread": {"mean": statistics.mean(spread), "std": statistics.stdev(spread),
                      "range": max(spread) - min(spread)}}
    out["ratio_std"] = out["spread"]["std"] / max(out["noise"]["std"], 1e-9)
    if args.every_seed:
        out.update(_over_seeds(rows))
    print(f"\nseed noise ({label}, {len(noise)} seeds): mean {out['noise']['mean']:.4f} std {out['noise']['std']:.4f} "
          f"range {out['noise']['range']:.4f}")
    print(f"across the space ({len(spread)} configs): mean {out['spread']['mean']:.4f} std {out['spread']['std']:.4f} "
          f"range {out['spread']['range']:.4f}")
    print(f"spread / noise (std): {out['ratio_std']:.2f}   ({out['seconds'] / 60:.1f} min of trials)")
    if args.every_seed:
        print(f"\nover seeds: pooled seed noise {out['pooled_noise']:.4f}; spread of the {len(out['configs'])} "
              f"configurations' means (std) {out['spread_of_means']:.4f}; ratio {out['ratio_means']:.2f}")
        for c in out["configs"]:
            print(f"  {c['summary']:<60} {c['mean']:.4f} (n={c['n']})  {c['below_best_se']:5.1f} SE below the best")
    args.out.write_text(json.dumps(out, indent=2))
    return 0


def _over_seeds(rows: list[dict]) -> dict:
    """Each configuration's mean over its seeds, the pooled seed noise (the median rule of
    ``confidence.pooled_noise``), the spread of the means and each one's distance below the best in standard
    errors of a difference of two means, sigma * sqrt(1/n_best + 1/n)."""
    from allocsearch.study.confidence import Estimate, pooled_noise

    by: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["objective"] is not None:
            by.setdefault(r["summary"], {})[r["seed"]] = r["objective"]
    ests = [Estimate(key=k, params={}, values=v) for k, v in by.items()]
    noise = pooled_noise(ests) or 0.0
    ests.sort(key=lambda e: -e.mean)
    best = ests[0]
    configs = [{"summary": e.key, "n": e.n, "mean": e.mean, "std": e.std,
                "below_best_se": (best.mean - e.mean) / max(noise * math.sqrt(1 / best.n + 1 / e.n), 1e-9)}
               for e in ests]
    means = [e.mean for e in ests]
    spread = statistics.stdev(means) if len(means) > 1 else 0.0
    return {"pooled_noise": noise, "spread_of_means": spread, "ratio_means": spread / max(noise, 1e-9),
            "configs": configs}


if __name__ == "__main__":
    sys.exit(main())
