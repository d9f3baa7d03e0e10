"""A trial of a study -> one versioned file that ``allocsearch train --config`` reads and reproduces.

The file is a trial config (model, the COMPLETE per-layer allocation, data spec, training settings) plus
``allocsearch_export`` (the format version) and ``provenance`` (study, trial number, its metrics, the
MLflow run id when the study was tracked, the package version). For LoRA / DoRA winners it also carries
the equivalent ``peft_config``, so the adapter can be rebuilt with peft alone. Torch-free.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from allocsearch.errors import AllocsearchError
from allocsearch.fileio import read_json_object
from allocsearch.study.folder import Files, trial_dir, trial_name
from allocsearch.study.records import State
from allocsearch.training.trial import EXPORT_KEY, EXPORT_VERSION



class ExportError(AllocsearchError):
    pass


def pick_trials(summary: dict, trial: int | None = None, best: bool = False, pareto: int | None = None) -> list[int]:
    """Trial numbers to export from a study summary (``analysis.summarize``): one trial, the best, or the
    first K of the Pareto front (multi-objective studies)."""
    by_number = {t["number"]: t for t in summary["trials"]}
    if trial is not None:
        row = by_number.get(trial)
        if row is None:
            raise ExportError(f"study {summary['study']!r} has no trial {trial}; fix: pick one of "
                              f"{_some(sorted(by_number))} (allocsearch status lists them)")
        if row["state"] not in State.WITH_RESULT:
            raise ExportError(f"trial {trial} is {row['state']} and has no result to export; fix: pick a "
                              f"completed trial (allocsearch status lists them)")
        return [trial]
    if pareto is not None:
        front = summary.get("pareto")
        if front is None:
            raise ExportError(f"study {summary['study']!r} has one objective: --pareto needs a multi-objective "
                              f"study (start --objectives accuracy,params); use --best")
        if pareto < 1 or not front:
            raise ExportError("--pareto K needs K >= 1 and a completed trial on the front")
        return [t["number"] for t in front[:pareto]]
    if summary.get("best") is None:
        raise ExportError(f"study {summary['study']!r} has no completed trial yet; fix: let the search run "
                          f"longer, or export a stopped trial with --trial N")
    return [summary["best"]["trial"]]


def export_trial(study_root: str | Path, number: int, prefer: str | None = None) -> str:
    """The export file of one trial, as YAML text; its provenance names the study's best by ``prefer``
    (default: the study's own preference)."""
    import yaml

    from allocsearch.fileio import read_yaml
    from allocsearch.reports.status import summarize

    root = Path(study_root)
    summary = summarize(root, prefer=prefer)
    row = next((t for t in summary["trials"] if t["number"] == number), None)
    if row is None:
        raise ExportError(f"study {summary['study']!r} has no trial {number}")
    folder = trial_dir(root, number)
    spec = read_yaml(folder / Files.TRIAL_CONFIG, "trial config", ExportError)
    result = read_json_object(folder / Files.RESULTS) or {}
    allocation = result.get("allocation") or spec["allocation"]
    settings = json.loads((root / Files.SETTINGS).read_text(encoding="utf-8"))
    data = dict(spec["data"])
    if settings.get("data_dir") and not data.get("data_dir"):
        data["data_dir"] = settings["data_dir"]
    doc: dict[str, Any] = {
        EXPORT_KEY: EXPORT_VERSION,
        "name": f"{summary['study']}-{trial_name(number)}",
        "model": spec["model"],
        "allocation": allocation,
        "data": data,
        "train": spec["train"],
        "provenance": {
            "study": summary["study"], "trial": number, "state": row["state"], "objective": row["objective"],
            "seed": row["seed"], "best": summary.get("best"),
            "objectives": summary["objectives"], "values": row["values"], "params": row["params"],
            "summary": row["summary"], "validation": _macro(result.get("validation")),
            "test": _macro(result.get("test")), "trainable_params": result.get("trainable_params"),
            "threads": result.get("threads"), "device": result.get("device"), "dtype": result.get("dtype"),
            "device_seconds": row["spend"], "mlflow_run_id": _mlflow_run(root, number),
            "package_version": _version(), "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "evidence": _evidence_of(summary.get("evidence"), row["params"])},
    }
    if isinstance(allocation, dict) and allocation.get("method") in ("lora", "dora"):
        doc["peft_config"] = _peft_config(allocation)
    header = (f"# allocsearch export (format {EXPORT_VERSION}): trial {number} of study {summary['study']}\n"
              f"# train it: allocsearch train --config THIS_FILE [--steps N | --epochs E] [--data-dir D]\n")
    doc = json.loads(json.dumps(doc))  # plain values only: no YAML anchors for shared lists
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110)


def _evidence_of(ev: dict | None, params: dict) -> dict | None:
    """How sure the study is of this configuration: its mean +- 95% CI over seeds (n), whether it is the
    winner, and the configurations statistically tied with the winner (each with its mean, CI and n)."""
    if not ev:
        return None
    from allocsearch.study.confidence import config_key

    key = config_key(params)
    mine = next((f for f in [ev["winner"], *ev["finalists"], *ev["tied"]] if config_key(f["params"]) == key), None)
    short = lambda f: {k: f.get(k) for k in ("params", "summary", "n", "mean", "ci95", "seeds", "trials")}  # noqa: E731
    return {"this": short(mine) if mine else None, "is_winner": config_key(ev["winner"]["params"]) == key,
            "winner": short(ev["winner"]), "seed_noise": ev["noise"], "configurations": ev["configurations"],
            "tied_with_winner": [short(f) for f in ev["tied"]][:20], "tied_count": len(ev["tied"])}


def _peft_config(allocation: dict) -> dict:
    """The equivalent peft LoraConfig fields (uniform rank; targets as the layer library names them)."""
    ranks = set(allocation["rank"]) if isinstance(allocation.get("rank"), list) else {allocation.get("rank")}
    return {"peft_type": "LORA", "r": max(ranks), "lora_alpha": allocation.get("alpha", 16.0),
            "lora_dropout": allocation.get("dropout", 0.05), "use_dora": allocation["method"] == "dora",
            "target_modules": allocation.get("targets"), "rank_pattern_by_layer": allocation.get("rank")}


def _macro(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    return {"macro_accuracy": metrics.get("macro_accuracy"), "macro_balanced_accuracy": metrics.get("macro_balanced_accuracy"),
            "tasks": {k: v.get("balanced_accuracy") for k, v in (metrics.get("tasks") or {}).items()}}


def _mlflow_run(root: Path, number: int) -> str | None:
    """The trial's MLflow run id, when the study was tracked (looked up by the tags the tracker sets)."""
    info = read_json_object(root / Files.MLFLOW) or {}
    if not info.get("parent_run_id") or not info.get("tracking_uri"):
        return None
    try:
        from mlflow.tracking import MlflowClient

        runs = MlflowClient(info["tracking_uri"]).search_runs(
            [info["experiment_id"]], max_results=1,
            filter_string=f"tags.mlflow.parentRunId = '{info['parent_run_id']}' and tags.trial_number = '{number}'")
        return runs[0].info.run_id if runs else None
    except Exception:  # noqa: BLE001 - provenance only: an unreachable tracking server leaves it empty
        return None


def _version() -> str:
    from allocsearch import __version__

    return __version__


def _some(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:8])) + (" ..." if len(numbers) > 8 else "") if numbers else "none yet"
