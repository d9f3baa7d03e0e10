"""One trial inside a Ray worker: the function Ray Tune runs (``trainable``), and all it needs on that node.

Every validation checkpoint is reported to Tune, where the scheduler (ASHA) may stop the trial: Tune then
raises ``SystemExit`` inside ``tune.report``, which the trial turns into a clean early stop (its adapter and
results.json are still written). The trial also stops itself when its budget runs out: the controller
sends the seconds it may run (``budget_seconds``), measured here on the worker's own clock, so nodes need
no synchronised clocks. Its whole result comes back to the controller in the last report.

On a GPU: ``gpus`` < 1 (several trials packed on one GPU) caps this process's CUDA memory to its share,
so one trial cannot take the memory of its neighbours; a trial that needs more fails with "out of memory",
which the controller records as such (not as a crash). Python's fault handler writes a crash's stack
(segfault, abort) to ``worker.err`` in the trial folder, where the controller reads its last lines.
"""
from __future__ import annotations

import faulthandler
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

from ray import tune

from allocsearch.search.report import TrialReport
from allocsearch.study.ledger import device_seconds

WORKER_LOG = "worker.err"


def trainable(config: dict) -> None:
    """One trial. ``config``: number, spec (TrialSpec dict), trial_dir, data_dir, threads, devices (counted
    by the budget), gpus (this trial's share of a GPU), budget_seconds (how long it may run from now on
    this worker's clock; None: no cap)."""
    start = time.monotonic()
    log = _crash_log(config.get("trial_dir"))
    from allocsearch.training.trial import TrialSpec, run_trial

    devices, budget = float(config["devices"]), config.get("budget_seconds")
    deadline = None if budget is None else start + float(budget)
    _cap_gpu_memory(float(config.get("gpus") or 0.0))
    state: dict[str, Any] = {"params": None, "scheduler_stop": False}
    # training time between steps, checkpoint evaluations left out, so a trial the scheduler stops still
    # teaches the cost model its step time (the first step, which includes set-up, is not timed)
    clock: dict[str, Any] = {"mark": None, "seconds": 0.0, "steps": 0}

    def report(step: int, objective: float | None, **extra) -> None:
        wall = time.monotonic() - start
        tune.report(TrialReport(number=config["number"], step=step, objective=objective, wall_seconds=wall,
                                device_seconds=device_seconds(wall, devices), trainable_params=state["params"],
                                **extra).metrics())

    def over_cap() -> str | None:
        return "budget" if deadline is not None and time.monotonic() >= deadline else None

    def on_step(step: int, loss: float) -> str | None:
        now = time.perf_counter()
        if clock["mark"] is not None:
            clock["seconds"] += now - clock["mark"]
            clock["steps"] += 1
        clock["mark"] = now
        return over_cap()

    def on_checkpoint(step: int, metrics: dict) -> str | None:
        timed = {"train_seconds": clock["seconds"] / clock["steps"] * step} if clock["steps"] else {}
        try:
            report(step, metrics["macro_balanced_accuracy"], checkpoint=metrics, **timed)
        except SystemExit:  # Tune's scheduler (or a stop request) ended this trial: stop cleanly
            state["scheduler_stop"] = True
            return "scheduler"
        clock["mark"] = time.perf_counter()  # the evaluation just run is not training time
        return over_cap()

    def on_built(result) -> None:
        state["params"] = result.trainable_params

    result, failure = None, None
    try:
        spec = TrialSpec.from_dict(config["spec"])
        spec.train.threads = int(config["threads"])
        result = run_trial(spec, data_dir=config.get("data_dir"), out_dir=config.get("trial_dir"),
                           on_checkpoint=on_checkpoint, on_step=on_step, on_built=on_built,
                           final_eval_on_stop=False)
        failure = result.failure
    except Exception as exc:  # noqa: BLE001 - a trial that raises is recorded failed; the search goes on
        first = str(exc).splitlines()[0] if str(exc) else ""
        failure = f"{type(exc).__name__}: {first}"[:500]
    finally:
        _release_memory()
        if log is not None:
            faulthandler.disable()
            log.close()
    if state["scheduler_stop"]:
        return  # Tune has already ended this trial; its last checkpoint is its result
    try:
        report(result.steps if result else 0, None if failure else result.objective, final=True, failure=failure,
               status=result.status if result else "failed",
               result_json=json.dumps(result.to_dict()) if result else None)
    except SystemExit:
        pass


def _crash_log(trial_dir: str | None):
    """Python's fault handler to ``<trial_dir>/worker.err``: a segfault or abort leaves its stack there."""
    if not trial_dir:
        return None
    try:
        Path(trial_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(trial_dir) / WORKER_LOG, "w", encoding="utf-8")  # noqa: SIM115 - closed by the trial
    except OSError:
        return None
    faulthandler.enable(file=log, all_threads=True)
    return log


def _cap_gpu_memory(gpus: float) -> None:
    """A fractional GPU trial may use only its share of the GPU's memory (Ray sets CUDA_VISIBLE_DEVICES,
    so the trial's GPU is device 0)."""
    if not 0 < gpus < 1:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpus, 0)


def _release_memory() -> None:
    """Nothing of the trial may keep GPU memory after it."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def worker_log_tail(trial_dir: str | os.PathLike, lines: int = 5) -> str:
    """The last lines a trial's worker wrote to its crash log ('' when none or not visible here)."""
    try:
        text = (Path(trial_dir) / WORKER_LOG).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [ln for ln in kept if ln.startswith("Fatal Python error")][:1]  # what happened, then where
    return " | ".join(fatal + [ln for ln in kept[-lines:] if ln not in fatal])
