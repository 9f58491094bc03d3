"""Importance page: compute scores with a background job, then draw them from the cached file."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import state
from dashboard.common import current_cut, scores_folder, user_message
from dashboard.views import (
    criterion_picker,
    criterion_view,
    load_or_error,
    render_falloff,
    render_score_charts,
    scoring_section,
)

st.title("Importance")
st.caption("Importance of every attention head, MLP neuron, embedding channel and layer: Minitron's activation "
           "statistic, or it weighted by the unit's weights. Scores are computed by a background job and read from "
           "their cached file.")

with st.expander("Open a scores folder made elsewhere (e.g. by `prunescope score --out DIR`)"):
    c1, c2 = st.columns([4, 1])
    typed = c1.text_input("Scores folder", value=state.get("scores_dir") or "", key="imp_scores_dir",
                          placeholder="/path/to/scores", label_visibility="collapsed")
    if c2.button("Open", key="imp_open"):
        from engine.importance import Scores

        if typed and Scores.exists(Path(typed).expanduser()):
            state.put("scores_dir", str(Path(typed).expanduser().resolve()))
            st.rerun()
        elif typed:
            st.error(f"No scores in {typed}: expected scores.safetensors and scores.json there.")
        else:
            state.put("scores_dir", None)
            st.rerun()

folder = scores_folder()
if scoring_section(folder):
    loaded = load_or_error(folder)
    if loaded is not None:
        tensors, meta = loaded
        t = meta.get("timings") or {}
        st.caption(f"{meta.get('data', '')} · {meta.get('n_samples')} × {meta.get('seq_len')} tokens · "
                   f"{meta.get('dtype', '')} on {meta.get('device', '')} · computed in {t.get('total', 0):.1f}s · "
                   f"`{folder}`")
        try:
            cut = current_cut(folder, state.get("targets"))
        except Exception as e:  # noqa: BLE001
            st.error(user_message(e))
            st.stop()
        criterion = criterion_picker("imp")
        view = criterion_view(tensors, criterion)
        if view is None:
            st.info(f"These scores were computed before the {criterion} criterion existed; rescore the model "
                    "to see it (activation is shown).")
            view = tensors
        else:  # the overlay follows the criterion the targets now hold
            cut = current_cut(folder, state.get("targets"))
        render_score_charts(view, meta, cut, key="imp")
        with st.expander("How sharply importance falls off"):
            render_falloff(folder, meta, key="imp")
