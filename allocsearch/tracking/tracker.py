"""MLflow tracking of a study: one parent run per study, one nested run per trial.

The controller's events (``on_event(kind, **data)``) become MLflow calls in the controller process; the
trial workers never talk to MLflow. Every call is an operation in an in-memory queue
(:mod:`allocsearch.tracking.queue`), run in order: a
tracking server that goes away costs one warning line per outage and a retry on later events (backing off
up to a minute), never a trial or the search. What the study directory holds (trial.yaml, results.json,
the Optuna storage, the ledger) is read when an operation runs, so on the next start after a controller
crash the runs it left RUNNING are completed from disk and ended with the trial's real outcome. The parent
run's id lives in ``<study>/mlflow.json``: a resumed study logs into the same parent run.

    tracker = Tracker(study.root)            # default: sqlite:///<study>/mlflow.db, artifacts <study>/mlartifacts
    on_event = tracker.event                 # "study", "admitted", "checkpoint", "finished", "tick", ...
    tracker.close(end_reason)                # the study's best on the parent run, end statuses
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from allocsearch.study.folder import Files, trial_dir, trial_name
from allocsearch.study.ledger import Ledger
from allocsearch.study.records import Attr, State
from allocsearch.tracking.data import (END_STATUS, OptunaReader, best_metrics, mask_uri, outcome, read_json,
                                       read_yaml, result_metrics, settings_params, summary_metrics,
                                       trial_artifacts, trial_params)
from allocsearch.tracking.queue import OpQueue
from allocsearch.training.scoring import OBJECTIVE_METRIC
from allocsearch.tracking.queue import short as _short
from allocsearch.tracking.queue import warn as _warn

EXPERIMENT = "allocsearch"
STATE_FILE = Files.MLFLOW
CHECKPOINT = f"checkpoint.val_{OBJECTIVE_METRIC}"  # at each checkpoint's step; val.* are the final ones
TICK_SECONDS = 30.0  # at most one parent "running_trials" point per this many seconds


def default_tracking_uri(study_root: str | os.PathLike) -> str:
    return f"sqlite:///{Path(study_root).resolve() / 'mlflow.db'}"


class Tracker:
    """Logs one study to MLflow. ``event`` and ``close`` never raise."""

    def __init__(self, study_root: Path, tracking_uri: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
            os.environ.setdefault(key, value)  # our queue retries; a dead server must not block the search
        self.root = Path(study_root).resolve()
        self.uri = tracking_uri or default_tracking_uri(self.root)
        self.clock = clock
        self.settings = read_json(self.root / Files.SETTINGS) or {}
        self.name = self.settings.get("name", self.root.name)
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self.runs: dict[int, str] = {}  # trial number -> nested run id
        self._client = None
        self.optuna = OptunaReader(self.root, self.settings)  # read-only
        self._queue = OpQueue(mask_uri(self.uri), clock)
        self._open: set[int] = set()  # admitted in this session, not finished yet
        self._ending: set[str] = set()  # runs whose end is already queued
        self._ledger = Ledger(self.root / Files.LEDGER)
        self._user_stop = self._closed = False
        self._last_tick = -math.inf
        self._push(self._op_open)
        self.flush()

    # ------------------------------------------------------------------------------ the queue
    def event(self, kind: str, **data) -> None:
        """One controller event: queued as MLflow operations, then the queue is flushed (unless backing off)."""
        try:
            handler = getattr(self, f"_on_{kind}", None)
            if handler is not None:
                handler(data, _now_ms())
            if self.pending():
                self.flush()
        except Exception as exc:  # noqa: BLE001 - tracking never costs the search
            _warn(f"mlflow: event {kind!r} not logged ({_short(exc)})")

    def flush(self, force: bool = False) -> bool:
        """Run the queued operations (see :class:`OpQueue`); True when none is left."""
        return self._queue.flush(force)

    def pending(self) -> int:
        return len(self._queue)

    def _push(self, fn, *args, droppable: bool = False) -> None:
        self._queue.push(fn, *args, droppable=droppable)

    # ------------------------------------------------------------------------------ events
    def _on_study(self, data, ts):
        recovered = data.get("recovered") or {}
        tags = {f"recovered.{k}": ",".join(map(str, v)) for k, v in recovered.items() if v}
        self._push(self._op_study, tags, ts)

    def _on_cluster(self, data, ts):
        self._push(self._op_parent_batch, [], {"cluster.cpus": data.get("cpus"), "cluster.gpus": data.get("gpus")})

    def _on_admitted(self, data, ts):
        number = int(data["number"])
        self._open.add(number)
        self._push(self._op_admit, number, data.get("predicted"), data.get("cap"), ts)

    def _on_started(self, data, ts):
        self._push(self._op_trial_batch, int(data["number"]), [], {"state": "running"})

    def _on_checkpoint(self, data, ts):
        number, step = int(data["number"]), int(data["step"])
        metrics = [("device_seconds", self._ledger.trial_spend().get(number, 0.0), step)]
        if data.get("objective") is not None:
            metrics.append((CHECKPOINT, data["objective"], step))
        self._push(self._op_trial_batch, number, [(k, v, ts, s) for k, v, s in metrics], {}, droppable=True)

    def _on_finished(self, data, ts):
        number, state, objective = int(data["number"]), data["state"], data.get("objective")
        self._open.discard(number)
        self._queue_end(number, state, objective, data.get("spend"), data.get("reason"), ts)
        metrics = [("spent", self._ledger.spent(self._unit()), ts, number)]
        if objective is not None:
            metrics.append(("trial_objective", objective, ts, number))
        metrics += best_metrics(data.get("best"), ts, number)  # the study's best as the controller named it
        self._push(self._op_parent_batch, metrics, {})

    def _on_tick(self, data, ts):
        if self.clock() - self._last_tick >= TICK_SECONDS:
            self._last_tick = self.clock()
            self._push(self._op_parent_batch, [("running_trials", data.get("running", 0), ts,
                                                int(data.get("spent") or 0))], {}, droppable=True)

    def _on_stopping(self, data, ts):
        self._user_stop = True
        self._push(self._op_parent_batch, [], {"stop_requested": "true"})

    def close(self, end_reason: str | None = None, *, failed: bool = False) -> None:
        """The best trial on the parent run (the study's summary, as ``status`` reads it from the folder), every
        run of this session ended; the parent ends FINISHED, KILLED when the user stopped the search
        (``allocsearch stop``) or FAILED with ``failed=True``. Never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            user = self._user_stop or "stopped by" in (end_reason or "")
            status = "FAILED" if failed else "KILLED" if user else "FINISHED"
            self._push(self._op_sweep, True)
            self._push(self._op_final, end_reason, status, _now_ms())
            if not self.flush(force=True):
                _warn(f"mlflow: {self.pending()} operations could not be logged to {mask_uri(self.uri)}; "
                      f"the study directory keeps everything they would have logged")
        except Exception as exc:  # noqa: BLE001
            _warn(f"mlflow: closing the study's runs failed ({_short(exc)})")

    # ------------------------------------------------------------------------------ operations
    @property
    def client(self):
        if self._client is None:
            import logging

            for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _op_open(self):
        """The parent run: reused from mlflow.json (or found by its tag), else created; settings logged;
        runs a dead controller left RUNNING ended."""
        from mlflow.exceptions import MlflowException

        c = self.client
        self.experiment_id = self._experiment()
        state, run = read_json(self.root / STATE_FILE) or {}, None
        if state.get("tracking_uri") == mask_uri(self.uri) and state.get("parent_run_id"):
            try:
                run = c.get_run(state["parent_run_id"])
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            run = run if run is not None and run.info.lifecycle_stage == "active" else None
        if run is None:
            found = self._search(f"tags.study_root = '{_q(self.root)}'")
            run = next((r for r in found if "mlflow.parentRunId" not in r.data.tags), None)
        if run is None:
            run = c.create_run(self.experiment_id, run_name=self.name,
                               tags={"study": self.name, "study_root": str(self.root), "mlflow.source.name":
                                     "allocsearch", "mlflow.source.type": "LOCAL"})
        elif run.info.status != "RUNNING":
            c.update_run(run.info.run_id, status="RUNNING")
        self.parent_id = run.info.run_id
        from allocsearch.fileio import write_text_atomic

        write_text_atomic(self.root / STATE_FILE, json.dumps(
            {"tracking_uri": mask_uri(self.uri), "experiment_id": self.experiment_id, "parent_run_id": self.parent_id},
            indent=2))
        if (self.root / Files.SPACE).is_file() and not run.data.params:
            c.log_artifact(self.parent_id, str(self.root / Files.SPACE))
        self._log_settings({}, _now_ms())
        self._op_sweep(False)

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        c = self.client
        exp = c.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            try:
                return c.create_experiment(EXPERIMENT, artifact_location=self._artifact_location())
            except MlflowException as exc:  # created by another study meanwhile
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = c.get_experiment_by_name(EXPERIMENT)
        if exp.lifecycle_stage != "active":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _artifact_location(self) -> str | None:
        """Never the current folder's ./mlruns: beside a sqlite file, else in the study; a server decides
        for itself."""
        if re.match(r"^(https?|databricks)", self.uri):
            return None
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        return (self.root / "mlartifacts").as_uri()

    def _ensure_parent(self) -> str:
        if self.parent_id is None:
            self._op_open()
        return self.parent_id

    def _log_settings(self, tags: dict, ts: int):
        """Settings as params; one changed on resume (budget, scheduler, ...) as tag ``current.<name>``."""
        s = self.settings = self.optuna.settings = read_json(self.root / Files.SETTINGS) or self.settings
        old = self.client.get_run(self.parent_id).data.params
        params = settings_params(s)
        new = {k: v for k, v in params.items() if k not in old}
        changed = {f"current.{k}": v for k, v in params.items() if k in old and old[k] != _text(v)}
        budget = (s.get("budget") or {}).get("seconds")  # a point per session that set or grew it
        metrics = [("budget_seconds", budget, ts, max(self._ledger.next_session() - 1, 0))] \
            if budget is not None and ("budget" in new or "current.budget" in changed) else []
        self._batch(self.parent_id, metrics, {**tags, **changed}, new)

    def _op_study(self, tags, ts):
        self._ensure_parent()
        self._log_settings(tags, ts)
        self._op_sweep(False)

    def _op_admit(self, number, predicted, cap, ts):
        rid = self._trial_run(number)
        metrics = [(k, v, ts, 0) for k, v in (("predicted_cost", predicted), ("cap", cap)) if v is not None]
        self._batch(rid, metrics, {"state": "admitted"})

    def _op_trial_batch(self, number, metrics, tags):
        self._batch(self._trial_run(number), metrics, tags)

    def _op_parent_batch(self, metrics, tags):
        self._batch(self._ensure_parent(), metrics, tags)

    def _trial_run(self, number: int, create: bool = True) -> str | None:
        """The trial's nested run: known, found by its tags (a retried or resumed create), or created with
        the trial's parameters."""
        if number in self.runs:
            return self.runs[number]
        parent = self._ensure_parent()
        found = self._search(f"tags.mlflow.parentRunId = '{parent}' and tags.trial_number = '{number}'")
        if not found and not create:
            return None
        run = found[0] if found else None
        params, tags = self._trial_params(number) if create else ({}, {})
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=trial_name(number), tags={
                "mlflow.parentRunId": parent, "trial_number": str(number), "study": self.name,
                **{k: _text(v, 5000) for k, v in tags.items() if v is not None}})
        self.runs[number] = run.info.run_id
        if params and not run.data.params:  # also a create whose params were not logged before a failure
            self._batch(run.info.run_id, [], {}, params)
        return run.info.run_id

    def _trial_params(self, number: int) -> tuple[dict, dict]:
        return trial_params(read_yaml(self._trial_dir(number) / Files.TRIAL_CONFIG) or {}, self._layers(),
                            self.optuna.trial(number))

    def _queue_end(self, number, state, objective, spend, reason, ts):
        self._push(self._op_end_metrics, number, state, objective, spend, reason, ts)
        self._push(self._op_artifacts, number)
        self._push(self._op_terminate, number, state)

    def _op_end_metrics(self, number, state, objective, spend, reason, ts):
        rid = self._trial_run(number)
        result, t = read_json(self._trial_dir(number) / Files.RESULTS) or {}, self.optuna.trial(number)
        metrics = result_metrics(result, ts)
        step = int(result.get("steps") or (t.user_attrs.get(Attr.STEPS) if t is not None else 0) or 0)
        if objective is not None:
            metrics.append(("objective", objective, ts, step))
        if spend is not None:
            metrics.append(("device_seconds", spend, ts, step))
        tags = {"state": state}
        if state == State.PRUNED:
            tags.update(pruned="true", stop_reason=reason or "scheduler")
        elif reason:
            tags["failure"] = reason
        self._batch(rid, metrics, tags)

    def _op_artifacts(self, number):
        rid = self._trial_run(number)
        with tempfile.TemporaryDirectory(prefix="allocsearch-mlflow-") as tmp:
            if trial_artifacts(self._trial_dir(number), number, self._layers(), Path(tmp)):
                self.client.log_artifacts(rid, tmp)

    def _op_terminate(self, number, state):
        self.client.set_terminated(self._trial_run(number), END_STATUS.get(state, "FAILED"))

    def _op_sweep(self, closing: bool):
        """End nested runs left RUNNING whose trial is not running any more (after a crash: from the Optuna
        storage and the study folder). ``closing``: also this session's own, as the search has ended."""
        if self.parent_id is None:
            return
        for run in self._search(f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'"):
            number, rid = int(run.data.tags.get("trial_number", -1)), run.info.run_id
            if rid in self._ending or (number in self._open and not closing):
                continue
            t = self.optuna.trial(number)
            if t is not None and t.state.name == "RUNNING" and not closing:
                continue  # running, or not recovered yet (the "study" event sweeps again)
            state, reason = outcome(t)
            self.runs[number] = rid
            self._ending.add(rid)
            self._open.discard(number)
            attrs = t.user_attrs if t is not None else {}
            spend = attrs.get(Attr.DEVICE_SECONDS, self._ledger.trial_spend().get(number))
            objective = t.values[0] if t is not None and t.values else attrs.get(Attr.OBJECTIVE)
            self._queue_end(number, state, objective, spend, reason, _now_ms())

    def _op_final(self, end_reason, status, ts):
        from allocsearch.reports.status import summarize

        pid, c = self._ensure_parent(), self.client
        summary = summarize(self.root)
        metrics, tags = summary_metrics(summary, ts)
        tags["end_reason"] = end_reason
        best = summary.get("best") or {}
        old = c.get_run(pid).data.tags.get("best.run_id")
        rid = self._trial_run(int(best["trial"]), create=False) if best.get("trial") is not None else None
        if rid:
            tags["best.run_id"] = rid
            c.set_tag(rid, "best", "true")
            if old and old != rid:
                c.delete_tag(old, "best")
        self._batch(pid, metrics, tags)
        c.set_terminated(pid, status)

    # ------------------------------------------------------------------------------ helpers
    def _batch(self, run_id, metrics=(), tags=None, params=None):
        """One ``log_batch`` call (MLflow splits it past its per-call limits); None values left out."""
        from mlflow.entities import Metric, Param, RunTag

        ms = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in metrics if _number(v)]
        ps = [Param(k, _text(v, 6000)) for k, v in (params or {}).items() if v is not None]
        ts_ = [RunTag(k, _text(v, 5000)) for k, v in (tags or {}).items() if v is not None]
        if ms or ps or ts_:
            self.client.log_batch(run_id, metrics=ms, params=ps, tags=ts_)

    def _search(self, filter_string: str) -> list:
        from mlflow.entities import ViewType

        return list(self.client.search_runs([self.experiment_id or self._experiment()], filter_string,
                                            run_view_type=ViewType.ACTIVE_ONLY, max_results=5000))

    def _trial_dir(self, number: int) -> Path:
        return trial_dir(self.root, number)

    def _layers(self) -> int:
        return int(self.settings.get("num_layers") or 0)

    def _unit(self) -> str:
        return (self.settings.get("budget") or {}).get("unit", "cpu")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(v, limit: int = 6000) -> str:
    text = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _q(value) -> str:
    return str(value).replace("'", "\\'")


def _now_ms() -> int:
    return int(time.time() * 1000)
