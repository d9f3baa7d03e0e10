"""What a study's MLflow runs hold, as pure functions of the study folder's files: the parent run's params
from the settings, a trial run's params (per-group summary of the per-layer allocation) and final metrics
from results.json, a trial's outcome from its Optuna record, and the two plots (matplotlib, Agg; no display).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from allocsearch.fileio import read_json_object as read_json

GROUPS = 4  # the per-layer allocation is summarised as means over this many contiguous layer groups
END_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "oom": "FAILED", "failed": "FAILED",
              "crashed": "FAILED", "not_run": "KILLED"}
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
        from allocsearch.training.trial import resolve_allocation

        return resolve_allocation(alloc, num_layers or int(alloc.get("num_layers", 0))).to_dict()
    except Exception:  # noqa: BLE001 - a summary only: the raw allocation is still logged
        return alloc if isinstance(alloc.get("experts"), list) else None


def allocation_params(alloc: dict, num_layers: int) -> dict:
    """Method, options and per-group means of the per-layer experts / top_k / rank (experts_g0..g3, ...)."""
    full = resolve(alloc, num_layers)
    if full is None:
        return {f"allocation.{k}": v for k, v in alloc.items()}
    from allocsearch.allocation.shapes import group_sizes

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
        for key in ("macro_balanced_accuracy", "macro_accuracy"):
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
    """(our state, reason) of an Optuna trial that is not running any more (``trial_state.state_of``)."""
    from allocsearch.study.records import state_of

    if t is None:
        return "crashed", "no record of the trial in the Optuna storage"
    state, reason = state_of(t)
    if state == "running":
        return "crashed", ENDED_BY_SEARCH
    if state == "queued":
        return "not_run", reason or "never started"
    if state == "crashed" and reason is None:
        from allocsearch.study.folder import CRASHED

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
    tags = {"method": params.get("method"), "mlflow.note.content": attrs.get("summary"),
            "summary": attrs.get("summary"), "prior": attrs.get("prior"), "retry_of": attrs.get("retry_of")}
    return params, tags


def trial_artifacts(folder: Path, number: int, num_layers: int, dest: Path) -> bool:
    """trial.yaml, results.json, the adapter's allocation.yaml and the two plots, copied / drawn into
    ``dest``; False when there is nothing."""
    result = read_json(folder / "results.json") or {}
    for src in (folder / "trial.yaml", folder / "results.json", folder / "adapter" / "allocation.yaml"):
        if src.is_file():
            shutil.copy(src, dest / src.name)
    alloc = result.get("allocation") or resolve((read_yaml(folder / "trial.yaml") or {}).get("allocation"), num_layers)
    if alloc:
        plot_allocation(alloc, f"trial {number}: {alloc.get('method', '')}", dest / "allocation.png")
    if result.get("expert_load"):
        plot_expert_load(result["expert_load"], f"trial {number}: expert load (validation)", dest / "expert_load.png")
    return any(dest.iterdir())


def summary_metrics(summary: dict, ts: int) -> tuple[list, dict]:
    """The parent run's final metrics and tags from ``analysis.summarize``: best trial, counts, spend."""
    best, budget = summary.get("best") or {}, summary.get("budget") or {}
    metrics = [(f"trials.{k}", v, ts, 0) for k, v in (summary.get("counts") or {}).items()]
    metrics += [(k, budget.get(src), ts, 0) for k, src in (("spent_total", "spent"), ("budget_fraction", "fraction"))]
    tags = {}
    if best:
        metrics += [("best.objective", best.get("objective"), ts, 0), ("best.trial", best.get("number"), ts, 0)]
        tags.update({"best.trial": best.get("number"), "best.summary": best.get("summary"),
                     "best.params": json.dumps(best.get("params"), sort_keys=True)})
    winner = (summary.get("evidence") or {}).get("winner")
    if winner and winner["n"] > 1:  # the confirmed winner: its mean over seeds, as status and export show it
        ev = summary["evidence"]
        metrics += [("winner.mean", winner["mean"], ts, 0), ("winner.ci95", winner.get("ci95"), ts, 0),
                    ("winner.n", winner["n"], ts, 0), ("winner.tied", len(ev["tied"]), ts, 0),
                    ("seed_noise", ev.get("noise"), ts, 0)]
        tags["winner.trials"] = ",".join(map(str, winner["trials"]))
    if summary.get("pareto"):
        tags["pareto_trials"] = ",".join(str(t["number"]) for t in summary["pareto"])
    return metrics, tags


class OptunaReader:
    """A study's Optuna trials, read-only (never creates the storage)."""

    def __init__(self, root: Path, settings: dict):
        self.root, self.settings, self._storage = Path(root), settings, None

    def _open(self):
        if self._storage is None:
            from allocsearch.study.folder import Study

            url = Study(self.root, self.settings).storage_url
            if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
                return None  # not created yet
            import optuna

            storage = optuna.storages.get_storage(url)
            try:
                self._storage = (storage, storage.get_study_id_from_name(self.settings.get("name")))
            except KeyError:
                return None
        return self._storage

    def trial(self, number: int):
        """The FrozenTrial, or None when the storage or the trial is not there."""
        if self._open() is None:
            return None
        storage, study_id = self._storage
        try:
            return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
        except KeyError:
            return None

    def best(self) -> tuple[float, int] | None:
        """(first objective, number) of the best completed trial."""
        if self._open() is None:
            return None
        storage, study_id = self._storage
        from allocsearch.study.records import best_of, state_of

        best = best_of([{"number": t.number, "state": state_of(t)[0], "objective": t.values[0] if t.values else None,
                         "params": t.params, "seed": t.user_attrs.get("seed", 0),
                         "confirm": t.user_attrs.get("confirm")}
                        for t in storage.get_all_trials(study_id, deepcopy=False)], self.settings.get("noise"))
        return (best["objective"], best["number"]) if best else None


def read_yaml(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None
