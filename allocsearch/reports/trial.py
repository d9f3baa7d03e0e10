"""Read-only queries over one trial of a study (the dashboard's trial and compare pages).

A trial folder holds ``trial.yaml`` (its config, written when it was admitted) and ``results.json`` (written
when it ended: metrics per task, losses, checkpoints, cost, expert load, redundancy). Either may be missing
(a running or failed trial) or unreadable; what can be shown is returned with a note for the rest.
Torch-free.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from allocsearch.reports.status import summarize
from allocsearch.study.folder import Files, trial_dir
from allocsearch.study.records import State

COST_KEYS = ("device_seconds", "wall_seconds", "train_seconds", "eval_seconds", "peak_memory_mb", "memory_kind",
             "trainable_params", "total_params", "steps", "tokens", "tokens_per_second", "seconds_per_step",
             "device", "dtype", "threads", "devices")


def trial_detail(root: str | Path, number: int, summary: dict | None = None) -> dict[str, Any]:
    """Everything the trial page shows. Keys: ``number``, ``row`` (the ``load_trials`` row or None),
    ``config_text`` / ``config`` (trial.yaml), ``result`` (results.json or None), ``notes`` (why a part is
    missing), ``allocation`` (per-layer lists), ``losses``, ``checkpoints``, ``load``, ``redundancy``,
    ``cost``, ``scores``, ``adapter``."""
    root = Path(root)
    summary = summary if summary is not None else summarize(root)
    row = next((t for t in summary["trials"] if t["number"] == number), None)
    folder = trial_dir(root, number)
    notes: list[str] = []
    config_text, config = _read_config(folder / Files.TRIAL_CONFIG, notes)
    result = _read_result(folder / Files.RESULTS, notes, running=bool(row and row["state"] == State.RUNNING))
    allocation = allocation_layers((result or {}).get("allocation") or (config or {}).get("allocation"),
                                   num_layers=summary.get("num_layers") or _num_layers(root),
                                   experts=row["experts"] if row else None)
    cost = {k: (result or {}).get(k) for k in COST_KEYS if (result or {}).get(k) is not None}
    if row:
        cost.update({"ledger_device_seconds": row["spend"], "predicted_device_seconds": row["predicted"]})
    return {"number": number, "row": row, "config_text": config_text, "config": config, "result": result,
            "notes": notes, "allocation": allocation, "losses": losses(result), "checkpoints": checkpoints(result),
            "load": expert_load(result), "redundancy": redundancy(result), "cost": cost, "scores": scores(result),
            "adapter": (folder / "adapter").is_dir()}


def _read_config(path: Path, notes: list[str]) -> tuple[str | None, dict | None]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        notes.append("no trial.yaml: the trial was never admitted (or its folder was removed)")
        return None, None
    except OSError as exc:
        notes.append(f"trial.yaml cannot be read ({exc.strerror})")
        return None, None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        notes.append(f"trial.yaml is not valid YAML ({str(exc).splitlines()[0]})")
        return text, None
    if not isinstance(data, dict):
        notes.append("trial.yaml is not a mapping")
        return text, None
    return text, data


def _read_result(path: Path, notes: list[str], running: bool) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        notes.append("no results.json yet: the trial is running" if running else
                     "no results.json: the trial ended before writing its results")
        return None
    except (OSError, ValueError) as exc:
        notes.append(f"results.json cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None
    if not isinstance(data, dict):
        notes.append("results.json is not a JSON object")
        return None
    return data


def _num_layers(root: Path) -> int | None:
    try:
        return int(json.loads((root / Files.SETTINGS).read_text(encoding="utf-8")).get("num_layers"))
    except (OSError, ValueError, TypeError):
        return None


def allocation_layers(alloc: dict | None, num_layers: int | None = None,
                      experts: list[int] | None = None) -> dict[str, Any] | None:
    """``{"method", "layers": [{"layer", "experts", "top_k", "rank"}], "targets", "options", "source"}``
    from an allocation as results.json or trial.yaml hold it (complete lists, or a shape/uniform spec
    resolved torch-free), else from the experts per layer the controller recorded."""
    lists = None
    if isinstance(alloc, dict):
        if isinstance(alloc.get("experts"), list):
            lists = alloc
        elif num_layers:
            lists = _resolve(alloc, num_layers)
    if lists is None and experts:
        lists = {"experts": list(experts), "method": (alloc or {}).get("method") if isinstance(alloc, dict) else None}
    if lists is None:
        return None
    n = len(lists["experts"])
    out = []
    for j in range(n):
        out.append({"layer": j, "experts": _at(lists.get("experts"), j), "top_k": _at(lists.get("top_k"), j),
                    "rank": _at(lists.get("rank"), j)})
    return {"method": lists.get("method"), "layers": out, "targets": lists.get("targets"),
            "options": lists.get("options") or {}, "source": "lists" if lists is alloc else "resolved"}


def _at(values, j):
    if isinstance(values, list):
        return values[j] if j < len(values) else None
    return values


def _resolve(alloc: dict, num_layers: int) -> dict | None:
    from allocsearch.allocation.config import AllocationConfig

    d = {k: v for k, v in alloc.items() if k != "num_layers"}
    try:
        if "method" not in d:
            return None
        if "shape" in d:
            cfg = AllocationConfig.from_shape(d.pop("method"), num_layers, d.pop("shape"), **d)
        else:
            cfg = AllocationConfig.uniform(d.pop("method"), num_layers, experts=d.pop("experts", 1), **d)
        return cfg.to_dict()
    except Exception:  # noqa: BLE001 - drawing only: a spec that does not resolve is shown as text
        return None


def losses(result: dict | None) -> list[dict]:
    """``[{"step", "loss"}]`` from results.json ``losses`` ([step, loss] pairs); non-finite losses dropped."""
    out = []
    for item in (result or {}).get("losses") or []:
        try:
            step, loss = int(item[0]), float(item[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(loss):
            out.append({"step": step, "loss": loss})
    return out


def checkpoints(result: dict | None) -> list[dict]:
    """``[{"step", "task", "balanced_accuracy", "accuracy"}]``: the macro row (task ``macro``) and each task."""
    out = []
    for cp in (result or {}).get("checkpoints") or []:
        m = cp.get("metrics") if isinstance(cp, dict) else None
        if not isinstance(m, dict):
            continue
        out.append({"step": cp.get("step"), "task": "macro", "balanced_accuracy": m.get("macro_balanced_accuracy"),
                    "accuracy": m.get("macro_accuracy")})
        for task, tm in (m.get("tasks") or {}).items():
            out.append({"step": cp.get("step"), "task": task, "balanced_accuracy": tm.get("balanced_accuracy"),
                        "accuracy": tm.get("accuracy")})
    return out


def expert_load(result: dict | None) -> dict[str, Any] | None:
    """Fraction of tokens routed to each expert, per layer: ``{"layers", "targets", "max_experts",
    "by_target": {target: matrix}, "mean": matrix}``; matrix rows are layers, columns expert indices (None
    past a layer's experts)."""
    raw = (result or {}).get("expert_load")
    if not isinstance(raw, dict) or not raw:
        return None
    layers = sorted(raw, key=lambda k: int(k) if str(k).isdigit() else 10**9)
    targets = sorted({t for v in raw.values() if isinstance(v, dict) for t in v})
    width = max((len(x) for v in raw.values() if isinstance(v, dict) for x in v.values() if isinstance(x, list)),
                default=0)
    if not width:
        return None

    def row(values):
        vals = [float(x) for x in values] if isinstance(values, list) else []
        return vals + [None] * (width - len(vals))

    by_target = {t: [row((raw[j] or {}).get(t)) for j in layers] for t in targets}
    mean = []
    for i, j in enumerate(layers):
        cols = []
        for e in range(width):
            vals = [by_target[t][i][e] for t in targets if by_target[t][i][e] is not None]
            cols.append(sum(vals) / len(vals) if vals else None)
        mean.append(cols)
    return {"layers": [int(j) if str(j).isdigit() else j for j in layers], "targets": targets,
            "max_experts": width, "by_target": by_target, "mean": mean}


def redundancy(result: dict | None) -> list[dict]:
    """``[{"layer", "redundancy"}]``: mean pairwise distance between a layer's experts (results.json)."""
    raw = (result or {}).get("redundancy")
    if not isinstance(raw, dict):
        return []
    out = []
    for k, v in raw.items():
        try:
            out.append({"layer": int(k), "redundancy": float(v)})
        except (TypeError, ValueError):
            continue
    return sorted(out, key=lambda r: r["layer"])


def scores(result: dict | None) -> list[dict]:
    """``[{"split", "task", "accuracy", "balanced_accuracy", "n"}]`` for validation, test and zero-shot."""
    out = []
    result = result or {}
    splits = [("validation", result.get("validation")), ("test", result.get("test"))]
    zs = result.get("zero_shot") or {}
    if isinstance(zs, dict):
        splits += [(f"zero-shot {k}", v) for k, v in zs.items()]
    for split, m in splits:
        if not isinstance(m, dict):
            continue
        for task, tm in (m.get("tasks") or {}).items():
            out.append({"split": split, "task": task, "accuracy": tm.get("accuracy"),
                        "balanced_accuracy": tm.get("balanced_accuracy"), "n": tm.get("n")})
        out.append({"split": split, "task": "macro", "accuracy": m.get("macro_accuracy"),
                    "balanced_accuracy": m.get("macro_balanced_accuracy"), "n": m.get("n")})
    return out


def compare_trials(root: str | Path, numbers: list[int], summary: dict | None = None) -> list[dict]:
    """``trial_detail`` of each trial in ``numbers`` (one summary read for all)."""
    summary = summary if summary is not None else summarize(root)
    return [trial_detail(root, n, summary=summary) for n in numbers]


def trial_signature(root: str | Path, number: int) -> tuple:
    """Changes when the trial's files change (a cache key for live pages)."""
    out = []
    for name in (Files.TRIAL_CONFIG, Files.RESULTS):
        try:
            st = (trial_dir(root, number) / name).stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)
