"""The one record a trial's worker sends the controller, at each validation checkpoint and once at its end
(through ``tune.report``, which carries plain dicts: :meth:`TrialReport.metrics` / :meth:`TrialReport.parse`).

A checkpoint report is what the scheduler (ASHA) acts on; the final report carries the whole result
(results.json) or the failure. The controller, Optuna's bookkeeping, the cost model and the live view all
read this record, so one fact has one name from the worker to the study's files.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import cached_property

METRIC, TIME_ATTR = "objective", "step"  # what Tune's scheduler reads: the objective over training steps


@dataclass
class TrialReport:
    number: int | None = None  # the Optuna trial number
    step: int = 0  # training steps done
    objective: float | None = None  # validation macro balanced accuracy (at this checkpoint, or final)
    wall_seconds: float = 0.0  # on the worker's clock since the trial function started
    device_seconds: float = 0.0  # devices x wall_seconds, as the worker sees it (the ledger charges more)
    trainable_params: int | None = None
    train_seconds: float | None = None  # training steps' time so far, evaluations left out
    checkpoint: dict | None = None  # this checkpoint's validation metrics
    final: bool = False  # the trial's last report
    status: str | None = None  # final: completed | stopped | failed
    failure: str | None = None  # final: why it failed
    result_json: str | None = None  # final: the whole TrialResult (results.json)

    def metrics(self) -> dict:
        """For ``tune.report``: the set fields (``objective`` only when measured, as Tune's scheduler needs)."""
        return {k: v for k, v in asdict(self).items() if v is not None and (v is not False or k != "final")}

    @classmethod
    def parse(cls, result: dict | None) -> "TrialReport | None":
        """From a result dict as Tune hands it back (its own keys ignored); None for no result."""
        if not result:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in result.items() if k in known})

    @cached_property
    def payload(self) -> dict:
        """The final report's whole result (results.json), {} when it has none."""
        return json.loads(self.result_json) if self.final and self.result_json else {}

    @classmethod
    def from_result(cls, result: dict) -> "TrialReport":
        """The final report a worker sends for ``result`` (a ``TrialResult.to_dict`` / results.json)."""
        from allocsearch.training.scoring import result_objective

        return cls(step=int(result.get("steps") or 0), final=True, status=result.get("status"),
                   failure=result.get("failure"), trainable_params=result.get("trainable_params"),
                   objective=None if result.get("failure") else result_objective(result),
                   result_json=json.dumps(result))
