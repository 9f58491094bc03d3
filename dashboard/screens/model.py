"""Model and data page: pick the model and the calibration source, see the architecture."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from dashboard import state
from dashboard.common import current_model_info, user_message

st.title("Model and data")

# ---------------------------------------------------------------- model
st.subheader("Model")
spec = state.get("model")
builtin = spec in ("default", "builtin", "")
kind = st.radio("Source", ["Built-in SmolLM2-135M-Instruct", "Hub id, local folder or GGUF file"],
                index=0 if builtin else 1, horizontal=True, key="model_kind")
if kind.startswith("Built-in"):
    new_spec = "default"
else:
    new_spec = st.text_input("Model", value="" if builtin else spec, key="model_spec",
                             placeholder="HuggingFaceTB/SmolLM2-360M, /path/to/folder or /path/to/model.gguf",
                             help="A Hugging Face hub id (owner/name), a local folder with config.json, "
                                  "or a .gguf file (dequantised once into the cache).").strip() or spec
if new_spec != spec:
    state.put("model", new_spec)
    state.put("scores_dir", None)
    state.put("targets", None)
    st.rerun()

info = current_model_info()
if info is not None:
    cols = st.columns(6)
    cols[0].metric("Layers", info["layers"])
    cols[1].metric("Query heads", info["query_heads"])
    cols[2].metric("KV heads", info["kv_heads"])
    cols[3].metric("Hidden size", info["hidden_size"])
    cols[4].metric("MLP size", info["intermediate_size"])
    cols[5].metric("Parameters", state.human(info["parameters"]))
    st.caption(f"**{info['name']}** · {info['model_type']} · head dim {info['head_dim']} · vocabulary "
               f"{info['vocab_size']:,} · {'tied' if info['tied_embeddings'] else 'separate'} embeddings · "
               f"weights stored as {info.get('dtype') or 'float32'} (exports keep it) · read from `{info['source']}`")

# ---------------------------------------------------------------- data
st.subheader("Calibration data")
data = state.get("data")
KINDS = ["Local file", "Upload a file", "Hugging Face dataset", "Model-generated text"]
current_kind = 2 if data.startswith("hf:") else 3 if data.startswith("generated") else 0
dkind = st.radio("Source", KINDS, index=current_kind, horizontal=True, key="data_kind")
new_data = data
if dkind == "Local file":
    new_data = st.text_input("File (.txt/.raw split into articles, or .jsonl/.parquet/.csv with a text column)",
                             value=data if current_kind == 0 else "", key="data_path").strip() or data
elif dkind == "Upload a file":
    up = st.file_uploader("Text file", type=["txt", "raw", "jsonl", "json", "parquet", "csv"], key="data_upload")
    if up is not None:
        from engine.paths import cache_dir

        # in the cache, not under the runs root: an upload named config.json must not look like a run
        dest = cache_dir() / "uploads" / Path(up.name).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists() or dest.stat().st_size != up.size:
            dest.write_bytes(up.getvalue())
        new_data = str(dest)
        st.caption(f"Saved as `{dest}`")
elif dkind == "Hugging Face dataset":
    parts = (data[3:].split(":") + ["", "", "", ""])[:4] if data.startswith("hf:") else \
        ["wikitext", "wikitext-2-raw-v1", "train", "text"]
    c = st.columns(4)
    name = c[0].text_input("Dataset", value=parts[0], key="hf_name")
    cfg = c[1].text_input("Config", value=parts[1], key="hf_config")
    split = c[2].text_input("Split", value=parts[2] or "train", key="hf_split")
    col = c[3].text_input("Text column", value=parts[3] or "text", key="hf_column")
    new_data = f"hf:{name.strip()}:{cfg.strip()}:{split.strip()}:{col.strip()}"
else:
    n = st.number_input("Documents to generate", 8, 4096, value=int(data.split(":")[1]) if ":" in data else 64,
                        key="gen_docs")
    new_data = f"generated:{n}"
    st.info("The model writes its own calibration text. Use this only on a machine with no data; "
            "results are labelled as model-generated everywhere.")

column = state.get("text_column")
if dkind in ("Local file", "Upload a file") and Path(new_data).suffix in (".jsonl", ".json", ".parquet", ".csv"):
    column = st.text_input("Text column", value=column or "text", key="data_column").strip()
lo, hi = (float(x) for x in (state.get("data_range") or "0:1").split(":"))
rng = st.slider("Share of documents used for calibration and training (the rest is held out for evaluation)",
                0.0, 1.0, (lo, hi), 0.05, key="data_range_slider")
c1, c2 = st.columns(2)
samples = c1.number_input("Calibration samples", 1, 65536, int(state.get("samples")), key="data_samples",
                          help=f"Defaults on this machine: {state.defaults().samples}.")
seq_len = c2.number_input("Sequence length (tokens)", 8, 32768, int(state.get("seq_len")), key="data_seq_len",
                          help=f"Defaults on this machine: {state.defaults().seq_len}.")

changed = {"data": new_data, "text_column": column, "data_range": f"{rng[0]:g}:{rng[1]:g}",
           "samples": int(samples), "seq_len": int(seq_len)}
if any(state.get(k) != v for k, v in changed.items()):
    for k, v in changed.items():
        state.put(k, v)
    state.put("scores_dir", None)

try:
    from engine.data import DataSource

    source = DataSource.parse(new_data, column=column or None, docs=rng)
    st.caption(f"Source: **{source.label}**")
except Exception as e:  # noqa: BLE001
    st.error(user_message(e))
    st.stop()


@st.cache_data(show_spinner="Reading and tokenising the data…", max_entries=16)
def check_data(model: str, data: str, column: str, rng: tuple[float, float], mtime: float) -> dict:
    """The engine's data check of a source (file / HF only; generated text needs the model): documents,
    tokens, tokens per byte against English prose and the first lines. Raises DataError for non-text."""
    from dataclasses import asdict

    from transformers import AutoTokenizer

    from engine.data import DataSource, inspect_source
    from engine.models import resolve_spec

    src = DataSource.parse(data, column=column or None, docs=rng)
    t0 = time.time()
    path, kw = resolve_spec(model)
    report = inspect_source(src, AutoTokenizer.from_pretrained(path, **kw))
    return {**asdict(report), "token_ratio": report.token_ratio, "seconds": time.time() - t0}


if source.kind != "generated" and st.button("Check the data", key="data_check", icon=":material/fact_check:"):
    try:
        p = Path(new_data)
        r = check_data(state.get("model"), new_data, column, tuple(rng), p.stat().st_mtime if p.exists() else 0.0)
    except Exception as e:  # noqa: BLE001
        st.error(f"The data cannot be used: {user_message(e)}")
    else:
        blocks = r["tokens"] // int(seq_len)
        msg = (f"{r['docs']:,} documents, {r['tokens']:,} tokens: {blocks:,} blocks of {seq_len} tokens "
               f"({int(samples):,} needed).")
        (st.success if blocks >= samples else st.error)(
            msg if blocks >= samples else msg + " Use fewer samples, a shorter sequence length or more text.")
        st.caption(f"{r['tokens_per_byte']:.2f} tokens per byte, {r['token_ratio']:.2f}x this tokenizer's rate "
                   "on English prose. The first lines calibration will use:")
        st.code("\n".join(r["preview"]) or "(no text)", language=None, wrap_lines=True)

st.page_link("screens/importance.py", label="Next: compute importance", icon=":material/arrow_forward:")
