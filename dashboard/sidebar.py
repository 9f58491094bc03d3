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


def _short(label: str) -> str:
    return Path(label).name if "/" in label and not label.startswith("hf:") else label


def data_caption(scores_meta: dict | None) -> str:
    """The data line: what the loaded scores were computed on, else the settings for the next scoring."""
    settings = f"{state.get('samples')} × {state.get('seq_len')} tokens"
    if scores_meta and scores_meta.get("n_samples") and scores_meta.get("seq_len"):
        used = f"{scores_meta['n_samples']} × {scores_meta['seq_len']} tokens"
        text = f"Data: {_short(str(scores_meta.get('data') or _data_label(state.get('data'))))} · {used} (scores)"
        return text if used == settings else f"{text} · next scoring: {settings}"
    return f"Data: {_short(_data_label(state.get('data')))} · {settings}"


def run_caption(run: str | None) -> str | None:
    """The run of the URL, only when it names a run folder (an invalid id is not echoed)."""
    if not run:
        return None
    from dashboard.runs_io import run_dir

    try:
        ok = (run_dir(run) / "config.json").is_file()
    except ValueError:
        ok = False
    return f"Run: `{run}`" if ok else None


def render_sidebar() -> None:
    """Compact status of the session; cheap (reads no model, no tensors: the scores' JSON sidecar only)."""
    from dashboard.common import have_scores, scores_folder
    from engine.fileio import read_json

    model = state.get("model")
    d = state.defaults()
    folder = scores_folder()
    have = have_scores(folder)
    with st.sidebar:
        st.markdown("### :material/content_cut: prunescope")
        st.caption(f"Model: **{'built-in SmolLM2-135M-Instruct' if model in ('default', 'builtin') else model}**")
        st.caption(data_caption(read_json(folder / "scores.json") if have else None))
        st.caption("Scores: " + (":material/check_circle: ready" if have else "not computed yet"))
        t = state.get("targets") or {}
        picked = ", ".join(f"{k} {v}" for k, v in t.items() if k in ("hidden", "ffn", "heads", "layers") and v)
        if t.get("depth_by") == "list" and t.get("drop_layers"):
            picked = ", ".join(filter(None, [picked, "drop layers " + " ".join(map(str, t["drop_layers"]))]))
        st.caption("Targets: " + (picked or "none (original size)"))
        run = run_caption(st.query_params.get("run"))
        if run:
            st.caption(run)
        st.caption(f"Machine: {'GPU (CUDA)' if d.device == 'cuda' else 'CPU'} defaults · runs in `{state.runs_root()}`")
