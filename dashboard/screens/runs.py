"""Runs page: every run folder with its status and key numbers; open, resume, cancel, delete, downloads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import badges, runs_io, state
from dashboard.common import user_message
from dashboard.device_panel import device_jobs_table
from engine.device_lock import device_jobs

st.title("Runs")

root = state.runs_root()
runs = runs_io.list_runs(root)  # a run with damaged files is listed with its problems, never a crash
st.caption(f"Run folders in `{root}` (set with `prunescope app --runs-dir` or PRUNESCOPE_RUNS).")
with st.expander("Jobs on this machine's devices (any runs folder)", expanded=bool(device_jobs())):
    device_jobs_table("runs_devjobs")
if not runs:
    st.info("No runs yet. Launch one on **Distill**.")
    st.page_link("screens/distill.py", label="Go to Distill", icon=":material/school:")
    st.stop()

df = pd.DataFrame(runs_io.run_rows(runs))
st.dataframe(df, hide_index=True, width="stretch", key="runs_table", column_config={
    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
    "of teacher": st.column_config.NumberColumn("of teacher", format="percent"),
    "params": st.column_config.NumberColumn("params", format="compact"),
    "ppl teacher": st.column_config.NumberColumn(format="%.2f"),
    "ppl pruned": st.column_config.NumberColumn(format="%.2f"),
    "ppl distilled": st.column_config.NumberColumn(format="%.2f"),
    "error": st.column_config.TextColumn("error", help="what is damaged in this run's files"),
})

names = [r["name"] for r in runs]
wanted = st.query_params.get("run")
name = st.selectbox("Run", names, index=names.index(wanted) if wanted in names else 0, key="runs_pick")
r = next(x for x in runs if x["name"] == name)
path = Path(r["path"])
status, cfg, summary = r["status"], r["config"], r.get("summary") or {}
problems = r.get("problems") or []
eff = status.get("effective")

c = st.columns(5)
if c[0].button("Open", key="runs_open", icon=":material/open_in_new:", type="primary"):
    st.switch_page("screens/distill.py", query_params={"run": name})
if eff in ("cancelled", "failed", "stale") and not problems and c[1].button("Resume", key="runs_resume", icon=":material/replay:"):
    from engine.runs import resume

    try:
        resume(path)
    except Exception as e:  # noqa: BLE001
        st.error(user_message(e))
    else:
        st.switch_page("screens/distill.py", query_params={"run": name})
if eff in ("queued", "running") and c[1].button("Cancel", key="runs_cancel", icon=":material/stop:"):
    from engine.runs import cancel

    cancel(path)
    st.rerun()
if eff == "done" and not problems and c[2].button("Compare", key="runs_compare", icon=":material/compare_arrows:"):
    st.switch_page("screens/compare.py", query_params={"run": name})


@st.dialog("Delete this run?")
def confirm_delete(run_name: str, run_path: str) -> None:
    st.write(f"This removes **{run_name}** and everything in `{run_path}`: checkpoints, metrics and the exported "
             "model. It cannot be undone.")
    a, b = st.columns(2)
    if a.button("Delete", type="primary", key="runs_delete_yes"):
        try:
            runs_io.delete_run(Path(run_path))
        except Exception as e:  # noqa: BLE001
            st.error(user_message(e))
            return
        if st.query_params.get("run") == run_name:
            del st.query_params["run"]
        st.rerun()
    if b.button("Keep it", key="runs_delete_no"):
        st.rerun()


if c[4].button("Delete…", key="runs_delete", icon=":material/delete:", disabled=eff in ("queued", "running")):
    confirm_delete(name, str(path))

st.markdown(f"**State:** {eff} · **stage:** {status.get('stage') or '–'} · {status.get('message') or ''}")
if status.get("error"):
    st.error(status["error"])
if problems:
    st.error(f"The files of this run are damaged ({'; '.join(problems)}); it cannot be resumed or compared. "
             "Delete it, or repair the file by hand.")

d = st.columns(3)
plan = path / "plan.json"
if plan.is_file():
    d[0].download_button("plan.json", plan.read_bytes(), file_name=f"{name}-plan.json", mime="application/json",
                         icon=":material/download:", key="runs_dl_plan")
from engine.importance import Scores  # noqa: E402

if Scores.exists(path / "scores"):
    d[1].download_button("scores.csv", lambda: runs_io.scores_csv(path / "scores"), file_name=f"{name}-scores.csv",
                         mime="text/csv", icon=":material/download:", key="runs_dl_scores")
if summary.get("model_dir"):
    st.markdown("**Exported model** (a plain Hugging Face folder; load it with `AutoModelForCausalLM.from_pretrained`):")
    st.code(str(summary["model_dir"]), language=None)
badges.roundtrip_badge(summary.get("model_dir") or path / "model")
if cfg:
    st.markdown("**Reproduce from a terminal:**")
    st.code(runs_io.cli_command(cfg, path), language="bash")
with st.expander("config.json / summary.json"):
    st.json({"config": cfg, "summary": summary}, expanded=False)
