"""A recorded benchmark table: every configuration of a finite space trained on several seeds, every
validation checkpoint with the device-seconds spent to reach it, so that searches can be replayed on a
simulated clock without training (``allocsearch.bench.replay``), as tabular HPO benchmarks do (LCBench,
YAHPO Gym, JAHS-Bench-201).

    benchmarks/<name>/
      table.csv     one row per (configuration, seed, checkpoint); the last row of a run has final = 1
      space.yaml    the finite space the table covers (what a replayed search samples)
      card.json     task, model, settings, commit, machine, seeds, how it was recorded

Columns: config (the canonical JSON of the parameters), seed, step, final, validation (the objective:
macro balanced accuracy), test (final rows; checkpoints where recorded), device_seconds (charged from the
trial's start, as the ledger charges), train_seconds, trainable_params, peak_memory_mb, expert_load (JSON,
final rows). Torch-free.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from allocsearch.study.confidence import Estimate, config_key, pooled_noise
from allocsearch.errors import AllocsearchError

COLUMNS = ("config", "seed", "step", "final", "validation", "test", "device_seconds", "train_seconds",
           "trainable_params", "peak_memory_mb", "expert_load")


class TableError(AllocsearchError):
    """A benchmark table that cannot be read or used."""


@dataclass
class Run:
    """One configuration on one seed: its checkpoints (step, validation, device_seconds) and its end."""
    params: dict
    seed: int
    checkpoints: list = field(default_factory=list)  # [(step, validation, device_seconds)], steps ascending
    final: float | None = None  # validation at the end
    test: float | None = None
    device_seconds: float = 0.0  # the whole trial, as charged
    train_seconds: float | None = None
    trainable_params: int | None = None
    steps: int = 0


class Table:
    def __init__(self, runs: list[Run], card: dict | None = None, space: dict | None = None):
        self.card, self.space = card or {}, space
        self.runs: dict[str, dict[int, Run]] = {}
        for r in runs:
            self.runs.setdefault(config_key(r.params), {})[r.seed] = r
        self.seeds = sorted({r.seed for r in runs})
        incomplete = [k for k, by in self.runs.items() if sorted(by) != self.seeds]
        if incomplete:
            raise TableError(f"{len(incomplete)} configurations lack some of the seeds {self.seeds}; fix: finish "
                             f"the recording (allocsearch bench record resumes it)")

    # ---------------------------------------------------------------------------- reading
    @classmethod
    def load(cls, folder: str | Path) -> "Table":
        folder = Path(folder)
        path = folder / "table.csv"
        if not path.is_file():
            raise TableError(f"no benchmark table at {path}; fix: give --table a folder written by "
                             f"'allocsearch bench record' (e.g. benchmarks/sst2-minilm)")
        import yaml

        card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
        space = yaml.safe_load((folder / "space.yaml").read_text()) if (folder / "space.yaml").is_file() else None
        if space and isinstance(space.get("model"), str) and (folder / space["model"]).is_dir() \
                and not Path(space["model"]).is_absolute():
            # a model folder shipped with the table (a known-answer model's config.json: the cost model and the
            # depth read it) resolves against the table's folder
            space["model"] = str((folder / space["model"]).resolve())
        runs: dict[tuple[str, int], Run] = {}
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    key, seed = row["config"], int(row["seed"])
                    run = runs.setdefault((key, seed), Run(json.loads(key), seed))
                    step, value = int(row["step"]), _num(row["validation"])
                    if row["final"] == "1":
                        run.final, run.test, run.steps = value, _num(row["test"]), step
                        run.device_seconds = float(row["device_seconds"])
                        run.train_seconds, run.trainable_params = _num(row["train_seconds"]), _int(row["trainable_params"])
                    else:
                        run.checkpoints.append((step, value, float(row["device_seconds"])))
        except (KeyError, ValueError) as exc:
            raise TableError(f"{path} is not a benchmark table ({type(exc).__name__}: {exc}); fix: re-export it "
                             f"with 'allocsearch bench record'") from None
        for run in runs.values():
            run.checkpoints.sort()
        return cls([r for r in runs.values() if r.final is not None], card, space)

    @property
    def num_layers(self) -> int:
        """The model's depth the space is resolved at: the card's (a table replays without its model, e.g. a
        known-answer model folder on the machine that recorded it), else the model's config."""
        if self.card.get("num_layers"):
            return int(self.card["num_layers"])
        from allocsearch.search.space.space import model_depth

        return model_depth((self.space or {}).get("model", ""))

    def fidelity(self) -> tuple[int, int]:
        """(the first checkpoint's step, the trials' steps): a multi-fidelity optimizer's smallest and largest
        resource (the first is the steps where no run has a checkpoint)."""
        runs = [r for by in self.runs.values() for r in by.values()]
        steps = max(r.steps for r in runs)
        return min((c[0] for r in runs for c in r.checkpoints), default=steps), steps

    def run(self, params: dict, seed_index: int) -> Run:
        """The recorded run of ``params`` on the table's ``seed_index``-th seed."""
        by = self.runs.get(config_key(params))
        if by is None:
            raise TableError(f"configuration {config_key(params)} is not in the table; fix: replay with the "
                             f"table's own space (its space.yaml)")
        return by[self.seeds[seed_index % len(self.seeds)]]

    # ---------------------------------------------------------------------------- the truth
    def estimates(self, truth: str = "validation") -> list[Estimate]:
        """Every configuration's mean over the table's seeds (its true quality), best first."""
        out = []
        for key, by in self.runs.items():
            e = Estimate(key, next(iter(by.values())).params)
            for seed, r in by.items():
                e.values[seed] = r.final if truth == "validation" else r.test
                e.trials[seed] = 0
            out.append(e)
        return sorted(out, key=lambda e: -e.mean)

    def truth(self, truth: str = "validation") -> dict[str, float]:
        return {e.key: e.mean for e in self.estimates(truth)}

    def noise(self) -> float:
        """The seed noise of the final validation score (std; ``confidence.pooled_noise``'s median rule)."""
        return pooled_noise(self.estimates()) or 0.0

    def grid_seconds(self) -> float:
        """Device-seconds of running the whole grid once (every configuration on one seed, in full)."""
        return sum(statistics.fmean(r.device_seconds for r in by.values()) for by in self.runs.values())

    def summary(self) -> dict:
        ests = self.estimates()
        means = [e.mean for e in ests]
        return {"configurations": len(ests), "seeds": self.seeds, "noise": self.noise(),
                "best": {"params": ests[0].params, "mean": ests[0].mean},
                "median": statistics.median(means), "spread_std": statistics.pstdev(means),
                "grid_device_seconds": self.grid_seconds()}


# -------------------------------------------------------------------------------- writing (bench record)
def write(folder: str | Path, rows: list[dict], card: dict, space_yaml: str) -> Path:
    """Write table.csv (rows with the COLUMNS), card.json and space.yaml atomically into ``folder``."""
    import io

    from allocsearch.fileio import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r["config"], r["seed"], r["final"], r["step"])):
        writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})
    write_text_atomic(folder / "space.yaml", space_yaml)
    write_text_atomic(folder / "card.json", json.dumps(card, indent=2, default=str))
    return write_text_atomic(folder / "table.csv", buf.getvalue())


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return v


def _num(text: str) -> float | None:
    return float(text) if text not in ("", None) and not math.isnan(float(text)) else None


def _int(text: str) -> int | None:
    return int(float(text)) if text not in ("", None) else None


__all__ = ["COLUMNS", "Run", "Table", "TableError", "write"]
