"""What a study's MLflow runs hold, as pure functions of the study folder's files: the parent run's params
from the settings, a trial run's params (per-group summary of the per-layer allocation) and final metrics
from results.json, a trial's outcome from its Optuna record, and the two plots (matplotlib, Agg; no display).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from allocsearch.allocation.config import resolve_allocation
from allocsearch.allocation.shapes import group_sizes
from allocsearch.fileio import read_json_object as read_json
from allocsearch.study.folder import CRASHED, Files, Study
from allocsearch.study.records import Attr, State, state_of
from allocsearch.study.storage import TrialStore
from allocsearch.training.scoring import OBJECTIVE_METRIC

GROUPS = 4  # the per-layer allocation is summarised as means over this many contiguous layer groups
END_STATUS = {State.COMPLETED: "FINISHED", State.PRUNED: "FINISHED", State.OOM: "FAILED", State.FAILED: "FAILED",
              State.CRASHED: "FAILED", State.NOT_RUN: "KILLED"}  # a trial's state -> its MLflow run's end status
ENDED_BY_SEARCH = "the search ended while the trial was running"


# ---------------------------------------------------------------------------------- plots
def plot_allocation(alloc: dict, title: str, path: Path) -> Path:
    """Experts, top-k and rank per layer as bars (matplotlib, no display needed)."""
    from matplotlib.figure import Figure

    n = len(alloc["experts"])
    fig = Figure(figsize=(max(6.0, 0.22 * n + 2), 6), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, key, color in zip(axes, ("experts", "top_k", "rank"), ("tab:blue", "tab:orange", "tab:green")):
        ax.bar(range(n), alloc[key], color=color)
        ax.set_ylabel(key)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("layer")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path


def plot_expert_load(load: dict, title: str, path: Path) -> Path:
    """Heat map: the fraction of tokens each expert got, per layer (mean over the layer's wrapped modules)."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = {}
    for layer, targets in load.items():
        vecs = [np.asarray(v, dtype=float) for v in (targets or {}).values() if isinstance(v, list) and v]
        if vecs and len({len(v) for v in vecs}) == 1:  # all zero: no router recorded (a 1-expert layer)
            rows[int(layer)] = np.mean(vecs, axis=0) if any(v.any() for v in vecs) else np.full(len(vecs[0]), np.nan)
    layers = sorted(rows)
    width = max((len(rows[j]) for j in layers), default=1)
    grid = np.full((max(len(layers), 1), width), np.nan)
    for i, j in enumerate(layers):
        grid[i, :len(rows[j])] = rows[j]
    fig = Figure(figsize=(max(4.0, 0.5 * width + 3), max(3.0, 0.3 * len(layers) + 2)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [str(j) for j in layers])
    ax.set_xticks(range(width), [str(e) for e in range(width)])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path


# ---------------------------------------------------------------------------------- pure helpers
def settings_params(s: dict) -> dict:
    data, budget = s.get("data") or {}, s.get("budget") or {}
    tasks = data.get("tasks", []) if isinstance(data, dict) else []
    out = {"study": s.get("name"), "model": s.get("model"),
           "data.tasks": ",".join(f"{t.get('name')}:{t.get('train')}/{t.get('validation')}/{t.get('test')}"
                                  for t in tasks if isinstance(t, dict)) or str(data),
           "data.seed": data.get("seed") if isinstance(data, dict) else None, "data_dir": s.get("data_dir"),
           "objectives": ",".join(s.get("objectives") or []), "budget": budget.get("text"),
           "budget_unit": budget.get("unit"), "budget_seconds": budget.get("seconds"),
           "optuna_storage": mask_uri(s["storage"]) if s.get("storage") else "sqlite (study folder)"}
    for key in ("sampler", "scheduler", "space", "space_fingerprint", "cpus_per_trial", "gpus_per_trial", "seed",
                "priors", "max_failures", "max_concurrent", "num_layers", "ray_address"):
        out[key] = s.get(key)
    return {k: v for k, v in out.items() if v is not None}


def resolve(alloc, num_layers: int) -> dict | None:
    if not isinstance(alloc, dict):
        return None
    try:
        return resolve_allocation(alloc, num_layers or int(alloc.get("num_layers", 0))).to_dict()
    except Exception:  # noqa: BLE001 - a summary only: the raw allocation is still logged
        return alloc if isinstance(alloc.get("experts"), list) else None


def allocation_params(alloc: dict, num_layers: int) -> dict:
    """Method, options and per-group means of the per-layer experts / top_k / rank (experts_g0..g3, ...)."""
    full = resolve(alloc, num_layers)
    if full is None:
        return {f"allocation.{k}": v for k, v in alloc.items()}
    n = len(full["experts"])
    out = {"method": full.get("method"), "num_layers": n, "experts_total": sum(full["experts"]),
           "alpha": full.get("alpha"), "dropout": full.get("dropout"), "targets": full.get("targets"),
           "moe_targets": full.get("moe_targets")}
    for key in ("experts", "top_k", "rank"):
        start = 0
        for g, size in enumerate(group_sizes(n, min(GROUPS, n))):
            part = full[key][start:start + size]
            start += size
            out[f"{key}_g{g}"] = round(sum(part) / len(part), 3)
    out.update({k: v for k, v in (full.get("options") or {}).items() if k not in out})
    return out


def result_metrics(r: dict, ts: int) -> list:
    step = int(r.get("steps") or 0)
    out = []
    for split, prefix in (("validation", "val"), ("test", "test")):
        m = r.get(split) or {}
        for key in (OBJECTIVE_METRIC, "macro_accuracy"):
            out.append((f"{prefix}.{key}", m.get(key), ts, step))
        for task, tm in (m.get("tasks") or {}).items():
            out += [(f"{prefix}.{task}.{k}", tm.get(k), ts, step) for k in ("balanced_accuracy", "accuracy")]
    out += [("train_loss", loss, ts, int(s)) for s, loss in (r.get("losses") or [])]
    out += [("expert_redundancy", v, ts, int(layer)) for layer, v in (r.get("redundancy") or {}).items()]
    for key in ("trainable_params", "total_params", "steps", "tokens", "wall_seconds", "train_seconds",
                "eval_seconds", "tokens_per_second", "seconds_per_step", "peak_memory_mb"):
        out.append((key, r.get(key), ts, step))
    return out


def outcome(t) -> tuple[str, str | None]:
    """(our state, reason) of an Optuna trial that is not running any more (``records.state_of``)."""
    if t is None:
        return State.CRASHED, "no record of the trial in the Optuna storage"
    state, reason = state_of(t)
    if state == State.RUNNING:
        return State.CRASHED, ENDED_BY_SEARCH
    if state == State.QUEUED:
        return State.NOT_RUN, reason or "never started"
    if state == State.CRASHED and reason is None:
        reason = CRASHED
    return state, reason


def mask_uri(uri: str) -> str:
    """A URI without its password (written to mlflow.json and warnings)."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def trial_params(spec: dict, num_layers: int, t) -> tuple[dict, dict]:
    """(params, tags) of a trial's run: its allocation summarised, its training settings, its Optuna params
    as ``optuna.<name>``; ``t`` the Optuna FrozenTrial or None."""
    params: dict = {}
    if isinstance(spec.get("allocation"), dict):
        params.update(allocation_params(spec["allocation"], num_layers))
    for k, v in (spec.get("train") or {}).items():
        params[f"train.{k}" if k in params else k] = v
    attrs = t.user_attrs if t is not None else {}
    if t is not None:
        params.update({f"optuna.{k}": v for k, v in t.params.items()})
    tags = {"method": params.get("method"), "mlflow.note.content": attrs.get(Attr.SUMMARY),
            "summary": attrs.get(Attr.SUMMARY), "prior": attrs.get(Attr.PRIOR), "retry_of": attrs.get(Attr.RETRY_OF),
            "seed": attrs.get(Attr.SEED), "confirms": attrs.get(Attr.CONFIRM)}
    return params, tags


def trial_artifacts(folder: Path, number: int, num_layers: int, dest: Path) -> bool:
    """trial.yaml, results.json, the adapter's allocation.yaml and the two plots, copied / drawn into
    ``dest``; False when there is nothing."""
    result = read_json(folder / Files.RESULTS) or {}
    for src in (folder / Files.TRIAL_CONFIG, folder / Files.RESULTS, folder / Files.ADAPTER / "allocation.yaml"):
        if src.is_file():
            shutil.copy(src, dest / src.name)
    alloc = result.get("allocation") or resolve((read_yaml(folder / Files.TRIAL_CONFIG) or {}).get("allocation"), num_layers)
    if alloc:
        plot_allocation(alloc, f"trial {number}: {alloc.get('method', '')}", dest / "allocation.png")
    if result.get("expert_load"):
        plot_expert_load(result["expert_load"], f"trial {number}: expert load (validation)", dest / "expert_load.png")
    return any(dest.iterdir())


def best_metrics(best: dict | None, ts: int, step: int) -> list:
    """The study's best (``confidence.Best``) as the parent run's metrics, the same names live and at the end:
    ``best.objective`` (its mean over seeds), ``best.trial`` (the configuration's first trial), ``best.seeds``."""
    if not best:
        return []
    return [("best.objective", best["value"], ts, step), ("best.trial", best["trial"], ts, step),
            ("best.seeds", best["n"], ts, step)]


def summary_metrics(summary: dict, ts: int) -> tuple[list, dict]:
    """The parent run's final metrics and tags from ``reports.status.summarize``: the best, counts, spend."""
    best, budget = summary.get("best"), summary.get("budget") or {}
    metrics = [(f"trials.{k}", v, ts, 0) for k, v in (summary.get("counts") or {}).items()]
    metrics += [(k, budget.get(src), ts, 0) for k, src in (("spent_total", "spent"), ("budget_fraction", "fraction"))]
    tags = {}
    if best:
        last = max((t["number"] for t in summary.get("trials") or []), default=0)
        metrics += best_metrics(best, ts, last)
        tags.update({"best.trial": best["trial"], "best.summary": best["summary"],
                     "best.trials": ",".join(map(str, best["trials"])),
                     "best.params": json.dumps(best["params"], sort_keys=True)})
    ev = summary.get("evidence")
    if best and ev and ev["winner"]["trials"][0] == best["trial"]:  # how sure: its CI, the ties, the noise
        metrics += [("best.ci95", ev["winner"].get("ci95"), ts, 0), ("best.tied", len(ev["tied"]), ts, 0),
                    ("seed_noise", ev.get("noise"), ts, 0)]
    if summary.get("pareto"):
        tags["pareto_trials"] = ",".join(str(t["number"]) for t in summary["pareto"])
    return metrics, tags


class OptunaReader:
    """A study's Optuna trials for the tracker, read-only (never creates the storage): its ``TrialStore``,
    opened once it exists."""

    def __init__(self, root: Path, settings: dict):
        self.root, self.settings, self._store = Path(root), settings, None

    def _open(self) -> TrialStore | None:
        if self._store is None:
            self._store = TrialStore.read(Study(self.root, self.settings))
        return self._store

    def trial(self, number: int):
        """The FrozenTrial, or None when the storage or the trial is not there."""
        store = self._open()
        return store.trial(number) if store is not None else None


def read_yaml(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None
