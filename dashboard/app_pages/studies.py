"""Studies: every study's budget, and the selected one's burn-down, trials by state, anytime curve and
what is running now."""
import streamlit as st

import dash_charts as charts
import dashkit as dk
from allocsearch.reports import status as analysis
from allocsearch.cli.search_view import sparkline

st.title("Studies")


def overview() -> None:
    names = dk.study_names()
    if not names:
        dk.require_summary()
        return
    rows = []
    for name in names:
        state = dk.study_state(name)
        s = state["summary"]
        b = s["budget"] if s else None
        rows.append({"study": name, "status": ("running" if s and s["controller_pid"] else
                                               {"ok": "finished / idle"}.get(state["status"], state["status"])),
                     "budget": b["text"] if b else None, "spent": b["spent_text"] if b else None,
                     "used": min(1.0, b["fraction"] or 0.0) if b else None,
                     "trials": len(s["trials"]) if s else None,
                     "best": s["best"]["value"] if s and s["best"] else None,
                     "seeds": s["best"]["n"] if s and s["best"] else None,
                     "model": s["model"] if s else None, "problem": state["message"] or ""})
    st.dataframe(rows, hide_index=True, column_config={
        "used": st.column_config.ProgressColumn("budget used", min_value=0.0, max_value=1.0, format="percent"),
        "best": st.column_config.NumberColumn(format="%.4f")})


def selected() -> None:
    summary = dk.require_summary()
    if summary is None:
        return
    b, c = summary["budget"], summary["counts"]
    st.subheader(f"{summary['study']}  ·  {summary['model']}  ·  {', '.join(summary['objectives'])}")
    cols = st.columns(4)
    cols[0].metric("Budget spent", b["spent_text"], f"of {b['text']} ({100 * (b['fraction'] or 0):.0f}%)",
                   delta_color="off", delta_arrow="off")
    cols[1].metric("Trials", len(summary["trials"]),
                   " · ".join(f"{n} {k.replace('_', ' ')}" for k, n in c.items() if n) or "none yet",
                   delta_color="off", delta_arrow="off")
    best = summary["best"]
    cols[2].metric("Best objective", f"{best['value']:.4f}" if best else "–",
                   (f"trial {best['trial']}, mean of {best['n']} seeds" if best["n"] > 1 else
                    f"trial {best['trial']}, 1 seed") if best else None, delta_color="off", delta_arrow="off")
    cols[3].metric("Controller", "running" if summary["controller_pid"] else "not running",
                   f"pid {summary['controller_pid']}" if summary["controller_pid"] else None,
                   delta_color="off", delta_arrow="off")
    st.progress(min(1.0, b["fraction"] or 0.0), text=f"{b['spent_text']} of {b['text']}"
                + (f", overshoot {b['overshoot']:.0f} s" if b["overshoot"] > 0 else ""))
    left, right = st.columns([2, 1])
    timeline = dk.spend_timeline(summary)
    if timeline["points"]:
        left.plotly_chart(charts.burn_down(timeline, lambda s: dk.fmt_seconds(summary, s)), key="burn_down")
        source = "the ledger (the budget's own record)" if timeline["source"] == "ledger" else "trial end times"
        left.caption(f"from {source}")
    else:
        left.info("no spend recorded yet")
    if summary["trials"]:
        right.plotly_chart(charts.states(c), key="states")
    points = analysis.anytime_curve(analysis.records_in(summary), summary.get("declared_noise"))
    if any(p["objective"] is not None for p in points):
        st.plotly_chart(charts.anytime(points), key="anytime")
    st.subheader("Running now")
    now = analysis.running_now(summary)
    if now:
        st.dataframe([{**r, "spend": dk.fmt_seconds(summary, r["spend"]),
                       "predicted": dk.fmt_seconds(summary, r["predicted"])} for r in now], hide_index=True)
    else:
        st.caption("nothing running" + ("" if summary["controller_pid"] else " (no controller holds the study)"))
    if best:
        st.subheader("Best trial")
        seeds = f" (mean of {best['n']} seeds: trials {', '.join(map(str, best['trials']))})" if best["n"] > 1 else ""
        st.markdown(f"**#{best['trial']}** {best['value']:.4f}{seeds} — {best['summary']}")
        if best.get("experts"):
            st.markdown(f"experts per layer `{sparkline(best['experts'])}` {best['experts']}")
        cheap = summary.get("cheapest")
        if cheap and cheap["trial"] != best["trial"]:
            size = (f", {cheap['trainable_params']:,} trainable parameters against {best['trainable_params']:,}"
                    if cheap.get("trainable_params") and best.get("trainable_params") else "")
            st.caption(f"the cheapest configuration tied with it: #{cheap['trial']} {cheap['value']:.4f} (n="
                       f"{cheap['n']}) — {cheap['summary']}{size} (`export --best --prefer cheapest`)")
        if st.button(f"Open trial {best['trial']}", key="open_best"):
            dk.open_trial(best["trial"])
    rows = analysis.finalists_table(summary)
    if rows and max(r["n"] for r in rows) > 1:
        ev = summary["evidence"]
        st.subheader("How sure is the winner?")
        st.plotly_chart(charts.finalists(rows), key="finalists")
        noise = f"seed noise (std) {ev['noise']:.4f}" if ev["noise"] is not None else "no seed noise measured yet"
        tied = len(ev["tied"])
        st.caption(f"{noise}; {tied} configuration{'s' if tied != 1 else ''} statistically tied with the winner"
                   if tied else f"{noise}; the winner is separated from every other configuration")
        st.dataframe([{**r, "seeds": ", ".join(map(str, r["seeds"])), "trials": ", ".join(map(str, r["trials"]))}
                      for r in rows], hide_index=True, column_config={
            "mean": st.column_config.NumberColumn(format="%.4f"), "ci95": st.column_config.NumberColumn(
                "95% CI +-", format="%.4f")})
    if summary.get("pareto"):
        st.subheader("Pareto front")
        st.dataframe([{"trial": t["number"], **dict(zip(analysis.objective_names(summary["objectives"]), t["values"])),
                       "summary": t["summary"]} for t in summary["pareto"]], hide_index=True)


def body() -> None:
    overview()
    if dk.current_study():
        st.divider()
        selected()


dk.live(body)
