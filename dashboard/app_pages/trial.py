"""One trial: its per-layer allocation drawn as its shape, learning curve and checkpoints, expert load
per layer, redundancy, per-task scores, cost, its config and the export file."""
import streamlit as st

import dash_charts as charts
import dashkit as dk
from allocsearch.study.records import State

st.title("Trial")


def body() -> None:
    summary = dk.require_summary()
    if summary is None:
        return
    if not summary["trials"]:
        return
    number = dk.pick_trial(summary)
    d = dk.trial_detail(summary, number)
    row, result = d["row"] or {}, d["result"] or {}
    st.subheader(f"Trial {number} · {row.get('state', '?')}"
                 + (f" · {row['objective']:.4f}" if row.get("objective") is not None else ""))
    st.caption(row.get("summary") or "")
    if row.get("reason"):
        (st.error if row.get("state") in State.ENDED_BADLY else st.info)(f"reason: {row['reason']}")
    for note in d["notes"]:
        st.info(note)
    m = st.columns(5)
    m[0].metric("Objective", f"{row['objective']:.4f}" if row.get("objective") is not None else "–")
    m[1].metric("Device time", dk.fmt_seconds(summary, row.get("spend")))
    params = result.get("trainable_params") or row.get("trainable_params")
    m[2].metric("Trainable params", f"{params:,}" if params else "–")
    mem = result.get("peak_memory_mb")
    m[3].metric("Peak memory", f"{mem:,.0f} MB" if mem else "–")
    m[4].metric("Steps", row.get("steps") or result.get("steps") or "–")

    alloc = d["allocation"]
    left, right = st.columns([3, 2])
    with left:
        if alloc:
            st.plotly_chart(charts.allocation(alloc), key="allocation")
        else:
            st.info("no allocation recorded for this trial")
    with right:
        export(summary, number)
        if alloc:
            opts = ", ".join(f"{k} {v}" for k, v in alloc["options"].items())
            st.caption(f"method **{alloc['method']}** · targets {', '.join(alloc['targets'] or []) or 'default'}"
                       + (f" · {opts}" if opts else ""))
            st.dataframe(alloc["layers"], hide_index=True, height=min(400, 35 * len(alloc["layers"]) + 40))

    c1, c2 = st.columns(2)
    if d["losses"]:
        c1.plotly_chart(charts.losses({f"#{number}": d["losses"]}), key="losses")
    else:
        c1.caption("no training losses recorded")
    if d["checkpoints"]:
        c2.plotly_chart(charts.checkpoints({f"#{number}": d["checkpoints"]}), key="checkpoints")
    else:
        c2.caption("no validation checkpoints recorded")

    load = d["load"]
    c1, c2 = st.columns(2)
    with c1:
        if load:
            options = [None] + load["targets"]
            target = st.selectbox("Expert load of", options, key="load_target",
                                  format_func=lambda t: "mean over targets" if t is None else t)
            st.plotly_chart(charts.expert_load(load, target), key="expert_load")
            st.caption("fraction of the validation tokens each expert was routed (rows: layers, input side at the "
                       "bottom); an even row is a balanced router")
        else:
            st.caption("no expert load recorded (dense or LoRA trials route nothing, running trials have none yet)")
    with c2:
        if d["redundancy"]:
            st.plotly_chart(charts.redundancy(d["redundancy"]), key="redundancy")
            st.caption("mean ||B_i A_i - B_j A_j|| between a layer's experts: low means its experts learnt alike")
        else:
            st.caption("no redundancy recorded")

    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Scores per task**")
        if d["scores"]:
            st.dataframe(d["scores"], hide_index=True, column_config={
                "accuracy": st.column_config.NumberColumn(format="%.4f"),
                "balanced_accuracy": st.column_config.NumberColumn(format="%.4f")})
        else:
            st.caption("no final evaluation")
        st.markdown("**Cost**")
        st.dataframe([{"measure": k.replace("_", " "), "value": _fmt(v)} for k, v in d["cost"].items()],
                     hide_index=True)
    with c2:
        st.markdown("**Config** (`trial.yaml`)")
        if d["config_text"]:
            st.code(d["config_text"], language="yaml", height=520)
        else:
            st.caption("no trial.yaml")
        if row.get("params"):
            with st.expander("Sampled parameters"):
                st.json(row["params"])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def export(summary: dict, number: int) -> None:
    st.markdown("**Export**")
    text, why = dk.export_text(number)
    name = f"{summary['study']}-trial-{number:04d}.yaml"
    st.download_button("Export trial config", data=text or "", file_name=name, mime="application/x-yaml",
                       disabled=text is None, key="export", icon=":material/download:", on_click="ignore",
                       help="The file `allocsearch export --trial N` writes: `allocsearch train --config` reads it")
    if why:
        st.caption(why)
    else:
        st.caption(f"`{name}` · same as `allocsearch export --study {summary['study']} --trial {number} --out {name}`")


dk.live(body)
