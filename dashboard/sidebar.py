"""The sidebar shown on every page: what is selected (model, data, scores, targets, run)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import state


def _data_label(spec: str) -> str:
    try:
        from engine.data import DataSource

        return DataSource.parse(spec).label
    except Exception:  # noqa: BLE001
        return spec


def render_sidebar() -> None:
    """Compact status of the session; cheap (reads no model, no tensors)."""
    from dashboard.common import have_scores, scores_folder

    model = state.get("model")
    d = state.defaults()
    with st.sidebar:
        st.markdown("### :material/content_cut: prunescope")
        st.caption(f"Model: **{'built-in SmolLM2-135M-Instruct' if model in ('default', 'builtin') else model}**")
        label = _data_label(state.get("data"))
        st.caption(f"Data: {Path(label).name if '/' in label and not label.startswith('hf:') else label} · "
                   f"{state.get('samples')} × {state.get('seq_len')} tokens")
        st.caption("Scores: " + (":material/check_circle: ready" if have_scores(scores_folder()) else "not computed yet"))
        t = state.get("targets") or {}
        picked = ", ".join(f"{k} {v}" for k, v in t.items() if k in ("hidden", "ffn", "heads", "layers") and v)
        st.caption("Targets: " + (picked or "none (original size)"))
        run = st.query_params.get("run")
        if run:
            st.caption(f"Run: `{run}`")
        st.caption(f"Machine: {'GPU (CUDA)' if d.device == 'cuda' else 'CPU'} defaults · runs in `{state.runs_root()}`")
