"""prunescope dashboard entry point (`prunescope app`): a multipage Streamlit app.

Pages live in dashboard/screens/; shared state in dashboard/state.py. The UI never does heavy work in
its own process: scoring and the prune + distill pipeline run as detached jobs whose files it reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

if __package__ in (None, ""):  # `streamlit run dashboard/app.py` puts dashboard/ (not the root) on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboard import state  # noqa: E402
from dashboard.sidebar import render_sidebar  # noqa: E402

# a material icon, not an emoji: checking an emoji imports streamlit.emojis (0.2 s of the first run)
st.set_page_config(page_title="prunescope", page_icon=":material/content_cut:", layout="wide")
state.init()

HERE = Path(__file__).parent / "screens"
PAGES = [
    # the default page is served at "/"; its url_path only has to be unique. /model reaches the same page
    # through the hidden alias at the end (a default page is not served at its own url_path).
    st.Page(HERE / "model.py", title="Model and data", icon=":material/memory:", url_path="home", default=True),
    st.Page(HERE / "importance.py", title="Importance", icon=":material/grid_on:", url_path="importance"),
    st.Page(HERE / "targets.py", title="Prune targets", icon=":material/tune:", url_path="targets"),
    st.Page(HERE / "distill.py", title="Distill", icon=":material/school:", url_path="distill"),
    st.Page(HERE / "compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page(HERE / "search.py", title="Search", icon=":material/travel_explore:", url_path="search"),
    st.Page(HERE / "runs.py", title="Runs", icon=":material/folder_open:", url_path="runs"),
    st.Page(HERE / "model.py", title="Model and data", icon=":material/memory:", url_path="model", visibility="hidden"),
]
page = st.navigation(PAGES)
try:
    page.run()
finally:  # also after st.stop(): the sidebar shows the choices the page just made, and they are saved
    render_sidebar()
    state.persist()
