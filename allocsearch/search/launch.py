"""What passes between the controller and an executor (Ray Tune live, the replay on a simulated clock):
:class:`Launch`, a trial the budget admitted, and :class:`RunningTrial`, what the controller keeps of it
while it runs. Plain records: the executors turn a ``Launch`` into whatever they run (Ray's trial config
is ``Launch.to_config()``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from allocsearch.search.report import TrialReport

FINISHED = "finished"  # ``Controller.propose``: nothing more will be proposed


@dataclass(frozen=True)
class Launch:
    """One admitted trial, as an executor starts it."""

    number: int  # the Optuna trial number
    spec: dict  # the trial config (``allocsearch.training.trial.TrialSpec``) the worker runs
    trial_dir: str  # absolute: where the worker writes results.json and the adapter
    data_dir: str | None
    devices: float  # what the budget counts per wall second of it (GPUs, CPU cores, 1 for a wall budget)
    threads: int
    gpus: float  # its share of a GPU (< 1: packed with others)
    cap_wall_seconds: float  # its budget cap, in wall seconds on the controller's clock
    budget_seconds: float  # the same on the worker's own clock, less the worker's start-up
    confirm: bool  # a confirmation run: never stopped early (a cut one counts for nothing)

    def to_config(self) -> dict:
        """The trial config Ray Tune hands the worker (``allocsearch.search.ray.worker.trainable``)."""
        return asdict(self)


@dataclass
class RunningTrial:
    """An admitted trial while it runs."""

    trial: Any  # its live optuna.Trial
    params: dict
    key: str  # its configuration (``confidence.config_key``)
    seed: int
    train: dict  # its training settings
    features: dict  # what the cost model predicted it from
    predicted: float  # budget units
    cap: float  # budget units
    start: float | None = None  # the controller's clock when its worker started
    last: TrialReport | None = None  # its latest checkpoint
    reported: set = field(default_factory=set)  # checkpoint steps already told to Optuna
    times: dict = field(default_factory=dict)  # {step: device-seconds to that checkpoint}
    wall: float = 0.0  # wall seconds it ran, set when it ends


__all__ = ["FINISHED", "Launch", "RunningTrial"]
