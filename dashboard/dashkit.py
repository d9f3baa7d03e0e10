"""What every dashboard page shares: the workdir and the selected study / trial, cached reads through
``allocsearch.reports.status*`` (keyed by the files' sizes and mtimes, so a running search shows up on the next
run), the sidebar (study picker, refresh, auto-refresh) and one-line problem messages. UI only: every
read of a study goes through the package's read-only queries."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from allocsearch.reports import status as analysis

from allocsearch.reports import insight as analysis_insight

from allocsearch.reports import trial as analysis_trial
DEFAULT_WORKDIR = "allocsearch-runs"
REFRESH_SECONDS = 5
PAGES = {"studies": "app_pages/studies.py", "trials": "app_pages/trials.py", "trial": "app_pages/trial.py",
         "compare": "app_pages/compare.py", "insight": "app_pages/insight.py"}


# ------------------------------------------------------------------------------------------ selection
def _argv_workdir() -> str | None:
    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a == "--workdir" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
    return None


def workdir() -> Path:
    """``--workdir`` after ``--`` on the streamlit command line, else $ALLOCSEARCH_WORKDIR, else the
    default; kept in the session (tests set ``session_state["workdir"]``)."""
    if "workdir" not in st.session_state:
        st.session_state["workdir"] = _argv_workdir() or os.environ.get("ALLOCSEARCH_WORKDIR") or DEFAULT_WORKDIR
    return Path(st.session_state["workdir"]).expanduser()


def study_names() -> list[str]:
    return analysis.study_dirs(workdir())


def current_study() -> str | None:
    return st.session_state.get("study")


def study_root(name: str | None = None) -> Path:
    return workdir() / (name or current_study() or "")


def open_trial(number: int) -> None:
    """Select ``number`` and go to the trial page."""
    st.session_state["trial"] = int(number)
    st.query_params["trial"] = str(int(number))
    st.switch_page(PAGES["trial"])


# ------------------------------------------------------------------------------------------ cached reads
@st.cache_data(show_spinner=False, max_entries=64)
def _inspect(root: str, signature: tuple) -> dict:
    return analysis.inspect_study(root)


def study_state(name: str | None = None) -> dict[str, Any]:
    """``analysis.inspect_study`` of a study (the selected one by default), re-read when its files change;
    the controller's pid is checked on every call (a dead controller changes no file)."""
    name = name or current_study()
    if not name:
        return {"status": "missing", "message": "no study selected", "summary": None}
    root = study_root(name)
    state = dict(_inspect(str(root), analysis.study_signature(root)))
    if state.get("summary"):
        state["summary"] = {**state["summary"], "controller_pid": analysis.controller_pid(root)}
    return state


@st.cache_data(show_spinner=False, max_entries=64)
def _detail(root: str, number: int, signature: tuple, trial_sig: tuple, _summary: dict) -> dict:
    return analysis_trial.trial_detail(root, number, summary=_summary)


def trial_detail(summary: dict, number: int) -> dict:
    root = study_root()
    return _detail(str(root), int(number), analysis.study_signature(root),
                   analysis_trial.trial_signature(root, number), summary)


@st.cache_data(show_spinner=False, max_entries=32)
def _timeline(root: str, signature: tuple, _summary: dict) -> dict:
    return analysis.spend_timeline(root, _summary)


def spend_timeline(summary: dict) -> dict:
    root = study_root()
    return _timeline(str(root), analysis.study_signature(root), summary)


@st.cache_data(show_spinner=False, max_entries=32)
def _importance(root: str, signature: tuple, method: str | None, pruned: bool) -> dict:
    return analysis_insight.param_importance(root, method=method, pruned=pruned)


def param_importance(method: str | None, pruned: bool) -> dict:
    root = study_root()
    return _importance(str(root), analysis.study_signature(root), method, pruned)


def export_text(number: int) -> tuple[str | None, str | None]:
    """(YAML text of ``allocsearch export`` for the trial, None) or (None, why there is none)."""
    from allocsearch.reports.export import export_trial

    try:
        return export_trial(study_root(), int(number)), None
    except Exception as exc:  # noqa: BLE001 - shown as a note under a disabled button
        return None, f"cannot export trial {number}: {(str(exc).splitlines() or [''])[0][:200]}"


# ------------------------------------------------------------------------------------------ layout
def sidebar() -> None:
    """Study picker (kept in the URL's ?study=), refresh button and auto-refresh toggle."""
    names = study_names()
    with st.sidebar:
        st.caption(f"workdir `{workdir()}`")
        if not names:
            st.session_state.pop("study", None)
            return
        wanted = st.query_params.get("study")
        if st.session_state.get("study") not in names:
            st.session_state["study"] = wanted if wanted in names else names[0]
        # the widgets' own state does not survive a page switch: plain keys hold the choices
        st.session_state["_study_pick"] = st.session_state["study"]
        name = st.selectbox("Study", names, key="_study_pick", on_change=_copy, args=("_study_pick", "study"))
        if st.query_params.get("study") != name:
            st.query_params["study"] = name
        if "trial" not in st.session_state and str(st.query_params.get("trial", "")).isdigit():
            st.session_state["trial"] = int(st.query_params["trial"])
        cols = st.columns(2)
        if cols[0].button("Refresh", icon=":material/refresh:", help="Re-read the study folder now"):
            st.cache_data.clear()
            st.rerun()
        running = analysis.controller_pid(study_root(name)) is not None
        if "auto_refresh" not in st.session_state:
            st.session_state["auto_refresh"] = running
        st.session_state["_live_pick"] = st.session_state["auto_refresh"]
        cols[1].toggle("Live", key="_live_pick", on_change=_copy, args=("_live_pick", "auto_refresh"),
                       help=f"Re-read every {REFRESH_SECONDS} s (on by default while a search is running)")
        st.caption("search running" if running else "no search running")


def live(body: Callable[[], None]) -> None:
    """Run a page body, inside a fragment that re-runs every few seconds when auto-refresh is on; any
    error becomes one line, never a traceback."""
    guarded = _guard(body)
    if st.session_state.get("auto_refresh"):
        st.fragment(run_every=REFRESH_SECONDS)(guarded)()
    else:
        guarded()


def _guard(body: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - one line for any study, however broken
            if type(exc).__module__.startswith("streamlit"):  # rerun / switch_page / stop control flow
                raise
            st.error(f"this page could not be drawn: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
    run.__name__ = run.__qualname__ = f"live_{getattr(body, '__name__', 'page')}"
    return run


def require_summary() -> dict | None:
    """The selected study's summary, or None after showing why there is none."""
    names = study_names()
    if not names:
        st.info(f"No study in `{workdir()}` yet. Start one with `allocsearch start --budget 0.25cpu-h --space demo "
                f"--workdir {workdir()}`, or open another folder with `allocsearch dashboard --workdir DIR`.")
        return None
    state = study_state()
    show_problem(state)
    return state["summary"]


def show_problem(state: dict) -> None:
    """The study's problem, if any, as one message (info for a study with no trial yet)."""
    if state["status"] == "empty":
        st.info(state["message"] + ". Trials appear here as the search runs (turn on Live in the sidebar).")
    elif state["status"] == "half_written":
        st.warning(state["message"])
    elif state["status"] in ("corrupt", "missing"):
        st.error(state["message"])


def pick_trial(summary: dict, label: str = "Trial") -> int | None:
    """A trial picker defaulting to the selected trial (kept across pages), else the best, else the latest."""
    numbers = [t["number"] for t in summary["trials"]]
    if not numbers:
        return None
    if st.session_state.get("trial") not in numbers:
        best = summary.get("best")
        st.session_state["trial"] = best["trial"] if best else numbers[-1]
    by = {t["number"]: t for t in summary["trials"]}
    st.session_state["_trial_pick"] = st.session_state["trial"]  # widget state is dropped on other pages
    number = st.selectbox(label, numbers, key="_trial_pick", format_func=lambda n: trial_label(by[n]),
                          on_change=_copy, args=("_trial_pick", "trial"))
    if st.query_params.get("trial") != str(number):
        st.query_params["trial"] = str(number)
    return number


def _copy(src: str, dst: str) -> None:
    st.session_state[dst] = st.session_state[src]


def trial_label(t: dict) -> str:
    score = f" {t['objective']:.4f}" if t["objective"] is not None else ""
    run = f" · confirms #{t['confirm_of']}, seed {t['seed']}" if t.get("confirm_of") is not None else ""
    return f"#{t['number']} {t['state']}{score}{run} · {t['summary'] or 'no configuration'}"


def fmt_seconds(summary: dict, seconds: float | None) -> str:
    """Device-seconds in the study's budget unit (3.2 cpu-min ...)."""
    if seconds is None:
        return "–"
    from allocsearch.search.budget import Budget

    b = summary["budget"]
    return Budget(unit=b["unit"], seconds=b["total"], text=b["text"]).format(seconds)
