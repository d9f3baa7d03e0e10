"""Compare 2-4 trials side by side: allocations, learning curves, checkpoints, per-task scores, cost."""
import streamlit as st

import dash_charts as charts
import dashkit as dk
from allocsearch.reports.trial import COST_KEYS

st.title("Compare trials")


def body() -> None:
    summary = dk.require_summary()
    if summary is None or not summary["trials"]:
        return
    by = {t["number"]: t for t in summary["trials"]}
    numbers = list(by)
    ranked = sorted((t for t in summary["trials"] if t["objective"] is not None), key=lambda t: -t["objective"])
    if not all(n in numbers for n in st.session_state.get("compare", [])):
        st.session_state.pop("compare", None)
    if "compare" not in st.session_state:
        st.session_state["compare"] = [t["number"] for t in ranked[:3]] or numbers[:2]
    picked = st.multiselect("Trials (2 to 4)", numbers, key="compare", max_selections=4,
                            format_func=lambda n: dk.trial_label(by[n]))
    if len(picked) < 2:
        st.info("pick at least 2 trials to compare")
        return
    details = [dk.trial_detail(summary, n) for n in picked]
    cols = st.columns(len(details))
    for col, d in zip(cols, details):
        row = d["row"] or {}
        with col:
            st.markdown(f"**#{d['number']}** {row.get('state', '?')}"
                        + (f" · **{row['objective']:.4f}**" if row.get("objective") is not None else ""))
            st.caption(row.get("summary") or "")
            if d["allocation"]:
                st.plotly_chart(charts.allocation(d["allocation"], title=f"#{d['number']}"), key=f"alloc_{d['number']}")
            else:
                st.caption("no allocation recorded")
            for note in d["notes"]:
                st.caption(note)
    named = {f"#{d['number']}": d for d in details}
    allocs = {k: d["allocation"] for k, d in named.items() if d["allocation"]}
    if allocs:
        st.plotly_chart(charts.allocations(allocs), key="allocations")
    c1, c2 = st.columns(2)
    curves = {k: d["losses"] for k, d in named.items() if d["losses"]}
    if curves:
        c1.plotly_chart(charts.losses(curves), key="cmp_losses")
    cps = {k: d["checkpoints"] for k, d in named.items() if d["checkpoints"]}
    if cps:
        c2.plotly_chart(charts.checkpoints(cps), key="cmp_checkpoints")
    sc = {k: d["scores"] for k, d in named.items() if d["scores"]}
    if sc:
        splits = sorted({r["split"] for rows in sc.values() for r in rows}, key=lambda s: s != "validation")
        split = st.radio("Scores on", splits, horizontal=True, key="cmp_split")
        st.plotly_chart(charts.scores(sc, split), key="cmp_scores")
    st.markdown("**Cost and size**")
    keys = [k for k in COST_KEYS if any(k in d["cost"] for d in details)] + ["ledger_device_seconds"]
    st.dataframe([{"measure": k, **{name: _cell(d["cost"].get(k)) for name, d in named.items()}} for k in keys],
                 hide_index=True)


def _cell(v):
    if isinstance(v, float):
        return f"{v:,.2f}"
    return "" if v is None else str(v)


dk.live(body)
