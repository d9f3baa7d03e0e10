"""Ray Tune runs the trials; this module is everything that knows Ray.

- :func:`trainable` runs one trial (``allocsearch.trial.run_trial``) in a Ray worker with the resources
  the trial asked for. Every fidelity checkpoint (validation) is reported to Tune, where the scheduler
  (ASHA / Hyperband) may stop it: Tune then raises ``SystemExit`` inside ``tune.report``, which the trial
  turns into a clean early stop (its adapter and results.json are still written). The trial also stops
  itself when its own cost reaches the cap the controller admitted it with, so concurrent trials can never
  spend past the budget. Its result comes back to the controller through Ray in the last report.
- :class:`StudySearcher` is Tune's ``OptunaSearch`` bound to the study's Optuna storage, with the
  controller deciding what runs (budget admission, stop requests) and what Optuna is told.
- :class:`ControllerCallback` gives the controller Tune's loop ticks (the ledger heartbeat) and trial starts.
- :func:`run` starts (or joins, with an address) a Ray cluster, runs the Tuner, and shuts Ray down.

Where results live on a cluster (``--ray-address``): everything the study records (trial configs, metrics,
checkpoints, costs, results.json) comes back through Ray and is written by the controller, so the study
directory is complete whether or not the workers can see it. Adapter weights are written by the worker at
the trial folder's path: on the controller's machine or a shared filesystem that is the study directory.
"""
from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

if TYPE_CHECKING:  # pragma: no cover
    from allocsearch.search.controller import Controller

METRIC, TIME_ATTR = "objective", "step"
# the env Ray's processes need: no auth prompt, no telemetry, the trial thread given time to wrap up
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60",
           "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
           "TUNE_MAX_PENDING_TRIALS_PG": "1", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1e9",
           "RAY_AIR_NEW_OUTPUT": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}


# ------------------------------------------------------------------------------------------ the trial
def trainable(config: dict) -> None:
    """One trial in a Ray worker. ``config``: number, spec (TrialSpec dict), trial_dir, data_dir, threads,
    devices (counted by the budget), deadline (unix time the trial's budget cap runs out; None: no cap).
    The deadline is absolute because the controller counts the trial's spend from the moment Ray starts
    it, worker start-up included, which this function cannot see."""
    from allocsearch.trial import TrialSpec, run_trial

    start = time.monotonic()
    devices, deadline = float(config["devices"]), config.get("deadline")
    state: dict[str, Any] = {"params": None, "scheduler_stop": False}
    # training time between steps, checkpoint evaluations left out, so a trial the scheduler stops still
    # teaches the cost model its step time (the first step, which includes set-up, is not timed)
    clock: dict[str, Any] = {"mark": None, "seconds": 0.0, "steps": 0}

    def report(step: int, objective: float | None, **extra) -> None:
        wall = time.monotonic() - start
        metrics = {TIME_ATTR: step, "wall_seconds": wall, "device_seconds": wall * devices,
                   "trainable_params": state["params"], "number": config["number"], **extra}
        if objective is not None:
            metrics[METRIC] = objective
        tune.report(metrics)

    def over_cap() -> str | None:
        return "budget" if deadline is not None and time.time() >= deadline else None

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
    if state["scheduler_stop"]:
        return  # Tune has already ended this trial; its last checkpoint is its result
    try:
        report(result.steps if result else 0, None if failure else result.objective, final=True, failure=failure,
               status=result.status if result else "failed",
               result_json=json.dumps(result.to_dict()) if result else None)
    except SystemExit:
        pass


def _release_memory() -> None:
    """Between trials on a reused worker: nothing of the last trial may keep GPU memory."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# ------------------------------------------------------------------------------------------ Tune parts
class _Unpicklable:
    """Tune pickles its searcher, stopper and callbacks for its own experiment restore, which allocsearch
    never uses (the study directory is the record). These hold the live controller: pickle them empty."""

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.controller = None


class StudySearcher(_Unpicklable, OptunaSearch):
    """``OptunaSearch`` on the study's storage; the controller admits trials and tells Optuna outcomes."""

    def __init__(self, controller: "Controller"):
        self.controller = controller
        metrics, modes = controller.tune_metrics()
        super().__init__(space=controller.define_by_run, metric=metrics if len(metrics) > 1 else metrics[0],
                         mode=modes if len(modes) > 1 else modes[0], sampler=controller.sampler,
                         study_name=controller.study.name, storage=controller.ostudy._storage)
        self._ot_study = controller.ostudy  # the very study object the controller holds
        self._numbers: dict[str, int] = {}

    def suggest(self, trial_id: str):
        proposal = self.controller.propose()
        if proposal is None or proposal is Searcher.FINISHED:
            return proposal
        if proposal == "finished":
            return Searcher.FINISHED
        self._numbers[trial_id] = proposal["number"]
        return proposal

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._numbers:
            self.controller.on_result(self._numbers[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self._numbers.pop(trial_id, None)
        if number is not None:
            self.controller.on_complete(number, result, error)

    def save(self, checkpoint_path: str) -> None:  # the Optuna storage is the searcher's state
        return None

    def restore(self, checkpoint_path: str) -> None:
        return None


class StopOnRequest(_Unpicklable, Stopper):
    """``allocsearch stop``: every running trial stops after its next checkpoint, which is recorded."""

    def __init__(self, controller: "Controller"):
        self.controller = controller

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.controller.stopping()

    def stop_all(self) -> bool:
        return False


class ControllerCallback(_Unpicklable, tune.Callback):
    def __init__(self, controller: "Controller"):
        self.controller = controller

    def on_trial_start(self, iteration, trials, trial, **info):
        self.controller.on_start(trial.config["number"])

    def on_step_end(self, iteration, trials, **info):
        self.controller.tick()

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = _error_text(trial)
        self.controller.note_error(trial.config["number"], reason)


def _error_text(trial) -> str:
    """The last line of a crashed worker's error (e.g. the process was killed), for the trial's record."""
    path = getattr(trial, "error_file", None) or ""
    try:
        lines = [ln for ln in open(path, encoding="utf-8").read().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "the trial's worker failed"
    except (OSError, TypeError):
        return "the trial's worker failed"


def make_scheduler(name: str, max_t: int, grace_period: int, seed: int | None = None):
    """ASHA (default) or Hyperband on the trials' validation checkpoints; ``none``: run every trial out."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    if name == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=max_t,
                             grace_period=grace_period, reduction_factor=2)
    if name == "hyperband":
        return HyperBandScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=max_t,
                                  reduction_factor=2)
    return FIFOScheduler()


# ------------------------------------------------------------------------------------------ running
def run(controller: "Controller", *, address: str | None, cpus_per_trial: float, gpus_per_trial: float,
        max_concurrent: int | None, scheduler: str, reuse_actors: bool = False) -> None:
    """Start or join Ray, run the search to its end, shut Ray down (a cluster we joined keeps running)."""
    import ray

    os.environ.update(RAY_ENV)
    tmp = None
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": RAY_ENV}, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, logging_level="error")
        else:
            _clean_dead_session(controller.study.root / "ray_local.json")
            tmp = tempfile.mkdtemp(prefix="as-ray-")  # short: Ray's socket paths have a length limit
            (controller.study.root / "ray_local.json").write_text(json.dumps({"tmp": tmp, "pid": os.getpid()}))
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
                     configure_logging=False, logging_level="error", runtime_env={"env_vars": RAY_ENV})
        resources = ray.cluster_resources()
        controller.cluster_ready(cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0))
        slots = _slots(resources, cpus_per_trial, gpus_per_trial)
        concurrency = min(slots, max_concurrent) if max_concurrent else slots
        plan = controller.schedule()
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
            tune_config=tune.TuneConfig(search_alg=StudySearcher(controller),
                                        scheduler=make_scheduler(scheduler, plan["max_t"], plan["grace_period"]),
                                        num_samples=-1, max_concurrent_trials=concurrency,
                                        reuse_actors=reuse_actors, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=f"session-{controller.session}",
                                      storage_path=str((controller.study.root / "ray").resolve()),
                                      stop=StopOnRequest(controller), callbacks=[ControllerCallback(controller)],
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
        )
        tuner.fit()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            (controller.study.root / "ray_local.json").unlink(missing_ok=True)


def _clean_dead_session(record) -> None:
    """After a kill -9 of a controller, Ray's raylet and GCS die with it but some agents
    (DashboardAgent, RuntimeEnvAgent) can outlive it: end what is left of that local Ray session."""
    import shutil

    import psutil

    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return
    if psutil.pid_exists(int(info.get("pid", -1))) or not info.get("tmp"):
        return  # still running (the study lock keeps a second controller out anyway)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if info["tmp"] in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.Error, TypeError):
            continue
    shutil.rmtree(info["tmp"], ignore_errors=True)
    record.unlink(missing_ok=True)


def _trial_name(trial) -> str:
    return f"trial-{int(trial.config['number']):04d}"


def _slots(resources: dict, cpus: float, gpus: float) -> int:
    """How many trials the cluster runs at once with these per-trial resources."""
    n = int(resources.get("CPU", 0.0) // cpus) if cpus else 1 << 30
    if gpus:
        n = min(n, int(round(resources.get("GPU", 0.0) / gpus, 6)))
    return max(n, 0)
