"""Ray Tune runs the trials; this module is everything that knows Ray on the controller's side.

- :func:`allocsearch.search.ray.worker.trainable` runs one trial in a Ray worker with the resources the trial
  asked for (see that module: checkpoints, scheduler stops, the budget cap on the worker's clock).
- :class:`StudySearcher` is Tune's ``OptunaSearch`` bound to the study's Optuna storage, with the
  controller deciding what runs (budget admission, stop requests) and what Optuna is told.
- :class:`ControllerCallback` gives the controller Tune's loop ticks (the ledger heartbeat), trial starts
  and why a worker died (Tune's error and the worker's last stderr lines).
- :func:`run` starts (or joins, with an address) a Ray cluster, checks every node can run a trial
  (``allocsearch.search.ray.nodes``), runs the Tuner, and shuts Ray down. Ray's temp folder (worker logs) is
  kept when a trial failed, and its path given to the controller.

Where results live on a cluster (``--ray-address``): everything the study records (trial configs, metrics,
checkpoints, costs, results.json) comes back through Ray and is written by the controller, so the study
directory is complete whether or not the workers can see it. Adapter weights are written by the worker at
the trial folder's path: on the controller's machine or a shared filesystem that is the study directory.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING

from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from allocsearch.search.launch import FINISHED
from allocsearch.search.ray.interrupts import Interrupts
from allocsearch.search.report import TrialReport
from allocsearch.search.rungs import EVIDENCE_RHO, Rungs
from allocsearch.search.ray.worker import trainable, worker_log_tail
from allocsearch.study.folder import trial_name

if TYPE_CHECKING:  # pragma: no cover
    from allocsearch.search.controller import Controller

# the env Ray's processes need: no auth prompt, no telemetry, the trial thread given time to wrap up
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60",
           "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
           "TUNE_DISABLE_SIGINT_HANDLER": "1",  # allocsearch handles SIGINT / SIGTERM (session._Interrupts)
           "TUNE_MAX_PENDING_TRIALS_PG": "1", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1e9",
           "RAY_AIR_NEW_OUTPUT": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}


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
                         study_name=controller.study.name, storage=controller.store.backend)
        self._ot_study = controller.store.ostudy  # the very study object the controller holds (it asks, not Tune)
        self._numbers: dict[str, int] = {}

    def suggest(self, trial_id: str):
        launch = self.controller.propose()
        if launch is None:
            return None
        if launch == FINISHED:
            return Searcher.FINISHED
        self._numbers[trial_id] = launch.number
        return launch.to_config()  # the worker's config (``worker.trainable``)

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

    def stop_all(self) -> bool:  # SIGINT / SIGTERM: end the experiment now
        return self.controller is not None and self.controller.interrupted is not None


class ControllerCallback(_Unpicklable, tune.Callback):
    def __init__(self, controller: "Controller"):
        self.controller = controller

    def on_trial_start(self, iteration, trials, trial, **info):
        self.controller.on_start(trial.config["number"])

    def on_step_end(self, iteration, trials, **info):
        self.controller.tick()

    def on_trial_error(self, iteration, trials, trial, **info):
        number = trial.config["number"]
        reason = _error_text(trial)
        tail = worker_log_tail(trial.config.get("trial_dir") or "")
        self.controller.note_error(number, f"{reason} | worker stderr: {tail}" if tail else reason)


def _error_text(trial, lines: int = 3) -> str:
    """The last lines of a crashed worker's error (e.g. the process was killed), for the trial's record."""
    path = getattr(trial, "error_file", None) or ""
    try:
        kept = [ln.strip() for ln in open(path, encoding="utf-8").read().splitlines() if ln.strip()]
        return " | ".join(kept[-lines:])[-600:] if kept else "the trial's worker failed"
    except (OSError, TypeError):
        return "the trial's worker failed"


def make_scheduler(plan: dict):
    """The scheduler ``Controller.schedule`` planned: ASHA (default) on the trials' validation checkpoints,
    not stopping a trial within ``margin`` (the measured seed noise) of a rung's cutoff, nor at a rung that
    has not yet shown on ``min_pairs`` completed trials that it ranks them as their ends do
    (``allocsearch.search.rungs``), resumed from ``history`` (``Rungs.restore``); ``none``: run every trial
    out. (Hyperband's pause-and-resume would restart paused trials from scratch with their time billed
    twice: not offered.)"""
    name = plan["scheduler"]
    if name == "asha":
        rungs = Rungs(plan["max_t"], plan["grace_period"], 2, plan["margin"], plan["min_pairs"], EVIDENCE_RHO)
        return RungScheduler(rungs.restore(plan["history"]))
    if name == "none":
        return FIFOScheduler()
    from allocsearch.study.folder import StudyError

    raise StudyError(f"scheduler {name!r} is not supported; fix: start with --scheduler asha or none")


class RungScheduler(FIFOScheduler):
    """Tune's face of :class:`~allocsearch.search.rungs.Rungs`: the very rule the replay runs."""

    def __init__(self, rungs):
        super().__init__()
        self.rungs = rungs

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        report = TrialReport.parse(result)
        if report is None or trial.config.get("confirm"):
            return TrialScheduler.CONTINUE  # a confirmation run measures the whole trial: never judged at a rung
        if report.final and report.status == "completed":
            self.rungs.final(trial.trial_id, report.objective)  # evidence of how well the rungs predict the end
        if report.final or report.objective is None:
            return TrialScheduler.CONTINUE
        stop = self.rungs.stop(trial.trial_id, report.step, report.objective)
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE


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
        from allocsearch.search.ray import nodes
        resources = ray.cluster_resources()
        alive = nodes.alive_nodes()
        # on a cluster we joined, every node must see the trials' files; a local Ray is this machine
        settings = controller.study.settings
        lacking = nodes.missing_paths(alive, nodes.required_paths(settings)) if address else {}
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        nodes.check_cluster(settings, controller.budget, cpus, gpus, lacking=lacking,
                            too_big=nodes.largest_fit(alive, cpus_per_trial, gpus_per_trial))  # one line if not
        controller.emit("cluster", cpus=cpus, gpus=gpus)
        slots = _slots(resources, cpus_per_trial, gpus_per_trial)
        concurrency = min(slots, max_concurrent) if max_concurrent else slots
        plan = controller.schedule(scheduler)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
            tune_config=tune.TuneConfig(search_alg=StudySearcher(controller),
                                        scheduler=make_scheduler(plan),
                                        num_samples=-1, max_concurrent_trials=concurrency,
                                        reuse_actors=reuse_actors, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=f"session-{controller.session}",
                                      storage_path=str((controller.study.root / "ray").resolve()),
                                      stop=StopOnRequest(controller), callbacks=[ControllerCallback(controller)],
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
        )
        with Interrupts(controller):
            tuner.fit()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp:
            import shutil

            if controller.failed_this_session:  # the workers' logs say why: keep them, say where
                controller.emit("ray_logs_kept", path=tmp)
            else:
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
    return trial_name(trial.config["number"])


def _slots(resources: dict, cpus: float, gpus: float) -> int:
    """How many trials the cluster runs at once with these per-trial resources."""
    n = int(resources.get("CPU", 0.0) // cpus) if cpus else 1 << 30
    if gpus:
        n = min(n, int(round(resources.get("GPU", 0.0) / gpus, 6)))
    return max(n, 0)
