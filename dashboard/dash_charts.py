"""Plotly figures of the dashboard, built from what ``allocsearch.reports.status*`` returns (plain lists and
dicts). No reads here."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from allocsearch.study.records import State

STATE_COLORS = {"completed": "#2e7d32", "pruned": "#f9a825", "oom": "#ef6c00", "failed": "#c62828", "crashed": "#6a1b9a",
                "not_run": "#9e9e9e", "running": "#1565c0", "queued": "#90caf9"}
EXPERT_COLOR = "#3f51b5"


def _layout(fig: go.Figure, height: int = 320, **kw) -> go.Figure:
    fig.update_layout(height=height, **{"margin": dict(l=10, r=10, t=40, b=10), **kw})
    return fig


def burn_down(timeline: dict, fmt) -> go.Figure:
    pts = timeline["points"]
    t = [p["time"] for p in pts]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=t, y=[p["remaining"] for p in pts], name="remaining", line=dict(color="#1565c0"),
                             fill="tozeroy", hovertext=[fmt(p["remaining"]) for p in pts]))
    fig.add_trace(go.Scatter(x=t, y=[p["spent"] for p in pts], name="spent", line=dict(color="#ef6c00")))
    fig.add_hline(y=timeline["total"], line_dash="dot", annotation_text="budget", line_color="#555")
    unit = "wall seconds" if timeline["unit"] == "wall" else f"{timeline['unit']}-seconds"
    return _layout(fig, title=f"Budget burn-down ({unit})", yaxis_title=unit, legend=dict(orientation="h", y=-0.2))


def states(counts: dict) -> go.Figure:
    items = [(k, v) for k, v in counts.items() if v]
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k.replace("_", " ") for k, _ in items], orientation="h",
                           marker_color=[STATE_COLORS.get(k, "#777") for k, _ in items], text=[v for _, v in items]))
    return _layout(fig, title="Trials by state", yaxis=dict(autorange="reversed"))


def anytime(points: list[dict]) -> go.Figure:
    fig = go.Figure()
    best = [p for p in points if p["best"] is not None]
    fig.add_trace(go.Scatter(x=[p["device_seconds"] for p in best], y=[p["best"] for p in best], mode="lines",
                             line_shape="hv", name="best so far", line=dict(color="#2e7d32", width=3)))
    for state in STATE_COLORS:
        pts = [p for p in points if p["state"] == state and p["objective"] is not None]
        if pts:
            fig.add_trace(go.Scatter(x=[p["device_seconds"] for p in pts], y=[p["objective"] for p in pts],
                                     mode="markers", name=state, marker=dict(color=STATE_COLORS[state], size=8),
                                     text=[f"#{p['number']} {p['summary']}" for p in pts]))
    return _layout(fig, title="Best so far vs device-seconds spent (anytime curve)", xaxis_title="device-seconds",
                   yaxis_title="objective")


def finalists(rows: list[dict]) -> go.Figure:
    """Each finalist's mean with its 95% interval over seeds; the winner green, ties amber."""
    color = {"winner": "#2e7d32", "tied": "#f9a825", "": "#78909c"}
    fig = go.Figure(go.Scatter(
        x=[r["mean"] for r in rows], y=[f"{r['summary']} (n={r['n']})" for r in rows], mode="markers",
        error_x=dict(type="data", array=[r["ci95"] or 0 for r in rows], visible=True),
        marker=dict(size=11, color=[color[r["mark"]] for r in rows])))
    return _layout(fig, height=120 + 28 * len(rows), title="Finalists: mean +- 95% CI over seeds",
                   yaxis=dict(autorange="reversed"), xaxis_title="objective")


def allocation(alloc: dict, title: str = "") -> go.Figure:
    """Experts per layer as bars centred on the axis (the MoLA diagrams' shape), rank and top-k beside
    them; layer 0 (input side) at the bottom."""
    layers = alloc["layers"]
    y = [f"L{r['layer']}" for r in layers]
    e = [r["experts"] or 0 for r in layers]
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, column_widths=[0.6, 0.2, 0.2], horizontal_spacing=0.03,
                        subplot_titles=("experts", "rank", "top-k"))
    fig.add_trace(go.Bar(y=y, x=e, base=[-v / 2 for v in e], orientation="h", marker_color=EXPERT_COLOR,
                         text=e, textposition="inside", name="experts", hovertemplate="%{y}: %{text} experts"),
                  1, 1)
    fig.add_trace(go.Bar(y=y, x=[r["rank"] for r in layers], orientation="h", marker_color="#00897b", name="rank",
                         text=[r["rank"] for r in layers], textposition="inside"), 1, 2)
    fig.add_trace(go.Bar(y=y, x=[r["top_k"] for r in layers], orientation="h", marker_color="#8e24aa",
                         name="top-k", text=[r["top_k"] for r in layers], textposition="inside"), 1, 3)
    top = max(e + [1])
    fig.update_xaxes(range=[-top / 2 - 0.5, top / 2 + 0.5], showticklabels=False, row=1, col=1)
    fig.update_yaxes(categoryorder="array", categoryarray=y)
    return _layout(fig, height=max(260, 28 * len(layers) + 80), showlegend=False,
                   title=title or f"Allocation ({alloc.get('method') or '?'}), input side at the bottom")


def allocations(named: dict[str, dict]) -> go.Figure:
    """Experts per layer of several trials, grouped bars."""
    fig = go.Figure()
    for name, alloc in named.items():
        fig.add_trace(go.Bar(x=[r["layer"] for r in alloc["layers"]], y=[r["experts"] for r in alloc["layers"]],
                             name=name))
    return _layout(fig, title="Experts per layer", xaxis_title="layer", yaxis_title="experts", barmode="group")


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def losses(named: dict[str, list[dict]]) -> go.Figure:
    """Training loss per step (raw, faint, and a moving average) of one or several trials."""
    fig = go.Figure()
    single = len(named) == 1
    for name, rows in named.items():
        if not rows:
            continue
        x, y = [r["step"] for r in rows], [r["loss"] for r in rows]
        k = max(1, len(rows) // 20)
        if single:
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="loss", line=dict(color="#bbb", width=1)))
        fig.add_trace(go.Scatter(x=x, y=_smooth(y, k), mode="lines", name=f"{name} (avg of {k})" if k > 1 else name))
    return _layout(fig, title="Learning curve", xaxis_title="step", yaxis_title="training loss")


def checkpoints(named: dict[str, list[dict]], task: str = "macro") -> go.Figure:
    fig = go.Figure()
    for name, rows in named.items():
        if len(named) == 1:
            tasks = sorted({r["task"] for r in rows}, key=lambda t: t != "macro")
            tasks = tasks if len(tasks) > 2 else ["macro"]  # one task: its line is the macro line
        else:
            tasks = [task]
        for t in tasks:
            pts = [r for r in rows if r["task"] == t and r["balanced_accuracy"] is not None]
            label = t if len(named) == 1 else name
            fig.add_trace(go.Scatter(x=[r["step"] for r in pts], y=[r["balanced_accuracy"] for r in pts],
                                     mode="lines+markers", name=label,
                                     line=dict(width=3 if t == "macro" else 1.5)))
    return _layout(fig, title="Validation checkpoints (balanced accuracy)", xaxis_title="step",
                   yaxis_title="balanced accuracy")


def heatmap(matrix: list[list], x: list, y: list, title: str, x_title: str, y_title: str,
            colorscale: str = "Blues", text_fmt: str = ".2f", height: int | None = None) -> go.Figure:
    text = [[("" if v is None else format(v, text_fmt)) for v in row] for row in matrix]
    fig = go.Figure(go.Heatmap(z=matrix, x=x, y=y, colorscale=colorscale, text=text, texttemplate="%{text}",
                               hoverongaps=False, xgap=2, ygap=2))
    fig.update_xaxes(type="category", title=x_title)
    fig.update_yaxes(type="category", title=y_title)
    return _layout(fig, height=height or max(260, 30 * len(y) + 100), title=title)


def expert_load(load: dict, target: str | None) -> go.Figure:
    matrix = load["mean"] if target is None else load["by_target"][target]
    what = "mean over targets" if target is None else target
    return heatmap(matrix, list(range(load["max_experts"])), [f"L{j}" for j in load["layers"]],
                   f"Expert load ({what})", "expert", "layer")


def redundancy(rows: list[dict]) -> go.Figure:
    fig = go.Figure(go.Bar(x=[f"L{r['layer']}" for r in rows], y=[r["redundancy"] for r in rows],
                           marker_color="#6d4c41"))
    return _layout(fig, title="Redundancy per layer (low = redundant experts)",
                   xaxis_title="layer", yaxis_title="mean ||B_i A_i - B_j A_j||")


def scores(named: dict[str, list[dict]], split: str = "validation") -> go.Figure:
    fig = go.Figure()
    for name, rows in named.items():
        pts = [r for r in rows if r["split"] == split]
        fig.add_trace(go.Bar(x=[r["task"] for r in pts], y=[r["balanced_accuracy"] for r in pts], name=name))
    return _layout(fig, title=f"Per-task scores ({split}, balanced accuracy)", barmode="group",
                   yaxis_title="balanced accuracy")


def importance(imp: dict[str, float]) -> go.Figure:
    items = sorted(imp.items(), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h", marker_color="#5e35b1",
                           text=[f"{v:.2f}" for _, v in items]))
    return _layout(fig, height=max(220, 30 * len(items) + 80), xaxis_title="share of the objective's variance",
                   margin=dict(l=10, r=10, t=10, b=10))


def parallel(dims: list[dict]) -> go.Figure:
    obj = dims[-1]["values"]
    axes = [{k: v for k, v in (("label", d["label"]), ("values", d["values"]), ("tickvals", d["tickvals"]),
                               ("ticktext", d["ticktext"])) if v is not None} for d in dims]
    fig = go.Figure(go.Parcoords(line=dict(color=obj, colorscale="Viridis", showscale=True), dimensions=axes))
    return _layout(fig, height=380, title="Parallel coordinates (colour: objective)",
                   margin=dict(l=60, r=40, t=70, b=20))


def slices(columns: list[dict], points_by_param: dict[str, list[dict]]) -> go.Figure:
    n = len(columns)
    cols = min(3, n)
    rows = -(-n // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[c["name"] for c in columns], shared_yaxes=True,
                        vertical_spacing=0.12)
    for i, c in enumerate(columns):
        pts = points_by_param[c["name"]]
        for state in State.WITH_RESULT:
            sel = [p for p in pts if p["state"] == state]
            fig.add_trace(go.Scatter(x=[p["value"] if c["kind"] == "number" else str(p["value"]) for p in sel],
                                     y=[p["objective"] for p in sel], mode="markers", name=state,
                                     marker=dict(color=STATE_COLORS[state], size=8), showlegend=i == 0,
                                     text=[f"#{p['number']}" for p in sel]), i // cols + 1, i % cols + 1)
        if c["log"]:
            fig.update_xaxes(type="log", row=i // cols + 1, col=i % cols + 1)
    return _layout(fig, height=260 * rows + 60, title="Slices: objective against each parameter")


def pareto(data: dict) -> go.Figure:
    from allocsearch.study.folder import metric_names

    names = metric_names(data["objectives"])
    fig = go.Figure()
    for front, color in ((False, "#9e9e9e"), (True, "#d81b60")):
        pts = sorted((p for p in data["points"] if p["front"] == front), key=lambda p: p["values"][1])
        fig.add_trace(go.Scatter(x=[p["values"][1] for p in pts], y=[p["values"][0] for p in pts],
                                 mode="lines+markers" if front else "markers",
                                 name="Pareto front" if front else "other",
                                 marker=dict(color=color, size=10 if front else 7),
                                 text=[f"#{p['number']} {p['summary']}" for p in pts]))
    return _layout(fig, height=380, title="Pareto front", xaxis_title=names[1], yaxis_title=names[0])


def layer_preference(pref: dict) -> go.Figure:
    rows = pref["rows"]
    fig = make_subplots(rows=2, cols=1, row_heights=[0.75, 0.25], shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("experts per layer of the best trials (best on top)",
                                        "correlation of a layer's experts with the score"))
    fig.add_trace(go.Heatmap(z=[r["experts"] for r in rows], x=[f"L{j}" for j in pref["layers"]],
                             y=[f"#{r['number']} {r['objective']:.3f}" for r in rows], colorscale="Blues",
                             text=[r["experts"] for r in rows], texttemplate="%{text}", showscale=False,
                             xgap=2, ygap=2), 1, 1)
    corr = [c if c is not None else 0.0 for c in pref["correlation"]]
    fig.add_trace(go.Bar(x=[f"L{j}" for j in pref["layers"]], y=corr,
                         marker_color=["#2e7d32" if c > 0 else "#c62828" for c in corr]), 2, 1)
    fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
    fig.update_yaxes(range=[-1, 1], row=2, col=1)
    return _layout(fig, height=max(360, 24 * len(rows) + 240), showlegend=False,
                   title="Which layers want experts")
