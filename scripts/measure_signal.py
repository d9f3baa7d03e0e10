#!/usr/bin/env python3
"""Does a search space have signal? Compare the spread of validation scores across the space with the
seed-to-seed noise of one configuration, on whole trials (no early stopping), as the demo's choice needs.

    python3 scripts/measure_signal.py [--space demo] [--configs 6] [--seeds 3] [--out signal.json]

Noise: the first prior of the space (LoRA r8 where the space has LoRA; ``--noise-from first``: the first
sampled configuration) trained with seeds 0..S-1 (data split fixed). Spread: C distinct configurations
sampled uniformly from the space (Optuna RandomSampler, seed 0), seed 0. Prints a table and the ratio spread /
noise (standard deviations); writes the numbers as JSON.

Probing a benchmark task (issue 14): a probe space fixes a good learning rate, so the spread is the
allocations' alone; ``benchmarks/probes/*.yaml`` are the candidates measured for the README, e.g.

    python3 scripts/measure_signal.py --space benchmarks/probes/sst2-low-rank.yaml --noise-from first \
        --data-dir ../shared/datasets --out benchmarks/probes/sst2-low-rank.json
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--out", type=Path, default=Path("signal.json"))
    args = ap.parse_args()

    import optuna

    from allocsearch.search.space import load_space, model_depth, resolve_space_path
    from allocsearch.trial import TrialSpec, run_trial

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
    runs += [(f"random config {i}", params, 0, True) for i, params in enumerate(sampled) if i >= int(first)]

    rows = []
    for name, params, seed, in_spread in runs:
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
    print(f"\nseed noise ({label}, {len(noise)} seeds): mean {out['noise']['mean']:.4f} std {out['noise']['std']:.4f} "
          f"range {out['noise']['range']:.4f}")
    print(f"across the space ({len(spread)} configs): mean {out['spread']['mean']:.4f} std {out['spread']['std']:.4f} "
          f"range {out['spread']['range']:.4f}")
    print(f"spread / noise (std): {out['ratio_std']:.2f}   ({out['seconds'] / 60:.1f} min of trials)")
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
