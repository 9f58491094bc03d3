"""Page pieces shared by Importance and Prune targets: the score charts with the 'would be pruned'
overlay, and the scoring-job panel (start button, live progress)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from dashboard import charts, state
from dashboard.common import Cut, have_scores, load_scores, user_message
from dashboard.device_panel import device_wait_notice
from dashboard.runs_io import wrap_command

TABS = ["Attention heads", "MLP neurons", "Embedding channels", "Layers"]
PLOT_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["select2d", "lasso2d"]}


def show_fig(fig, key: str) -> None:
    st.plotly_chart(fig, key=key, config=PLOT_CONFIG, width="stretch")


@st.cache_resource(max_entries=96, show_spinner=False)
def figure(name: str, *args, **kwargs):
    """charts.<name>(...) cached by its inputs (arrays included): building a plotly figure costs tens of
    milliseconds, and a slider move changes only the chart of its own axis. Figures are never mutated."""
    return getattr(charts, name)(*args, **kwargs)


def cut_summary(tensors: dict[str, np.ndarray], cut: Cut) -> str:
    L, H = tensors["heads"].shape
    parts = []
    if cut.layers.any():
        parts.append(f"{int(cut.layers.sum())} of {L} layers ({', '.join(map(str, np.flatnonzero(cut.layers)))})")
    kept = ~cut.layers
    if kept.any():
        h = int(cut.heads[kept].sum(1).max())
        n = int(cut.neurons[kept].sum(1).max())
        if h:
            parts.append(f"{h} of {H} query heads per layer")
        if n:
            parts.append(f"{n} of {tensors['neurons'].shape[1]} MLP neurons per layer")
    if cut.experts is not None and cut.experts.any():
        parts.append(f"{int(cut.experts.sum(1).min())} of {cut.experts.shape[1]} experts per layer")
    if cut.channels.any():
        parts.append(f"{int(cut.channels.sum())} of {len(cut.channels)} embedding channels")
    return "Red marks what the current targets would remove: " + "; ".join(parts) if parts else \
        "No targets set: nothing is marked for removal (set them on **Prune targets**)."


def render_score_charts(tensors: dict[str, np.ndarray], meta: dict, cut: Cut, key: str) -> None:
    """Tabs of heatmaps / bar charts for one scores file, with the cut overlaid on each."""
    if cut.error:
        st.warning(f"The targets cannot be applied to these scores: {cut.error}")
    st.caption(cut_summary(tensors, cut))
    c1, c2, c3 = st.columns([1, 1, 2])
    norm = c1.toggle("Normalise each layer", value=True, key=f"{key}_norm",
                     help="Divide each row by its maximum, so layers with small activations stay readable.")
    sort = c2.toggle("Sort neurons per layer", value=True, key=f"{key}_sort",
                     help="Sort each layer's neurons by importance before binning; off shows the raw order.")
    # Lazy tabs: only the open tab's charts are built and sent (a plotly figure costs ~0.1 s to build
    # and more to draw), so the first page run and every slider move stay fast.
    heads, neurons, channels, layers = st.tabs(TABS, key=f"{key}_tab", on_change="rerun")
    if heads.open:
        with heads:
            show_fig(figure("heads_heatmap", tensors["heads"], cut.heads, meta.get("n_kv_heads") or 1,
                            normalise=norm), f"{key}_heads")
    if neurons.open:
        with neurons:
            if "experts" in tensors:  # a mixture of experts: layer x expert, selection frequency in the hover
                show_fig(figure("experts_heatmap", tensors["experts"], tensors["expert_frequency"],
                                [int(i) for i in tensors["expert_layers"]], cut.experts, normalise=norm),
                         f"{key}_experts")
            else:
                show_fig(figure("neurons_heatmap", tensors["neurons"], cut.neurons, sort=sort, normalise=norm),
                         f"{key}_neurons")
    if channels.open:
        with channels:
            show_fig(figure("channels_heatmap", tensors["channels_per_layer"], cut.channels, cut.layers,
                            normalise=norm), f"{key}_chan_heat")
            show_fig(figure("channels_bar", tensors["channels"], cut.channels), f"{key}_chan_bar")
    if layers.open:
        with layers:
            render_layers(tensors, meta, cut, key)


def render_layers(tensors: dict[str, np.ndarray], meta: dict, cut: Cut, key: str) -> None:
    show = st.segmented_control("Show", ["values", "ranks"], default="values", key=f"{key}_lshow") or "values"
    ppl = tensors.get("ppl_increase")
    show_fig(figure("layers_chart", tensors["bi"], ppl, cut.layers, tensors.get("taylor"),
                    meta.get("spearman_bi_ppl"), show=show), f"{key}_layers")
    if ppl is None:
        st.caption("Perplexity increase per layer was not computed (it costs one pass per layer); "
                   "tick it on the Importance page to add it.")
    elif meta.get("base_ppl"):
        st.caption(f"Base perplexity on the calibration data: {meta['base_ppl']:.2f}. "
                   f"Spearman ρ between BI and perplexity increase: {meta.get('spearman_bi_ppl') or float('nan'):.3f} "
                   "(1 = the cheap metric orders layers exactly like the expensive one).")
    if "block_bi" in tensors and meta.get("block_size"):
        show_fig(figure("blocks_chart", tensors["block_bi"], int(meta["block_size"]), tensors.get("block_ppl_increase")),
                 f"{key}_blocks")


# ---------------------------------------------------------------- scoring job


STREAM_OPTIONS = {"": "Off: the whole model on the device", "cpu": "Weights in RAM, one layer at a time on the device",
                  "disk": "Weights read from disk, one layer at a time (models larger than RAM)"}


def scoring_config(folder: Path, depth_ppl: bool, block_size: int, stream: str = "") -> dict:
    """The scoring job's config for the session's model, data and calibration settings; with scores
    already in `folder`, the job adds to them (the width scores are not recomputed)."""
    from engine.score_job import score_job_config

    return score_job_config(folder, state.get("model"), state.get("data"), int(state.get("samples")),
                            int(state.get("seq_len")), state.get("data_range"), depth_ppl, block_size or None,
                            state.get("text_column"), stream, add=have_scores(folder))


def start_scoring(folder: Path, depth_ppl: bool, block_size: int, stream: str = "") -> None:
    from engine.score_job import start_score_job

    start_score_job(scoring_config(folder, depth_ppl, block_size, stream))


def score_panel(folder: Path, have: bool) -> None:
    """Start button with the scoring options (and the equivalent CLI command)."""
    d = state.defaults()
    label = "Compute importance scores" if not have else "Add to these scores"
    with st.container(border=True):
        st.markdown(f"**{label}** · {state.get('samples')} samples × {state.get('seq_len')} tokens "
                    "(change them on *Model and data*)")
        c1, c2 = st.columns(2)
        ppl = c1.checkbox("Perplexity increase per layer", value=bool(state.get("depth_ppl")), key="score_ppl",
                          help="Remove each layer in turn and measure perplexity: about L/2 times the cost of the "
                               f"width pass. {'Off by default on a CPU.' if d.device == 'cpu' else ''}")
        blocks = c2.number_input("Contiguous blocks of n layers (0 = off)", min_value=0, max_value=16,
                                 value=int(state.get("block_size") or 0), key="score_blocks")
        stream = st.selectbox("Stream layers (for a model larger than the device)", list(STREAM_OPTIONS),
                              format_func=STREAM_OPTIONS.get, key="score_stream",
                              help="Keeps the weights off the GPU and copies each layer in only while it runs: "
                                   "peak device memory about one layer. Same scores; Taylor+ is not available.")
        from engine.score_job import score_command

        cmd = score_command(scoring_config(folder, ppl, int(blocks), stream))
        if st.button(label, type="primary", key="score_start", icon=":material/play_arrow:"):
            state.put("depth_ppl", ppl)
            state.put("block_size", int(blocks))
            try:
                start_scoring(folder, ppl, int(blocks), stream)
            except Exception as e:  # noqa: BLE001
                st.error(f"Could not start scoring: {user_message(e)}")
            else:
                st.rerun()
        st.caption("Same from a terminal:")
        st.code(wrap_command(cmd), language="bash")


def score_job(folder: Path) -> dict | None:
    """The status of the scoring job that writes `folder` (None when there is none)."""
    from engine.runs import job_status
    from engine.score_job import score_job_dir

    return job_status(score_job_dir(folder))


def job_active(folder: Path) -> bool:
    job = score_job(folder)
    return bool(job and job.get("state") in ("queued", "running"))


@st.fragment(run_every=1.0)
def score_progress(folder: str) -> None:
    """Live progress of the scoring job; reruns the whole page when it ends."""
    job = score_job(Path(folder))
    if job is None:
        return
    if job.get("state") in ("queued", "running"):
        frac = float(job.get("progress") or 0.0)
        st.progress(frac, text=f"Scoring: {job.get('message') or job.get('state')} ({frac:.0%})")
        device_wait_notice(job, "score")
        if st.button("Cancel scoring", key="score_cancel", icon=":material/stop:"):
            from engine.runs import cancel
            from engine.score_job import score_job_dir

            cancel(score_job_dir(Path(folder)))
            st.rerun(scope="app")
    else:
        st.rerun(scope="app")


def scoring_section(folder: Path) -> bool:
    """Job status + start panel; True when scores can be drawn."""
    have = have_scores(folder)
    job = score_job(folder)
    if job_active(folder):
        score_progress(str(folder))
    elif job and job.get("state") == "failed":
        st.error(f"Scoring failed: {job.get('error') or 'unknown error'}")
        with st.expander("Log"):
            from engine.runs import log_tail
            from engine.score_job import score_job_dir

            st.code(log_tail(score_job_dir(folder), 30) or "(empty)")
    elif job and job.get("state") == "cancelled" and not have:
        st.info("Scoring was cancelled.")
    if not job_active(folder):
        if have:
            with st.expander("Compute more (perplexity increase per layer, contiguous blocks)"):
                from engine.importance.sweep import (
                    default_depth_samples,
                    estimate_sweep_seconds,
                    format_seconds,
                    layer_seconds_from_meta,
                )

                meta = load_or_error(folder)
                meta = meta[1] if meta else {}
                per_layer = layer_seconds_from_meta(meta)
                if per_layer and meta.get("arch"):  # the width pass already timed this model here
                    k = default_depth_samples(int(meta["n_samples"]), state.defaults().device)
                    secs = estimate_sweep_seconds(per_layer, meta["arch"], k, capture=True)
                    st.caption(f"The perplexity increase per layer runs on {k} of the {meta['n_samples']} samples "
                               f"and should take about **{format_seconds(secs)}** (the width pass took "
                               f"{1000 * per_layer:.1f} ms per layer and sample); the scores above are kept, "
                               "not recomputed.")
                score_panel(folder, True)
        else:
            score_panel(folder, False)
    return have


def load_or_error(folder: Path) -> tuple[dict, dict] | None:
    try:
        return load_scores(folder)
    except Exception as e:  # noqa: BLE001
        st.error(f"Could not read the scores in {folder}: {user_message(e)}")
        return None


# ---------------------------------------------------------------- criteria and fall-off

CRITERION_LABELS = {"activation": "activation (Minitron)", "weighted": "activation × weights",
                    "product": "activation × gate · up · down"}
CRITERION_CHOICE_HELP = (
    "How heads, MLP neurons and embedding channels are ranked, here and in the plan (recorded in plan.json and "
    "the model card). Activation is Minitron's statistic; weighted multiplies it by the norm of the weights the "
    "unit writes through (down_proj column, o_proj block) or, for channels, of the weights that read it; "
    "product multiplies a neuron's by its gate, up and down norms. Every criterion is stored in the scores, "
    "so switching is instant. The default is weighted: after the same 98,304-token distillation on the built-in "
    "model it beat activation on all three width shapes measured (held-out ppl 50.99 vs 51.78 MLP only, 54.50 "
    "vs 55.28 MLP + heads, 58.93 vs 62.26 MLP + heads + channels), though activation is ahead one-shot on the "
    "MLP alone (docs/BENCHMARKS.md, Importance criteria).")


def criterion_view(tensors: dict[str, np.ndarray], criterion: str) -> dict[str, np.ndarray] | None:
    """The scores with heads / neurons / channels replaced by the criterion's tensors (None: not in the file)."""
    from engine.importance.scores import criterion_tensor

    view = dict(tensors)
    for axis in ("heads", "neurons", "channels", "channels_per_layer"):
        name = criterion_tensor(axis, criterion)
        if axis == "neurons" and "experts" in tensors:  # a mixture of experts: neurons scored per expert
            name = criterion_tensor("expert_neurons", criterion)
            if name not in tensors:
                return None
            view["expert_neurons"] = tensors[name]
            continue
        if name not in tensors:
            return None
        view[axis] = tensors[name]
    return view


def criterion_picker(key: str) -> str:
    """The ranking criterion, kept in the session's targets (so the plan and the overlay follow it)."""
    from engine.importance.scores import CRITERIA, DEFAULT_CRITERION

    targets = dict(state.get("targets") or {})
    current = targets.get("criterion", DEFAULT_CRITERION)
    if st.session_state.get(f"{key}_criterion") not in CRITERIA:
        st.session_state[f"{key}_criterion"] = current
    picked = st.segmented_control("Rank units by", list(CRITERIA), key=f"{key}_criterion",
                                  format_func=CRITERION_LABELS.get, help=CRITERION_CHOICE_HELP) or current
    if picked != current:
        targets["criterion"] = picked
        state.put("targets", targets)
    return picked


FALLOFF_AXES = ("neurons", "heads", "channels")  # engine.importance.falloff's (not imported: it needs torch)


def render_falloff(folder: Path, meta: dict, key: str) -> None:
    """For a chosen layer and axis: the layer output's error as its lowest-ranked units are zeroed."""
    L = int(meta.get("n_layers") or 1)
    c1, c2, c3, c4 = st.columns([1, 2, 1, 2])
    layer = int(c1.number_input("Layer", 0, L - 1, value=L // 2, key=f"{key}_fo_layer"))
    axis = c2.segmented_control("Units", list(FALLOFF_AXES), default="neurons", key=f"{key}_fo_axis") or "neurons"
    n = int(c3.number_input("Samples", 1, int(meta.get("n_samples") or 4), value=min(4, int(meta.get("n_samples") or 4)),
                            key=f"{key}_fo_n", help="calibration blocks the layer's output is measured on"))
    metric = c4.segmented_control("Measure", ["rel_rmse", "cosine"], default="rel_rmse", key=f"{key}_fo_metric",
                                  format_func={"rel_rmse": "relative RMSE", "cosine": "cosine"}.get) or "rel_rmse"
    from engine.falloff_job import falloff_job_dir, falloff_result, start_falloff_job
    from engine.runs import job_status

    path = falloff_job_dir(folder, layer, axis, n)
    job = job_status(path)
    if job is None or job.get("state") in ("failed", "cancelled"):
        if job is not None and job.get("state") == "failed":
            st.error(f"The fall-off job failed: {job.get('error')}")
        if st.button("Compute the curves", key=f"{key}_fo_go",
                     help="A background job loads the scored model and runs the calibration blocks up to this "
                          "layer once per point (about 40 partial forward passes)."):
            start_falloff_job(folder, layer, axis, n)
            st.rerun()
        st.caption("Each curve zeroes the lowest-ranked units of the layer, 0-90%, and compares the layer's output "
                   "with the untouched one; the dashed random order is the baseline a useful criterion stays under.")
        return
    if job.get("state") in ("queued", "running"):
        falloff_progress(str(path), key)
        return
    curves = falloff_result(path) or []
    show_fig(figure("falloff_chart", curves, layer, axis, metric=metric), f"{key}_falloff")


@st.fragment(run_every=1.0)
def falloff_progress(path: str, key: str) -> None:
    """Live progress of the fall-off job; reruns the page when it ends."""
    from engine.runs import job_status

    job = job_status(Path(path)) or {}
    if job.get("state") in ("queued", "running"):
        st.progress(float(job.get("progress") or 0.0), text=f"Fall-off curves: {job.get('message') or job.get('state')}")
        device_wait_notice(job, f"{key}_fo")
    else:
        st.rerun(scope="app")
