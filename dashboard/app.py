"""prunescope dashboard entry point (`prunescope app`)."""

from __future__ import annotations

import os

import streamlit as st

st.set_page_config(page_title="prunescope", layout="wide")


@st.cache_resource(show_spinner="Loading model…")
def _load(spec: str):
    from engine.models import describe, load

    return describe(load(spec))


spec = os.environ.get("PRUNESCOPE_MODEL", "default")
st.title("prunescope")
try:
    info = _load(spec)
except Exception as e:  # noqa: BLE001 - shown to the user as a message, not a trace
    st.error(f"Could not load model {spec!r}: {e}")
    st.stop()

st.subheader(info["name"])
cols = st.columns(5)
cols[0].metric("Layers", info["layers"])
cols[1].metric("Query heads", info["query_heads"])
cols[2].metric("KV heads", info["kv_heads"])
cols[3].metric("Hidden / MLP", f"{info['hidden_size']} / {info['intermediate_size']}")
cols[4].metric("Parameters", f"{info['parameters'] / 1e6:.1f} M")
st.caption(f"{info['model_type']} · {info['dtype']} on {info['device']} · {info['source']}")
