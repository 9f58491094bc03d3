"""One-shot quality beside the size readout, and the size-vs-quality map of every tried target set.

The model never runs here: a preview is a "preview" job (engine.search) whose result lands in the
model's preview store; this module reads that store (and finished runs' summaries) and draws it.
`quality_map` and `pareto_front` are pure functions (tested without Streamlit).
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from dashboard import state

KIND_COLOURS = {"depth": "#1f77b4", "width": "#ff7f0e", "mixed": "#2ca02c"}
Y_LABELS = {"kl": "one-shot KL(teacher ‖ pruned), nats/token", "ppl": "held-out perplexity"}


def held_out_range(data_range: str) -> tuple[float, float] | None:
    """The documents not used for calibration: after the calibration range, else before it."""
    from engine.data import parse_doc_range

    start, end = parse_doc_range(data_range or "0:1")
    if end < 1.0:
        return (end, 1.0)
    if start > 0.0:
        return (0.0, start)
    return None


def eval_size() -> tuple[int, int]:
    """Evaluation blocks x tokens: 8 x 256 on a CPU, 32 x 1024 on a GPU."""
    return (32, 1024) if state.defaults().device == "cuda" else (8, 256)


def pareto_front(points: list[dict], y: str = "kl") -> list[dict]:
    """The points no other point beats on both size and quality (fewer params, lower y), by params."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["params"], p[y])):
        if p[y] < best:
            front.append(p)
            best = p[y]
    return front


def shape_text(p: dict) -> str:
    s = p.get("sizes") or {}
    return (f"{s.get('layers')} layers · {s.get('heads')} query heads · hidden {s.get('hidden')} · "
            f"MLP {s.get('ffn')}")


def quality_map(points: list[dict], distilled: list[dict] = (), y: str = "kl", source_params: int | None = None,
                current: str | None = None) -> go.Figure:
    """Scatter of parameters vs one-shot quality, one trace per kind, the Pareto frontier as a line,
    distilled runs as a second series; customdata[0] is each point's index in `points`."""
    fig = go.Figure()
    src = source_params or max((p.get("source_params") or 0 for p in points), default=0) or None
    for kind, colour in KIND_COLOURS.items():
        idx = [i for i, p in enumerate(points) if p.get("kind") == kind]
        if not idx:
            continue
        fig.add_trace(go.Scatter(
            x=[points[i]["params"] for i in idx], y=[points[i][y] for i in idx], mode="markers", name=kind,
            marker={"color": colour, "size": [14 if points[i].get("key") == current else 9 for i in idx],
                    "line": {"width": [2 if points[i].get("key") == current else 0 for i in idx], "color": "black"}},
            customdata=[[i, 100 * points[i]["params"] / src if src else 0] for i in idx],
            text=[shape_text(points[i]) for i in idx],
            hovertemplate="%{text}<br>%{x:,} parameters (%{customdata[1]:.1f}%)<br>" + y + " %{y:.4g}<extra></extra>"))
    front = pareto_front(points, y)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[p["params"] for p in front], y=[p[y] for p in front], mode="lines",
                                 name="Pareto frontier", line={"color": "grey", "dash": "dot"}, hoverinfo="skip"))
    dist = [d for d in distilled if d.get(y) is not None]
    if dist:
        fig.add_trace(go.Scatter(x=[d["params"] for d in dist], y=[d[y] for d in dist], mode="markers",
                                 name="distilled runs", marker={"symbol": "star", "size": 13, "color": "#d62728"},
                                 text=[d.get("name", "") for d in dist],
                                 hovertemplate="%{text}<br>%{x:,} parameters<br>" + y + " %{y:.4g}<extra></extra>"))
    title = "parameters" + (f" (source {src:,})" if src else "")
    fig.update_layout(xaxis_title=title, yaxis_title=Y_LABELS[y], height=420, margin={"t": 30, "b": 40},
                      legend={"orientation": "h", "y": -0.2}, clickmode="event+select")
    fig.update_yaxes(type="log" if y == "kl" else "linear")
    return fig


def distilled_runs(model: str) -> list[dict]:
    """Finished prune + distill runs of this model: parameters and distilled KL / perplexity."""
    from engine.runs import list_runs

    out = []
    for r in list_runs(state.runs_root()):
        s, cfg = r.get("summary") or {}, r.get("config") or {}
        if cfg.get("model") == model and s.get("params_student") and s.get("kl_distilled") is not None:
            out.append({"name": r["name"], "params": s["params_student"], "kl": s["kl_distilled"],
                        "ppl": s.get("ppl_distilled")})
    return out


def tournament_chart(rows: list[dict]) -> go.Figure:
    """The tournament's curves: training KL loss (left) and held-out KL (right) per candidate vs step."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "held-out KL (nats/token)"))
    names = list(dict.fromkeys(r["candidate"] for r in rows if r.get("candidate")))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, name in enumerate(names):
        colour = palette[i % len(palette)]
        train = [r for r in rows if r.get("candidate") == name and not r.get("eval")]
        evals = [r for r in rows if r.get("candidate") == name and r.get("eval") and r.get("kl") is not None]
        fig.add_trace(go.Scatter(x=[r["step"] for r in train], y=[r["loss"] for r in train], mode="lines",
                                 name=name, legendgroup=name, line={"color": colour}), row=1, col=1)
        fig.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r["kl"] for r in evals], mode="lines+markers",
                                 name=name, legendgroup=name, showlegend=False, line={"color": colour}), row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(height=380, margin={"t": 40, "b": 40}, legend={"orientation": "h", "y": -0.25})
    return fig


def rank_stability(rows: list[dict]) -> list[dict]:
    """The ranking rows of a tournament: step, ranking (best first), Kendall τ to the previous one."""
    return [{"step": r["step"], "ranking": r["ranking"], "kendall_tau": r.get("kendall_tau")}
            for r in rows if r.get("ranking") is not None]


# ---------------------------------------------------------------- Streamlit parts


@st.cache_data(max_entries=16, show_spinner=False)
def _scores_key(folder: str, mtime: float) -> tuple[str, str]:
    from engine.search.store import scores_key

    return scores_key(folder)


def preview_config(folder: Path, targets: dict):
    """The preview job config of these targets on the session's model and held-out data (None if the
    calibration range leaves no held-out documents)."""
    from engine.search.store import PreviewConfig

    rng = held_out_range(state.get("data_range") or "0:0.6")
    if rng is None:
        return None
    n, t = eval_size()
    return PreviewConfig(model=state.get("model"), scores=str(folder), targets=targets, data=state.get("data"),
                         text_column=state.get("text_column") or None, eval_range=rng, eval_samples=n,
                         eval_seq_len=t, device=state.defaults().device)


def _start(path: Path, cfg) -> None:
    from engine.runs import Run, start_job

    Run.create(path, cfg.to_dict(), force=True)
    start_job(path)


def render_preview(folder: Path, targets: dict, column=None) -> None:
    """The one-shot quality readout of `targets` (in `column`) and the map of every preview of the model."""
    from engine.fileio import read_json
    from engine.search import store

    cfg = preview_config(folder, targets)
    if cfg is None:
        st.info("The calibration range uses every document, so no held-out text is left for a quality preview; "
                "use a range like 0:0.6 on Model and data.")
        return
    from engine.search.store import eval_data

    fp, skey = _scores_key(str(folder), (folder / "scores.safetensors").stat().st_mtime)
    data = eval_data(cfg.data, cfg.text_column, cfg.eval_range, cfg.eval_samples, cfg.eval_seq_len, cfg.seed)
    key = store.preview_key(fp, skey, targets, data, cfg.eval_samples, cfg.eval_seq_len)
    path = store.store_path(fp)
    hit = store.stored(path, key)
    job = state.runs_root() / "previews" / key
    with column if column is not None else st.container():
        with st.container(border=True, key="quality_readout"):
            if hit is not None:
                c1, c2 = st.columns(2)
                c1.metric("One-shot KL", f"{hit['kl']:.4f}", help="KL(teacher ‖ pruned) in nats per token on "
                          f"{cfg.eval_samples} x {cfg.eval_seq_len} held-out tokens, before any distillation")
                c2.metric("Perplexity", f"{hit['ppl']:.2f}", f"teacher {hit['teacher_ppl']:.2f}", delta_color="off")
                st.caption(f"Pruned in memory from the cached scores in {hit['seconds']['total']:.1f} s "
                           f"(forward + KL {hit['seconds']['forward_kl']:.1f} s).")
            else:
                _job_readout(job, cfg, read_json(job / "status.json") or {})
    render_map(path, hit, cfg)


def _job_readout(job: Path, cfg, status: dict) -> None:
    from engine.runs import effective_state

    live = effective_state(status) in ("queued", "running") if status else False
    if live:
        _follow(job)
        return
    if status.get("state") == "failed":
        st.error(f"The preview failed: {status.get('error')}")
    if st.button("Preview quality (one-shot KL, perplexity)", key="preview_start", icon=":material/speed:",
                 help="A background job prunes in memory from the cached scores and evaluates on held-out text."):
        _start(job, cfg)
        st.rerun()


@st.fragment(run_every=1.0)
def _follow(job: Path) -> None:
    from engine.fileio import read_json
    from engine.runs import effective_state

    status = read_json(job / "status.json") or {}
    if effective_state(status) not in ("queued", "running"):
        st.rerun()
    st.progress(float(status.get("progress") or 0.0), text=f"Previewing… {status.get('message') or ''}")


def render_map(path: Path, hit: dict | None, cfg) -> None:
    """The size-vs-quality map of the model's previews (same evaluation set); a click loads a point's targets."""
    from engine.search import store
    from engine.search.store import eval_data

    data = eval_data(cfg.data, cfg.text_column, cfg.eval_range, cfg.eval_samples, cfg.eval_seq_len, cfg.seed)
    points = [p for p in store.previews(path) if p.get("data") == data and p.get("eval") == [cfg.eval_samples,
                                                                                             cfg.eval_seq_len]]
    if not points:
        return
    st.subheader("Size vs quality")
    y = st.radio("Quality", ["kl", "ppl"], horizontal=True, key="qmap_y", format_func=lambda v: {
        "kl": "One-shot KL (log scale)", "ppl": "Perplexity"}[v])
    fig = quality_map(points, distilled_runs(cfg.model), y=y, current=hit.get("key") if hit else None)
    event = st.plotly_chart(fig, key="qmap", on_select="rerun", selection_mode="points", width="stretch")
    st.caption(f"{len(points)} target sets tried on {cfg.eval_samples} x {cfg.eval_seq_len} held-out tokens; "
               "click a point to load its targets into the sliders. Stars: finished prune + distill runs of this "
               "model, measured on each run's own held-out blocks.")
    sel = [p for p in (event.selection.points if event and event.selection else []) if p.get("customdata")]
    if sel:
        picked = points[int(sel[0]["customdata"][0])]
        if st.session_state.get("qmap_done") != picked["key"]:
            st.session_state["qmap_done"] = picked["key"]
            from engine.importance.scores import UNRECORDED_CRITERION

            state.put("targets", {"criterion": UNRECORDED_CRITERION, **picked["targets"]})  # older rows: activation
            st.session_state.pop("t_hidden", None)  # the Prune targets page reloads its sliders from state
            st.rerun()

