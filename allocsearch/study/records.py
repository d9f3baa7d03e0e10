"""A trial's state: one set of names and one mapping from its Optuna record, for everything that shows or
logs trials (``status``, the dashboard, MLflow, ``export``). Torch-, Optuna- and Ray-free.

    completed   ran to its end and its final evaluation          Optuna COMPLETE (its value)
    pruned      stopped early: ASHA, its budget cap, the user    Optuna PRUNED (value = last checkpoint)
    oom         ran out of device memory: the configuration does Optuna PRUNED, infeasible (no crash:
                not fit; samplers learn to avoid it              not counted toward --max-failures)
    failed      it failed (NaN, an exception, its worker died)   Optuna FAIL
    crashed     the controller died while it ran                 Optuna FAIL (retried once on resume)
    not_run     sampled, never started                           Optuna FAIL
    running / queued                                             Optuna RUNNING / WAITING
"""
from __future__ import annotations

STATES = ("completed", "pruned", "oom", "failed", "crashed", "not_run", "running", "queued")
ENDED_BADLY = ("oom", "failed", "crashed")
_OPTUNA = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
           "WAITING": "queued"}
# what the controller records in user_attrs["state"] that refines Optuna's state
_REFINES = {"PRUNED": ("oom",), "FAIL": ("crashed", "not_run", "failed")}


def state_of(trial) -> tuple[str, str | None]:
    """(state, reason) of an Optuna ``FrozenTrial``: Optuna's state, refined by the recorded one."""
    attrs, name = trial.user_attrs, trial.state.name
    state = _OPTUNA.get(name, name.lower())
    if attrs.get("state") in _REFINES.get(name, ()):
        state = attrs["state"]
    if state == "pruned":
        return state, attrs.get("stop_reason") or "scheduler"
    return state, attrs.get("failure") or attrs.get("stop_reason")


def best_of(rows, noise: float | None = None):
    """THE best trial of a study (``status``, the dashboard, MLflow, ``export --best``): of rows with
    ``number``, ``state``, ``objective``, the completed one with the highest objective, the earlier on a tie;
    None before any completed. Where rows carry ``params`` (``seed``, ``confirm``) and the winning
    configuration ran on several seeds: its first trial (``allocsearch.study.confidence.winner_of``: the best
    mean among those the confirmation race re-ran, not a lucky single seed; ``noise``: the study's declared
    seed noise, as every reader passes it)."""
    done = [r for r in rows if r["state"] == "completed" and r["objective"] is not None]
    if any(r.get("params") for r in done):  # configurations re-run on several seeds: the best mean wins
        from allocsearch.study.confidence import winner_of

        best = winner_of(done, noise)
        if best is not None and best.n > 1:
            return next(r for r in done if r["number"] == best.first_trial())
    return max(done, key=lambda r: (r["objective"], -r["number"]), default=None)
