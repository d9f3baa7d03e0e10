"""allocsearch dashboard: ``allocsearch dashboard [--workdir D]`` runs
``streamlit run streamlit_app.py -- --workdir D``. The pages are in app_pages/; every read of a study goes
through allocsearch.reports.status (read-only), so the dashboard can watch a running search."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import streamlit as st  # noqa: E402

import dashkit  # noqa: E402

st.set_page_config(page_title="allocsearch", page_icon=":material/hub:", layout="wide")
nav = st.navigation([
    st.Page(dashkit.PAGES["studies"], title="Studies", icon=":material/monitoring:", default=True),
    st.Page(dashkit.PAGES["trials"], title="Trials", icon=":material/table:"),
    st.Page(dashkit.PAGES["trial"], title="Trial", icon=":material/stacked_bar_chart:"),
    st.Page(dashkit.PAGES["compare"], title="Compare", icon=":material/compare:"),
    st.Page(dashkit.PAGES["insight"], title="Search insight", icon=":material/insights:"),
])
dashkit.sidebar()
nav.run()
