"""How a study runs: its execution settings, typed, each default written once. They live in study.json beside
what the trials measure (model, data, space, objectives, budget: ``folder.FIXED_ON_RESUME``); unlike those, a
resume may change them, and keeps the stored value of each one its start does not give."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Execution:
    scheduler: str = "asha"  # asha | none
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 5  # trials failing in a row before the search gives up
    mlflow: bool = True
    ray_address: str | None = None
    max_concurrent: int | None = None  # trials at once (None: as many as the cluster fits)
    tracking_uri: str | None = None  # None: sqlite inside the study folder
    confirm: float = 0.2  # the confirmation phase's share of the budget (0: off)
    noise: float | None = None  # the task's seed noise (std) as declared, until the study measures its own
    max_seeds: int = 5  # seeds a configuration runs on at most (the confirmation race's limit)
    noise_aware_stopping: bool = True  # ASHA's rungs judge against seed noise and their own evidence
    prefer: str = "best"  # what the study exports: the best, or the cheapest of those tied with it (study.choice)

    @classmethod
    def of(cls, settings: dict) -> Execution:
        """The execution settings of a study's ``settings`` (study.json), defaults where it has none."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if settings.get(f.name) is not None})

    def to_dict(self) -> dict:
        return asdict(self)


EXECUTION_DEFAULTS = Execution().to_dict()

__all__ = ["EXECUTION_DEFAULTS", "Execution"]
