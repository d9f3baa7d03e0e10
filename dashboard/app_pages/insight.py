"""Search insight: parameter importance, parallel coordinates, slices, the Pareto front and the
allocation map (score by MoLA shape x experts per layer; which layers the best trials give experts)."""
import streamlit as st

import dash_charts as charts
import dashkit as dk
from allocsearch.reports import insight
st.title("Search insight")


def body() -> None:
    summary = dk.require_summary()
    if summary is None or not summary["trials"]:
        return
    trials = summary["trials"]
    n_done = len(insight.scored(trials))
    f = st.columns([2, 3])
    methods = insight.methods_of(trials)
    method = f[0].selectbox("Trials of", [None] + methods, key="in_method",
                            format_func=lambda m: "all methods" if m is None else m)
    if "in_pruned" not in st.session_state:
        st.session_state["in_pruned"] = n_done < 5
    pruned = f[1].toggle("Include pruned trials (scored at their last checkpoint)", key="in_pruned")
    rows = insight.scored(trials, method=method, pruned=pruned)
    st.caption(f"{len(rows)} trial(s) with a score" + (f" ({n_done} completed in the study)" if pruned else ""))

    st.subheader("Parameter importance")
    imp = dk.param_importance(method, pruned)
    if imp["message"]:
        st.info(imp["message"] + ("" if pruned else "; turn on ‘Include pruned trials’ to use more of them"))
    else:
        st.plotly_chart(charts.importance(imp["importances"]), key="importance")
        st.caption(f"{imp['evaluator']} over {imp['n']} trials, first objective"
                   + ("" if method else "; pick a method to see its own parameters"))

    st.subheader("Parallel coordinates and slices")
    if len(rows) < 2:
        st.info("needs at least 2 scored trials")
    else:
        st.plotly_chart(charts.parallel(insight.parallel_dims(rows)), key="parallel")
        cols = [c for c in insight.param_columns(rows) if len(c["values"]) > 1 or c["name"] == "method"]
        if cols:
            points = {c["name"]: insight.slice_points(rows, c["name"]) for c in cols}
            st.plotly_chart(charts.slices(cols, points), key="slices")

    pareto = insight.pareto_points(summary)
    if pareto:
        st.subheader("Pareto front")
        if pareto["points"]:
            st.plotly_chart(charts.pareto(pareto), key="pareto")
        else:
            st.info("no completed trial yet")

    st.subheader("Allocation map")
    amap = insight.allocation_map(rows, pruned=pruned)
    if amap:
        which = st.radio("Cell value", ["best", "mean", "count"], horizontal=True, key="in_cell")
        st.plotly_chart(charts.heatmap(amap[which], amap["sizes"], amap["shapes"],
                                       f"{which} score by {amap['shape_param']} x {amap['size_param']}",
                                       amap["size_param"], amap["shape_param"], colorscale="Viridis",
                                       text_fmt="d" if which == "count" else ".3f"), key="allocation_map")
    else:
        st.caption("this space has no MoLA shape parameters (`<method>.shape` x `<method>.per_layer`)")
    pref = insight.layer_preference(rows, pruned=pruned)
    if pref:
        st.plotly_chart(charts.layer_preference(pref), key="layer_pref")
    else:
        st.caption("no scored trial recorded its experts per layer")


dk.live(body)
