"""The dashboard's pages under Streamlit's AppTest (no browser, no server) on fixture studies built by
driving the controller by hand: every page draws on a healthy study without an exception, and every
broken kind of study shows its message instead of a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")
from dashboard_fixtures import shared_workdir  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "dashboard" / "streamlit_app.py"
PAGES = ["app_pages/studies.py", "app_pages/trials.py", "app_pages/trial.py", "app_pages/compare.py",
         "app_pages/insight.py"]
TIMEOUT = 60


@pytest.fixture(scope="module")
def wd(tmp_path_factory) -> Path:
    return shared_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def numbers(wd) -> dict:
    from allocsearch.reports.status import summarize

    out: dict[str, list[int]] = {}
    for t in summarize(wd / "demo")["trials"]:
        out.setdefault(t["state"], []).append(t["number"])
    return out


def open_app(workdir: Path, study: str | None = "demo", page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["workdir"] = str(workdir)
    if study:
        at.session_state["study"] = study
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page:
        at.switch_page(page).run()
    return at


def clean(at: AppTest) -> AppTest:
    """No exception and no page-level error box."""
    assert not at.exception, [e.value for e in at.exception]
    assert not [e.value for e in at.error if "could not be drawn" in e.value]
    return at


def charts(at: AppTest) -> list[str]:
    """The titles of the plotly charts on the page (subplot titles count as well)."""
    out = []
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        title = (spec["layout"].get("title") or {}).get("text", "")
        subs = [a.get("text", "") for a in spec["layout"].get("annotations", [])]
        out.append(" | ".join([title] + subs))
    return out


def shown(at: AppTest) -> str:
    parts = []
    for kind in ("title", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(e.value) for e in at.get(kind)]
    return "\n".join(parts)


def test_studies_page_shows_budget_burn_down_states_anytime_and_running(wd, numbers):
    at = clean(open_app(wd))
    assert at.title[0].value == "Studies"
    overview = at.dataframe[0].value
    assert set(overview["study"]) == {"badjson", "demo", "empty", "garbagedb", "half", "jsononly", "multi", "nodb"}
    problems = dict(zip(overview["study"], overview["problem"]))
    assert "not an sqlite database" in problems["garbagedb"] and problems["demo"] == ""
    assert [m.label for m in at.metric] == ["Budget spent", "Trials", "Best objective", "Controller"]
    assert at.metric[2].value == "0.8200"
    titles = charts(at)
    assert any("burn-down" in t for t in titles) and any("by state" in t for t in titles)
    assert any("anytime" in t for t in titles)
    running = at.dataframe[1].value
    assert list(running["number"]) == numbers["running"] and running["last_step"][0] == 2
    at.button(key="open_best").click().run()  # opens the best trial
    clean(at)
    assert at.title[0].value == "Trial" and at.subheader[0].value.startswith("Trial 3 · completed")


def test_trials_table_filters_sorts_and_opens_a_trial(wd, numbers):
    at = clean(open_app(wd, page="app_pages/trials.py"))
    table = at.dataframe[0].value
    assert len(table) == 9 and list(table.columns[:4]) == ["number", "state", "method", "objective"]
    assert table["objective"].iloc[0] == pytest.approx(0.82)  # sorted by objective, best first
    assert {"mola.shape", "mola.per_layer", "lr"} <= set(table.columns)
    at.multiselect(key="f_state").select("completed").run()
    assert len(clean(at).dataframe[0].value) == 6
    at.multiselect(key="f_method").select("lora").run()
    assert list(clean(at).dataframe[0].value["method"]) == ["lora"]
    at.multiselect(key="f_method").unselect("lora").run()
    at.multiselect(key="f_state").unselect("completed").run()
    at.text_input(key="f_text").input("triangle").run()
    assert set(clean(at).dataframe[0].value["mola.shape"]) <= {"triangle", "inverted_triangle"}
    at.text_input(key="f_text").input("").run()
    at.number_input(key="f_score").set_value(0.7).run()
    assert (clean(at).dataframe[0].value["objective"] >= 0.7).all()
    at.selectbox(key="f_sort").select("number").run()
    at.toggle(key="f_desc").set_value(False).run()
    ordered = list(clean(at).dataframe[0].value["number"])
    assert ordered == sorted(ordered)
    at.selectbox(key="open_pick").select(ordered[0]).run()
    at.button(key="open_trial").click().run()
    assert clean(at).subheader[0].value.startswith(f"Trial {ordered[0]} ")


@pytest.mark.parametrize("state", ["completed", "pruned", "failed", "running"])
def test_trial_page_for_every_state(wd, numbers, state):
    n = numbers[state][0]
    at = clean(open_app(wd, page="app_pages/trial.py", trial=n))
    assert at.subheader[0].value.startswith(f"Trial {n} · {state}")
    titles = charts(at)
    assert any(t.startswith("Allocation (mola)") and "experts" in t for t in titles)
    text = shown(at)
    if state in ("completed", "pruned"):
        assert any("Learning curve" in t for t in titles) and any("checkpoints" in t for t in titles)
        assert any(t.startswith("Expert load") for t in titles) and any("Redundancy" in t for t in titles)
        assert [m.label for m in at.metric][:2] == ["Objective", "Device time"]
    if state == "completed":
        scores = at.dataframe[1].value
        assert {"sst2", "rte", "macro"} <= set(scores["task"])
        assert "peak memory mb" in set(at.dataframe[2].value["measure"])
    if state == "failed":
        assert "loss became nan" in text and "no results.json" in text
    if state == "running":
        assert "the trial is running" in text
    assert any(f"name: trial-{n:04d}" in c.value for c in at.code)  # trial.yaml


def test_trial_page_load_target_and_export(wd, numbers):
    n = numbers["completed"][0]
    at = clean(open_app(wd, page="app_pages/trial.py", trial=n))
    at.selectbox(key="load_target").select("v_proj").run()
    assert any(t.startswith("Expert load (v_proj)") for t in charts(clean(at)))
    button = at.get("download_button")[0]
    assert not button.proto.disabled and f"demo-trial-{n:04d}.yaml" in shown(at)
    # picking another trial in the page's own picker
    other = numbers["completed"][1]
    at.selectbox(key="_trial_pick").select(other).run()
    assert clean(at).subheader[0].value.startswith(f"Trial {other} ")


def test_compare_page(wd, numbers):
    at = clean(open_app(wd, page="app_pages/compare.py"))
    assert len(at.multiselect(key="compare").value) == 3  # the three best by default
    titles = charts(at)
    assert sum(t.startswith("#") for t in titles) == 3  # one allocation per trial, side by side
    assert any(t.startswith("Experts per layer") for t in titles) and any("Learning curve" in t for t in titles)
    assert any("Per-task scores" in t for t in titles)
    at.radio(key="cmp_split").set_value("test").run()
    assert any("(test," in t for t in charts(clean(at)))
    at.multiselect(key="compare").set_value([numbers["completed"][0]]).run()
    assert "pick at least 2 trials" in shown(clean(at))
    at.multiselect(key="compare").set_value([numbers["completed"][0], numbers["failed"][0]]).run()
    assert "no results.json" in shown(clean(at))


def test_insight_page(wd):
    at = clean(open_app(wd, page="app_pages/insight.py"))
    titles = charts(at)
    assert any("share of" in json.dumps(json.loads(el.proto.spec)["layout"]) for el in at.get("plotly_chart"))
    assert any("Parallel coordinates" in t for t in titles) and any(t.startswith("Slices") for t in titles)
    assert any("mola.shape x mola.per_layer" in t for t in titles)
    assert any("Which layers want experts" in t for t in titles)
    assert "Pareto front" not in [s.value for s in at.subheader]
    at.selectbox(key="in_method").select("lora").run()
    assert "at least 3" in shown(clean(at))
    at.selectbox(key="in_method").select("mola").run()
    at.radio(key="in_cell").set_value("count").run()
    assert any(t.startswith("count score") for t in charts(clean(at)))
    multi = clean(open_app(wd, study="multi", page="app_pages/insight.py"))
    assert "Pareto front" in [s.value for s in multi.subheader]
    assert any("Pareto front" in t for t in charts(multi))


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("study,words", [("empty", "no trial yet"), ("half", "half-written"),
                                         ("jsononly", "only study.json"), ("badjson", "is corrupt"),
                                         ("nodb", "database"), ("garbagedb", "not an sqlite database")])
def test_broken_studies_show_a_message_on_every_page(wd, page, study, words):
    at = clean(open_app(wd, study=study, page=None if page.endswith("studies.py") else page))
    messages = [e.value for e in (*at.info, *at.warning, *at.error)]
    assert any(words in m and study in m for m in messages), messages


@pytest.mark.parametrize("page", PAGES)
def test_a_workdir_without_studies(tmp_path, page):
    at = clean(open_app(tmp_path / "none", study=None, page=None if page.endswith("studies.py") else page))
    assert "No study in" in at.info[0].value


def test_live_mode_rereads_a_study_that_changes(wd, tmp_path, numbers):
    import shutil

    shutil.copytree(wd / "demo", tmp_path / "demo")
    at = clean(open_app(tmp_path, page="app_pages/trials.py", auto_refresh=True))
    assert len(at.dataframe[0].value) == 9
    shutil.rmtree(tmp_path / "demo" / "trials" / f"{numbers['completed'][0]:04d}")
    (tmp_path / "demo" / "ledger.jsonl").open("a").write('{"kind":"session","session":0,"seconds":1e4,"time":2e9}\n')
    at.run()
    assert len(clean(at).dataframe[0].value) == 9  # the table still draws; the trial page notes the loss
    at.switch_page("app_pages/trial.py").run()
    at.selectbox(key="_trial_pick").select(numbers["completed"][0]).run()
    assert "no trial.yaml" in shown(clean(at))
