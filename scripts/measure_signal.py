#!/usr/bin/env python3
"""Does a search space have signal? Compare the spread of validation scores across the space with the
seed-to-seed noise of one configuration, on whole trials (no early stopping), as the demo's choice needs.

    python3 scripts/measure_signal.py [--space demo] [--configs 6] [--seeds 3] [--out signal.json]

Noise: the first prior of the space (LoRA r8 where the space has LoRA) trained with seeds 0..S-1 (data
split fixed). Spread: C configurations sampled uniformly from the space (Optuna RandomSampler, seed 0),
seed 0. Prints a table and the ratio spread / noise (standard deviations); writes the numbers as JSON.
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
    ap.add_argument("--out", type=Path, default=Path("signal.json"))
    args = ap.parse_args()

    import optuna

    from allocsearch.search.space import load_space, model_depth, resolve_space_path
    from allocsearch.trial import TrialSpec, run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(resolve_space_path(args.space))
    layers = model_depth(space.model)
    priors = dict(space.priors(layers))
    label = "LoRA r8" if "LoRA r8" in priors else next(iter(priors))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    runs = [(f"{label} seed {s}", priors[label], s) for s in range(args.seeds)]
    for i in range(args.configs):
        trial = study.ask()
        runs.append((f"random config {i}", space.sample(trial, layers), 0))

    rows = []
    for name, params, seed in runs:
        spec = space.trial_spec(params, layers)
        spec["train"] = {**spec["train"], "seed": seed, "threads": args.threads, "evaluate_test": False}
        spec["name"] = name.replace(" ", "-")
        t0 = time.perf_counter()
        result = run_trial(TrialSpec.from_dict(spec), data_dir=args.data_dir)
        rows.append({"run": name, "summary": space.summarize(params), "seed": seed, "status": result.status,
                     "objective": result.objective, "seconds": time.perf_counter() - t0})
        print(f"{name:<18} {space.summarize(params):<60} {result.objective if result.objective is not None else float('nan'):.4f}"
              f"  {rows[-1]['seconds']:.0f} s", flush=True)

    noise = [r["objective"] for r in rows[:args.seeds] if r["objective"] is not None]
    spread = [r["objective"] for r in rows[args.seeds:] if r["objective"] is not None]
    out = {"space": args.space, "model": space.model, "rows": rows,
           "noise": {"label": label, "mean": statistics.mean(noise), "std": statistics.stdev(noise),
                     "range": max(noise) - min(noise)},
           "spread": {"mean": statistics.mean(spread), "std": statistics.stdev(spread),
                      "range": max(spread) - min(spread)}}
    out["ratio_std"] = out["spread"]["std"] / max(out["noise"]["std"], 1e-9)
    print(f"\nseed noise ({label}, {len(noise)} seeds): mean {out['noise']['mean']:.4f} std {out['noise']['std']:.4f} "
          f"range {out['noise']['range']:.4f}")
    print(f"across the space ({len(spread)} configs): mean {out['spread']['mean']:.4f} std {out['spread']['std']:.4f} "
          f"range {out['spread']['range']:.4f}")
    print(f"spread / noise (std): {out['ratio_std']:.2f}")
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
