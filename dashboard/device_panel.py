"""The device lock, made visible: which job holds the device a job waits for, and every job on the
machine that holds or waits for one (whatever runs folder it lives in). Reads engine files only."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import state
from engine.device_lock import describe_job, device_jobs
from engine.fileio import read_json
from engine.runs import cancel


def _open_link(run_dir: str, key: str) -> None:
    """A link to the page that shows this job, when it lives in this dashboard's runs folder."""
    path = Path(run_dir)
    kind = (read_json(path / "config.json") or {}).get("kind", "pipeline")
    if path.parent == state.runs_root() and kind in ("pipeline", "distill"):
        st.page_link("screens/distill.py", label=f"Open {path.name}", icon=":material/open_in_new:",
                     query_params={"run": path.name})
    else:
        st.caption(f"`{run_dir}`")


def device_wait_notice(status: dict | None, key: str) -> None:
    """When a job is queued behind another: the holder's folder, stage and progress; open or cancel it."""
    if not status or status.get("state") != "queued":
        return
    holder = status.get("waiting_for") or {}
    if not holder.get("run"):
        return
    with st.container(border=True):
        st.warning(f"Waiting for the device: it is held by {describe_job(holder['run'])}, pid {holder.get('pid')}.")
        c1, c2 = st.columns(2)
        with c1:
            _open_link(holder["run"], key)
        if c2.button("Cancel that job", key=f"{key}_cancel_holder", icon=":material/stop:"):
            cancel(holder["run"])
            st.rerun()


def device_jobs_table(key: str = "devjobs") -> None:
    """Every job on this machine that holds or waits for a device, with a cancel button each."""
    jobs = device_jobs()
    st.subheader("Jobs on the devices of this machine")
    if not jobs:
        st.caption("No job holds or waits for a device.")
        return
    for i, j in enumerate(jobs):
        c1, c2 = st.columns([5, 1])
        c1.markdown(f"**{j['device']}** · {'holds it' if j['role'] == 'holds' else 'waits'} · "
                    f"{describe_job(j['run'])} · pid {j['pid']}")
        if c2.button("Cancel", key=f"{key}_{i}_{j['pid']}"):
            cancel(j["run"])
            st.rerun()
