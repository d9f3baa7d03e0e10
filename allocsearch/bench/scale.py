"""``allocsearch bench scale``: the controller at the scale of a 64 GPU-hour study of short trials.

A replayed study of N trials (the default strategy: TPE with the papers' priors, the rungs, the
confirmation phase) on a synthetic table large enough that no configuration repeats by exhaustion (MoLA
experts per layer group x rank x learning rate: 6,144 configurations, every one answered by a formula of
its parameters plus seeded noise), with the study's real storage (SQLite, the ledger, a result file per
trial) in a folder that is kept. Measured per N: the controller's seconds per trial (over the whole study,
and between trial ends over its last tenth: what a trial costs once the study is that large), split into ``propose``
(Optuna's ask, the space's sampling, admission) and ``complete`` (tell, the ledger, records, the best), the
study folder's size, and how long ``status`` (``reports.status.summarize``, and the ``allocsearch status``
command as a user runs it) and the dashboard's data (``inspect_study`` + the spend timeline) take to load.
The goal: at 5,000 trials the overhead stays under 1% of a demo trial's device-seconds and ``status``
answers in under 2 s.
"""
from __future__ import annotations

import hashlib
import math
import random
import subprocess
import sys
import time
from pathlib import Path

from allocsearch.bench.table import Run, Table

SPACE = {
    "version": 1, "model": "tiny-llama",
    "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 16, "validation": 8, "test": 8}]},
    "train": {"steps": 100, "batch_size": 4, "max_length": 64, "eval_every": 25, "eval_examples": 8,
              "lr": {"choice": [5.0e-4, 1.0e-3, 2.0e-3]}},
    "methods": {"mola": {"experts": {"groups": 3, "each": {"choice": [1, 2, 3, 4, 5, 6, 7, 8]}}, "top_k": 1,
                         "rank": {"choice": [2, 4, 8, 16]}}},
}
TRIAL_SECONDS = 60.0  # device-seconds of one whole synthetic trial (a demo trial's order: 70-100 s)


class SyntheticTable(Table):
    """Every configuration of SPACE on 3 seeds, made on demand: quality a smooth function of the parameters
    (more experts up top, rank 8, lr 1e-3 best) plus seeded noise; checkpoints every 25 steps."""

    def __init__(self):
        super().__init__([], {"name": "synthetic-scale", "cpus_per_trial": 1.0, "budget_unit": "cpu",
                              "max_concurrent": 2}, SPACE)
        self.seeds = [0, 1, 2]

    def run(self, params: dict, seed_index: int) -> Run:
        experts = [params[f"mola.experts_g{g}"] for g in range(3)]
        truth = (0.80 + 0.004 * experts[2] - 0.002 * experts[0] - 0.01 * abs(math.log2(params["mola.rank"]) - 3)
                 - 0.02 * abs(math.log10(params["lr"]) + 3))
        digest = hashlib.sha256(f"{sorted(params.items())}/{seed_index}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        final = truth + rng.gauss(0, 0.01)
        checkpoints = [(s, final - 0.04 * (100 - s) / 100 + rng.gauss(0, 0.01), TRIAL_SECONDS * s / 100)
                       for s in (25, 50, 75)]
        return Run(params, seed_index, checkpoints, final, final, TRIAL_SECONDS + 2.0, TRIAL_SECONDS, 1000, 100)


def measure(trials: int, workdir: str | Path, *, seed: int = 0) -> dict:
    """One replayed study of about ``trials`` trials kept under ``workdir``; its costs (see the module)."""
    from allocsearch.bench.replay import replay
    from allocsearch.search.controller import Controller

    table = SyntheticTable()
    timers = {"propose": 0.0, "complete": 0.0}
    originals = {name: getattr(Controller, name) for name in ("propose", "on_complete")}
    ends: list[float] = []  # the wall clock at each trial's end

    def timed(name, key):
        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return originals[name](self, *args, **kwargs)
            finally:
                timers[key] += time.perf_counter() - t0
                if key == "complete":
                    ends.append(time.perf_counter())
        return wrapper

    Controller.propose, Controller.on_complete = timed("propose", "propose"), timed("on_complete", "complete")
    try:
        t0 = time.perf_counter()
        # a budget of N whole trials: the rungs stop some early, so a little more than N run
        trace = replay(table, "default", budget_seconds=trials * (TRIAL_SECONDS + 2.0), seed=seed, max_concurrent=2,
                       keep=workdir)
        wall = time.perf_counter() - t0
    finally:
        Controller.propose, Controller.on_complete = originals["propose"], originals["on_complete"]
    root = Path(workdir) / f"replay-default-{seed}"
    return {"trials": trace.trials, "seconds_per_trial": wall / trace.trials,
            "last_tenth_seconds_per_trial": last_tenth_per_trial(ends),
            "propose_per_trial": timers["propose"] / trace.trials, "complete_per_trial": timers["complete"] / trace.trials,
            "overhead_share": wall / trace.trials / TRIAL_SECONDS, "folder_mb": _size(root) / 1e6,
            **_read_times(root)}


def last_tenth_per_trial(ends: list[float]) -> float:
    """Seconds between trial ends over the last tenth of them (at least 2 ends): what a trial costs at the
    study's size, where the average over the whole study hides the growth."""
    tenth = max(2, len(ends) // 10)
    return (ends[-1] - ends[-tenth]) / (tenth - 1)


def _read_times(root: Path) -> dict:
    from allocsearch.reports import status

    t0 = time.perf_counter()
    summary = status.summarize(root)
    summarize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    status.inspect_study(root)
    status.spend_timeline(root, summary)
    dashboard_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "allocsearch", "status", "--study", root.name, "--workdir",
                           str(root.parent)], capture_output=True, text=True, timeout=600, check=False)
    command_s = time.perf_counter() - t0
    return {"summarize_s": summarize_s, "dashboard_data_s": dashboard_s, "status_command_s": command_s,
            "status_rc": done.returncode}


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


__all__ = ["SPACE", "SyntheticTable", "TRIAL_SECONDS", "last_tenth_per_trial", "measure"]
