"""Trials: every trial of the selected study in one table, filtered by method, state, score and
parameters, sortable by any column; pick one to open it."""
import pandas as pd
import streamlit as st

import dashkit as dk
from allocsearch.reports import status as analysis
st.title("Trials")


def body() -> None:
    summary = dk.require_summary()
    if summary is None or not summary["trials"]:
        return
    df = pd.DataFrame(analysis.trials_table(summary["trials"], summary["objectives"]))
    f = st.columns([2, 2, 2, 3])
    methods = sorted(m for m in df["method"].dropna().unique())
    pick_methods = f[0].multiselect("Method", methods, key="f_method", placeholder="all")
    states = [s for s in analysis.STATE_ORDER if s in set(df["state"])]
    pick_states = f[1].multiselect("State", states, key="f_state", placeholder="all")
    scored = df["objective"].dropna()
    low = float(scored.min()) if len(scored) else 0.0
    high = float(scored.max()) if len(scored) else 1.0
    min_score = f[2].number_input("Score at least", value=None, min_value=None, step=0.01, key="f_score",
                                  placeholder=f"{low:.3f} … {high:.3f}")
    text = f[3].text_input("Parameters / summary contain", key="f_text", placeholder="e.g. hourglass or r8")
    view = df
    if pick_methods:
        view = view[view["method"].isin(pick_methods)]
    if pick_states:
        view = view[view["state"].isin(pick_states)]
    if min_score is not None:
        view = view[view["objective"].fillna(-1e300) >= min_score]
    if text:
        needle = text.lower()
        cells = view.drop(columns=["start", "end"]).map(lambda v: "" if v is None or v != v else str(v))
        blob = cells.agg(" ".join, axis=1).str.lower()
        view = view[blob.str.contains(needle, regex=False)]
    s = st.columns([2, 1, 3])
    sort_by = s[0].selectbox("Sort by", list(view.columns), index=list(view.columns).index("objective"), key="f_sort")
    descending = s[1].toggle("Descending", value=True, key="f_desc")
    view = view.sort_values(sort_by, ascending=not descending, na_position="last", kind="stable")
    s[2].caption(f"{len(view)} of {len(df)} trials · click a column header to sort, a row to select it")
    first = [c for c in ("number", "state", "method", "objective", "seed", "confirms", "experts", "device_seconds",
                         "steps", "trainable_params", "summary") if c in view.columns]
    view = view[first + [c for c in view.columns if c not in first]]
    event = st.dataframe(view, hide_index=True, height=min(640, 35 * len(view) + 40), on_select="rerun",
                         selection_mode="single-row", key="trials_table",
                         column_config={
                             "objective": st.column_config.NumberColumn(format="%.4f"),
                             "confirms": st.column_config.NumberColumn(
                                 "confirms", format="#%d", help="a confirmation run: the trial whose configuration "
                                 "it re-runs on a fresh seed"),
                             "device_seconds": st.column_config.NumberColumn("device-s", format="%.0f"),
                             "trainable_params": st.column_config.NumberColumn("trainable", format="%d"),
                             "summary": st.column_config.TextColumn(width="large")})
    picked = list(event.selection.rows) if event is not None and hasattr(event, "selection") else []
    numbers = [int(n) for n in view["number"]]
    if not numbers:
        st.info("no trial matches the filters")
        return
    if picked and picked[0] < len(numbers) and picked != st.session_state.get("_rows_picked"):
        st.session_state["open_pick"] = st.session_state["trial"] = numbers[picked[0]]  # a new row click
    st.session_state["_rows_picked"] = picked
    if st.session_state.get("open_pick") not in numbers:
        current = st.session_state.get("trial")
        st.session_state["open_pick"] = current if current in numbers else numbers[0]
    by = {t["number"]: t for t in summary["trials"]}
    o = st.columns([4, 1])
    choice = o[0].selectbox("Open a trial", numbers, key="open_pick", format_func=lambda n: dk.trial_label(by[n]))
    o[1].markdown("&nbsp;")
    if o[1].button(f"Open trial {choice}", type="primary", key="open_trial"):
        dk.open_trial(choice)


dk.live(body)
