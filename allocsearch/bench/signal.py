"""``allocsearch bench signal``: does a search space have signal? The spread of validation scores across the
space against the seed-to-seed noise of one configuration, on whole trials (no early stopping, no search).

Noise: the space's first prior (LoRA r8 where the space has it; ``noise_from="first"``: the first sampled
configuration) trained on seeds 0..S-1 (the data split fixed). Spread: C distinct configurations sampled
uniformly from the space (Optuna's RandomSampler, seed 0), on seed 0. The ratio of the two standard
deviations says whether a search can tell configurations apart at all.

``every_seed`` runs every sampled configuration on every seed: the spread is then the one of the
configurations' means over seeds, the noise the pooled one of all of them (``confidence.pooled_noise``), and
each configuration's distance below the best is given in standard errors of that difference (more than 3:
separated from the best). A verdict needs it: twice (mix4, SmolLM2 on SST-2) the one configuration whose
noise the first mode measures had seeds that happened to agree, and ratios of 3.4-5.6 fell to 0.49-0.54.

``reuse``: rows of an earlier probe's JSON (same configuration summary and seed) are taken as made instead
of trained again; the output is rewritten after every trial, so an interrupted probe is reused the same way.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from allocsearch.errors import AllocsearchError

NOISE_PRIOR = "LoRA r8"  # the configuration whose seed noise the default mode measures, where the space has it
NOISE_FROM = ("prior", "first")
SEPARATED_SE = 3.0  # more standard errors below the best than this: separated from it


class SignalError(AllocsearchError):
    """A probe that cannot run (bad numbers, an unreadable --reuse file); one line with the fix."""


@dataclass
class Planned:
    """One trial of the probe: a configuration on a seed, and what it counts for."""
    name: str  # e.g. "random config 2 seed 1"
    params: dict
    seed: int
    in_spread: bool  # counts in the spread across the space
    noise: bool  # one of the seeds of the configuration whose noise the first mode measures


# ------------------------------------------------------------------------------------------ the numbers
def describe(values: list[float]) -> dict:
    """``{n, mean, std, range}`` of scores (std and range need two of them: None with fewer)."""
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if n > 1 else None,
            "range": max(values) - min(values) if n > 1 else None}


def ratio(spread: float | None, noise: float | None) -> float | None:
    """spread / noise; None where either is missing or no noise was measured (the seeds agreed exactly)."""
    if spread is None or not noise:
        return None
    return spread / noise


def over_seeds(rows: list[dict]) -> dict:
    """With every configuration on several seeds: each configuration's mean over its seeds, the pooled
    seed noise (the median rule of ``confidence.pooled_noise``), the spread (std) of the means, their ratio,
    and each configuration's distance below the best in standard errors of a difference of two means,
    ``(best - mean) / (noise * sqrt(1/n_best + 1/n))`` (None without a measured noise). Rows without a
    score (failed trials) count for nothing; a seed appearing twice for a configuration counts once."""
    from allocsearch.study.confidence import Estimate, pooled_noise

    by: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("objective") is not None:
            by.setdefault(r["summary"], {}).setdefault(int(r["seed"]), float(r["objective"]))
    ests = sorted((Estimate(key=k, params={}, values=v) for k, v in by.items()), key=lambda e: -e.mean)
    if not ests:
        return {"pooled_noise": None, "spread_of_means": None, "ratio_means": None, "configs": []}
    noise = pooled_noise(ests)
    best = ests[0]
    configs = [{"summary": e.key, "n": e.n, "mean": e.mean, "std": e.std,
                "below_best_se": (best.mean - e.mean) / (noise * math.sqrt(1 / best.n + 1 / e.n)) if noise else None}
               for e in ests]
    for c in configs:
        c["separated"] = c["below_best_se"] is not None and c["below_best_se"] > SEPARATED_SE
    spread = statistics.stdev([e.mean for e in ests]) if len(ests) > 1 else None
    return {"pooled_noise": noise, "spread_of_means": spread, "ratio_means": ratio(spread, noise), "configs": configs}


def verdict(rows: list[dict], every_seed: bool) -> dict:
    """The probe's numbers from its rows: ``noise`` (the noise configuration's seeds), ``spread`` (the
    runs that count in it), ``ratio_std``; with ``every_seed`` also ``over_seeds``'s."""
    noise = describe([r["objective"] for r in rows if r.get("noise_run") and r.get("objective") is not None])
    spread = describe([r["objective"] for r in rows if r.get("in_spread") and r.get("objective") is not None])
    out = {"noise": noise, "spread": spread, "ratio_std": ratio(spread["std"], noise["std"]),
           "seconds": sum(r.get("seconds") or 0.0 for r in rows),
           "failed": sum(r.get("objective") is None for r in rows)}
    if every_seed:
        out.update(over_seeds(rows))
    return out


# ------------------------------------------------------------------------------------------ the plan
def distinct_samples(space, layers: int, count: int) -> list[dict]:
    """``count`` distinct configurations drawn uniformly (RandomSampler, seed 0); fewer where a finite
    space has fewer. A draw that freezes every layer (placement groups all at 0) trains nothing: skipped."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    sampled: list[dict] = []
    for _ in range(50 * count):  # a finite space repeats draws
        params = space.sample(study.ask(), layers)
        if params not in sampled and not space.trains_nothing(params, layers):
            sampled.append(params)
        if len(sampled) == count:
            break
    return sampled


def plan(sampled: list[dict], priors: dict[str, dict], *, seeds: int, noise_from: str = "prior",
         every_seed: bool = False) -> tuple[str, list[Planned]]:
    """(the noise configuration's label, the trials to run). The noise configuration runs on every seed
    first; each sampled configuration on seed 0 (every seed with ``every_seed``). With ``noise_from
    first`` (or no prior), sampled configuration 0 is the noise configuration: its seed-0 run counts in
    the spread too, and it is not run twice. A trial the plan already holds (the prior sampled again, on
    the same seed) runs once and counts for both."""
    from allocsearch.study.confidence import config_key

    if noise_from == "prior" and priors:
        label = NOISE_PRIOR if NOISE_PRIOR in priors else next(iter(priors))
        noise_params, first = priors[label], False
    else:
        label, noise_params, first = "random config 0", sampled[0], True
    runs = [Planned(f"{label} seed {s}", noise_params, s, in_spread=first and s == 0, noise=True)
            for s in range(seeds)]
    held = {(config_key(r.params), r.seed): r for r in runs}
    for i, params in enumerate(sampled):
        if first and i == 0:
            continue
        for s in range(seeds if every_seed else 1):
            name = f"random config {i} seed {s}" if every_seed else f"random config {i}"
            same = held.get((config_key(params), s))
            if same is not None:
                same.in_spread = same.in_spread or s == 0
                continue
            held[(config_key(params), s)] = run = Planned(name, params, s, in_spread=s == 0, noise=False)
            runs.append(run)
    return label, runs


def read_reuse(path: str | Path) -> dict[tuple[str, int], dict]:
    """(summary, seed) -> row of an earlier probe's JSON output."""
    path = Path(path)
    if not path.is_file():
        raise SignalError(f"--reuse {path}: no such file; fix: give an earlier probe's JSON output (its --out)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
        return {(str(r["summary"]), int(r["seed"])): r for r in rows if "objective" in r}
    except (ValueError, KeyError, TypeError) as exc:
        raise SignalError(f"--reuse {path} is not a probe's output ({type(exc).__name__}: {exc}); fix: give "
                          f"the JSON an earlier 'allocsearch bench signal --out' wrote") from None


# ------------------------------------------------------------------------------------------ running it
@dataclass
class Probe:
    """A checked probe, ready to run (:func:`prepare`; nothing trained or written yet)."""
    space_name: str
    space: object  # SearchSpace
    layers: int
    label: str
    runs: list[Planned]
    made: dict
    every_seed: bool
    threads: int
    data_dir: str | None
    out: Path | None


def prepare(space: str, *, configs: int = 6, seeds: int = 3, threads: int = 2, data_dir: str | None = None,
            noise_from: str = "prior", every_seed: bool = False, reuse: str | Path | None = None,
            out: str | Path | None = None) -> Probe:
    """Check everything a probe needs and plan its trials; one-line errors, nothing written."""
    from allocsearch.search.space.space import load_space, model_depth, resolve_space_path

    if configs < 2:
        raise SignalError(f"--configs {configs}: a spread needs at least 2 configurations; fix: e.g. --configs 6")
    if seeds < 2:
        raise SignalError(f"--seeds {seeds}: seed noise needs at least 2 seeds; fix: e.g. --seeds 3")
    if threads < 1:
        raise SignalError(f"--threads {threads}: a trial trains on at least 1 thread; fix: e.g. --threads 2")
    if noise_from not in NOISE_FROM:
        raise SignalError(f"--noise-from {noise_from!r}; fix: use one of {', '.join(NOISE_FROM)}")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise SignalError(f"--data-dir {data_dir} is not a folder; fix: point it at the datasets folder")
    if out is not None and not Path(out).expanduser().resolve().parent.is_dir():
        raise SignalError(f"--out {out}: its folder does not exist; fix: create it or give another path")
    made = read_reuse(reuse) if reuse is not None else {}
    loaded = load_space(resolve_space_path(space))
    layers = model_depth(loaded.model)
    sampled = distinct_samples(loaded, layers, configs)
    if len(sampled) < 2:
        raise SignalError(f"space {space} has a single configuration: no spread to measure; fix: probe a space "
                          f"with at least 2")
    label, runs = plan(sampled, dict(loaded.priors(layers)), seeds=seeds, noise_from=noise_from,
                       every_seed=every_seed)
    return Probe(space, loaded, layers, label, runs, made, every_seed, threads,
                 str(Path(data_dir).expanduser().resolve()) if data_dir else None,
                 Path(out).expanduser() if out is not None else None)


def measure(probe: Probe, progress: Callable[[int, int, str], None] | None = None,
            train: Callable | None = None) -> dict:
    """Run the probe's trials (rows of earlier runs reused) and return the result: ``space``, ``model``,
    ``rows``, the noise configuration's ``label`` and :func:`verdict`'s numbers. ``train(spec, data_dir)``
    runs one trial (default ``run_trial``) and returns (status, objective)."""
    train = train or _train
    progress = progress or (lambda i, n, what: None)
    rows: list[dict] = []
    for i, run in enumerate(probe.runs):
        summary = probe.space.summarize(run.params)
        progress(i, len(probe.runs), run.name)
        flags = {"run": run.name, "in_spread": run.in_spread, "noise_run": run.noise}
        if (summary, run.seed) in probe.made:
            rows.append({**probe.made[(summary, run.seed)], **flags, "reused": True})
        else:
            spec = probe.space.trial_spec(run.params, probe.layers)
            spec["train"] = {**spec["train"], "seed": run.seed, "threads": probe.threads, "evaluate_test": False}
            spec["name"] = run.name.replace(" ", "-")
            t0 = time.perf_counter()
            status, objective = train(spec, probe.data_dir)
            rows.append({**flags, "summary": summary, "params": run.params, "seed": run.seed, "status": status,
                         "objective": objective, "seconds": time.perf_counter() - t0, "reused": False})
        _save(probe, {"rows": rows, "partial": True})
    progress(len(probe.runs), len(probe.runs), "done")
    result = {"rows": rows, "label": probe.label, "every_seed": probe.every_seed, **verdict(rows, probe.every_seed)}
    _save(probe, result)
    return _head(probe, result)


def _train(spec: dict, data_dir: str | None) -> tuple[str, float | None]:
    from allocsearch.training.trial import TrialSpec, run_trial

    result = run_trial(TrialSpec.from_dict(spec), data_dir=data_dir)
    return result.status, result.objective


def _head(probe: Probe, body: dict) -> dict:
    return {"space": probe.space_name, "model": probe.space.model, **body}


def _save(probe: Probe, body: dict) -> None:
    if probe.out is not None:
        from allocsearch.fileio import write_text_atomic

        write_text_atomic(probe.out, json.dumps(_head(probe, body), indent=2))


__all__ = ["NOISE_FROM", "Planned", "Probe", "SignalError", "describe", "distinct_samples", "measure", "over_seeds",
           "plan", "prepare", "ratio", "read_reuse", "verdict"]
