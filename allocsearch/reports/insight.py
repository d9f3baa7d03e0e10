"""Read-only queries across a study's trials: what the search learnt (the dashboard's insight page).

Parameter importance (Optuna's evaluators over the completed trials), parameter columns for parallel
coordinates and slice plots, and the allocation map: score by MoLA shape family x experts per layer, and
which layers the best trials give experts to. Problems (too few trials, nothing varies) come back as a
message, not an exception.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from allocsearch.study.records import Attr, State
from allocsearch.study.storage import TrialStore
from allocsearch.study.folder import Study, StudyError, directions

MIN_IMPORTANCE_TRIALS = 3


def methods_of(trials: list[dict]) -> list[str]:
    """The methods the study's trials used (the ``method`` parameter), sorted."""
    return sorted({str(t["params"]["method"]) for t in trials if t["params"].get("method") is not None})


def scored(trials: list[dict], method: str | None = None, pruned: bool = False) -> list[dict]:
    """Completed trials with an objective (and pruned ones, scored at their last checkpoint, if
    ``pruned``), of one method or all."""
    states = State.WITH_RESULT if pruned else (State.COMPLETED,)
    return [t for t in trials if t["state"] in states and t["objective"] is not None
            and (method is None or t["params"].get("method") == method)]


def param_importance(root: str | Path, method: str | None = None, pruned: bool = False) -> dict[str, Any]:
    """``{"importances": {param: share}, "n", "evaluator", "message"}`` for the first objective over the
    completed trials (with ``pruned``, also trials stopped early, at their last checkpoint's score) of one
    ``method`` (its own parameters then take part) or all (only the parameters every trial has). fANOVA
    where scikit-learn is installed, else PED-ANOVA."""
    import optuna
    from optuna.trial import TrialState, create_trial

    root = Path(root)
    try:
        study = Study.open(root.parent, root.name)
        store = TrialStore.read(study)
        frozen = store.trials() if store is not None else []
    except StudyError as exc:
        return {"importances": {}, "n": 0, "evaluator": None, "message": str(exc)}
    done = []
    for t in frozen:
        if method is not None and t.params.get("method") != method:
            continue
        if t.state == TrialState.COMPLETE and t.values:
            done.append(t)
        elif pruned and t.state == TrialState.PRUNED and t.user_attrs.get(Attr.OBJECTIVE) is not None:
            values = [float(t.user_attrs[Attr.OBJECTIVE])] + [0.0] * (len(study.objectives) - 1)
            done.append(create_trial(params=t.params, distributions=t.distributions, values=values))
    what = ("completed or pruned " if pruned else "completed ") + (f"{method} trials" if method else "trials")
    if len(done) < MIN_IMPORTANCE_TRIALS:
        return {"importances": {}, "n": len(done), "evaluator": None,
                "message": f"parameter importance needs at least {MIN_IMPORTANCE_TRIALS} {what}; "
                           f"{len(done)} so far"}
    common = set.intersection(*(set(t.params) for t in done))
    varied = [p for p in sorted(common) if len({repr(t.params[p]) for t in done}) > 1]
    if not varied:
        return {"importances": {}, "n": len(done), "evaluator": None,
                "message": f"no parameter varies across the {len(done)} {what}"}
    if len({t.values[0] for t in done}) < 2:
        return {"importances": {}, "n": len(done), "evaluator": None,
                "message": f"all {len(done)} {what} scored the same: nothing to attribute"}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mem = optuna.create_study(directions=directions(study.objectives))
    mem.add_trials(done)
    try:
        import sklearn  # noqa: F401

        evaluator, name = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    except ImportError:
        evaluator, name = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
    try:
        imp = optuna.importance.get_param_importances(mem, evaluator=evaluator, params=varied,
                                                      target=lambda t: t.values[0])
    except Exception as exc:  # noqa: BLE001 - an evaluator's refusal is a message
        return {"importances": {}, "n": len(done), "evaluator": name,
                "message": f"parameter importance failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"}
    return {"importances": {k: float(v) for k, v in imp.items()}, "n": len(done), "evaluator": name,
            "message": None}


def param_columns(trials: list[dict]) -> list[dict]:
    """The parameters of ``trials``: ``[{"name", "kind": "number"|"category", "values": sorted distinct,
    "log": bool}]`` (log when a positive number spans more than a decade); ``method`` first."""
    names: list[str] = []
    for t in trials:
        names += [k for k in t["params"] if k not in names]
    out = []
    for name in sorted(names, key=lambda n: (n != "method", n)):
        vals = [t["params"][name] for t in trials if name in t["params"]]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        distinct = sorted(set(vals), key=lambda v: (str(type(v)), v)) if vals else []
        log = numeric and bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 10
        out.append({"name": name, "kind": "number" if numeric else "category", "values": distinct, "log": log})
    return out


def parallel_dims(trials: list[dict]) -> list[dict]:
    """Axes for parallel coordinates over ``trials`` (those with an objective): each parameter all of them
    have (pick one method's trials to see its own parameters; categories as codes with their labels, log
    scales as log10) and the objective last. ``[{"label", "values", "tickvals", "ticktext"}]``."""
    rows = [t for t in trials if t["objective"] is not None]
    dims = []
    for col in param_columns(rows):
        name = col["name"]
        if not all(name in t["params"] for t in rows):
            continue
        if col["kind"] == "category":
            labels = [str(v) for v in col["values"]]
            code = {str(v): i for i, v in enumerate(col["values"])}
            values = [code.get(str(t["params"].get(name)), -1) if name in t["params"] else -1 for t in rows]
            dims.append({"label": name, "values": values, "tickvals": list(range(len(labels))), "ticktext": labels})
        else:
            fn = (lambda v: math.log10(v)) if col["log"] else float
            present = [fn(t["params"][name]) for t in rows if name in t["params"]]
            low = min(present) if present else 0.0
            values = [fn(t["params"][name]) if name in t["params"] else low for t in rows]
            dims.append({"label": f"log10 {name}" if col["log"] else name, "values": values,
                         "tickvals": None, "ticktext": None})
    dims.append({"label": "objective", "values": [t["objective"] for t in rows], "tickvals": None, "ticktext": None})
    return dims


def slice_points(trials: list[dict], param: str) -> list[dict]:
    """``[{"number", "value", "objective", "state"}]``: the objective against one parameter (trials that
    have it and an objective; pruned trials' objectives are their last checkpoint's)."""
    return [{"number": t["number"], "value": t["params"][param], "objective": t["objective"], "state": t["state"]}
            for t in trials if param in t["params"] and t["objective"] is not None]


def allocation_map(trials: list[dict], pruned: bool = False) -> dict[str, Any] | None:
    """Score by MoLA shape family x average experts per layer, over completed trials (and pruned ones at
    their last checkpoint, if ``pruned``): ``{"shape_param", "size_param", "shapes", "sizes", "best",
    "mean", "count"}`` (matrices: rows shapes, columns sizes, None where no trial ran). None when the space
    has no ``<method>.shape`` / ``<method>.per_layer``."""
    done = scored(trials, pruned=pruned)
    keys = {k for t in done for k in t["params"]}
    pairs = sorted((k, k[: -len(".shape")] + ".per_layer") for k in keys if k.endswith(".shape"))
    pairs = [(s, p) for s, p in pairs if p in keys]
    if not pairs:
        return None
    shape_key, size_key = pairs[0]
    cells: dict[tuple[str, Any], list[float]] = {}
    for t in done:
        if shape_key in t["params"] and size_key in t["params"]:
            cells.setdefault((str(t["params"][shape_key]), t["params"][size_key]), []).append(t["objective"])
    shapes = sorted({s for s, _ in cells})
    sizes = sorted({n for _, n in cells})

    def grid(fn):
        return [[fn(cells[(s, n)]) if (s, n) in cells else None for n in sizes] for s in shapes]

    return {"shape_param": shape_key, "size_param": size_key, "shapes": shapes, "sizes": sizes,
            "best": grid(max), "mean": grid(lambda v: sum(v) / len(v)), "count": grid(len)}


def layer_preference(trials: list[dict], top: int = 20, pruned: bool = False) -> dict[str, Any] | None:
    """Which layers want experts: the experts per layer of the best completed trials (``rows``: up to
    ``top`` trials, best first, with ``experts`` and ``objective``) and, per layer, the correlation between
    its experts and the score over all of them (``correlation``; None where it does not vary)."""
    done = [t for t in scored(trials, pruned=pruned) if t["experts"]]
    if not done:
        return None
    n = max(len(t["experts"]) for t in done)
    done = [t for t in done if len(t["experts"]) == n]
    done.sort(key=lambda t: -t["objective"])
    corr = []
    ys = [t["objective"] for t in done]
    for j in range(n):
        xs = [float(t["experts"][j]) for t in done]
        corr.append(_pearson(xs, ys))
    return {"layers": list(range(n)), "correlation": corr,
            "rows": [{"number": t["number"], "objective": t["objective"], "experts": list(t["experts"]),
                      "summary": t["summary"]} for t in done[:top]]}


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def pareto_points(summary: dict) -> dict[str, Any] | None:
    """Multi-objective studies: every completed trial's values and whether it is on the front."""
    if len(summary["objectives"]) < 2:
        return None
    front = {t["number"] for t in summary.get("pareto") or []}
    pts = [{"number": t["number"], "values": t["values"], "front": t["number"] in front, "summary": t["summary"]}
           for t in summary["trials"] if t["state"] == State.COMPLETED and t["values"]]
    return {"objectives": summary["objectives"], "points": pts}
