"""Pure chart functions: numpy arrays in, plotly figures out (no Streamlit, unit-tested).

Heatmaps use float32 arrays; what the current targets would remove is drawn on top as a second
heatmap of a uint8 mask with a transparent-to-red colour scale (255 = removed, values between
mean "part of this bin is removed").
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

# No template machinery: plotly's default template (and "plotly_white") cost ~0.5 s to load and deep-copy
# on the first figure of a process, which is most of a warm dashboard start. _layout sets the same
# light look ("plotly_white"'s colours) directly.
pio.templates.default = "none"
_GRID = "#EBF0F8"
_AXIS = dict(gridcolor=_GRID, linecolor=_GRID, zerolinecolor=_GRID, automargin=True)

PRUNED_RED = "rgba(220, 30, 30, 0.85)"
OVERLAY_SCALE = [[0.0, "rgba(220, 30, 30, 0)"], [1.0, PRUNED_RED]]
HEAT_SCALE = "Blues"  # light = unimportant, dark = important; red overlays stand out on it
BI_COLOR = "#1f77b4"
PPL_COLOR = "#ff7f0e"
TAYLOR_COLOR = "#2ca02c"
MAX_BINS = 128
REL_TITLE = "share of the<br>layer's largest"  # colour bar of row-normalised heatmaps
LOG_SPAN = 30.0  # a positive series whose largest / smallest value exceeds this goes on a log axis


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0, xanchor="left", font=dict(size=15)), height=height,
                      margin=dict(l=60, r=20, t=50, b=45), paper_bgcolor="white", plot_bgcolor="white",
                      font=dict(color="#2a3f5f"), hoverlabel=dict(align="left"),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1))
    fig.update_xaxes(**_AXIS)
    fig.update_yaxes(**_AXIS)
    return fig


def _vline(x: float, color: str, width: float = 2, dash: str = "solid") -> dict:
    """A vertical line shape across the plot (a plain dict: add_vline is slow in a hot path)."""
    return dict(type="line", x0=x, x1=x, y0=0, y1=1, xref="x", yref="paper", line=dict(color=color, width=width,
                                                                                      dash=dash))


def _right_axis(title: str, **kw) -> dict:
    return dict(title=dict(text=title), overlaying="y", side="right", showgrid=False, **kw)


def _normalise_rows(z: np.ndarray) -> np.ndarray:
    """Each row divided by its max, so layers with small activations stay readable."""
    peak = np.abs(z).max(axis=1, keepdims=True)
    return z / np.where(peak > 0, peak, 1.0)


def _value_hover(i: int, normalise: bool, what: str = "importance") -> str:
    """Hover line with the raw value (customdata[i]) and, when colours are relative, its share (customdata[i+1])."""
    share = f" (%{{customdata[{i + 1}]:.0%}} of the layer's largest)" if normalise else ""
    return f"{what} %{{customdata[{i}]:.4g}}{share}"


def needs_log(values: np.ndarray) -> bool:
    """True when a series spans so many orders of magnitude that a linear axis flattens most of it."""
    v = np.asarray(values, np.float64)
    pos = v[np.isfinite(v) & (v > 0)]
    return len(pos) >= 2 and float(pos.max()) / float(pos.min()) > LOG_SPAN


def log_floor(values: np.ndarray) -> float:
    """Where values <= 0 are drawn on a log axis: a decade under the smallest positive value."""
    v = np.asarray(values, np.float64)
    pos = v[np.isfinite(v) & (v > 0)]
    return float(pos.min()) / 10 if len(pos) else 1e-3


def log_ticks(lo: float, hi: float, extra: tuple[float, ...] = ()) -> list[float]:
    """Tick values for a log axis from lo to hi: 1-2-5 steps of each decade (thinned to about 8), plus `extra`."""
    lo, hi = max(lo, 1e-12), max(hi, lo * 1.0001)
    ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    if len(ticks) > 8:
        ticks = [t for t in ticks if str(t).lstrip("0.").startswith("1")]
    if len(ticks) < 2:  # less than a decade: evenly spaced in log, rounded to 2 significant digits
        ticks = [float(f"{x:.2g}") for x in np.geomspace(lo, hi, 5)]
    near = [t for t in ticks for e in extra if e > 0 and abs(np.log10(t / e)) < 0.03]  # would overlap its label
    return sorted((set(ticks) - set(near)) | {float(x) for x in extra})


def _overlay(mask: np.ndarray, x=None, y=None) -> go.Heatmap:
    """A transparent-to-red heatmap of a uint8 mask (0 kept .. 255 removed); never takes hover."""
    return go.Heatmap(z=np.asarray(mask, dtype=np.uint8), x=x, y=y, zmin=0, zmax=255,
                      colorscale=OVERLAY_SCALE, showscale=False, hoverinfo="skip", name="would be pruned",
                      xgap=0, ygap=0)


def bin_columns(z: np.ndarray, max_bins: int = MAX_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Mean over groups of adjacent columns so at most `max_bins` remain.

    Returns (binned (rows, bins) float32, bin start indices). Bins differ in width by at most one.
    """
    z = np.asarray(z, dtype=np.float32)
    n = z.shape[1]
    bins = min(max_bins, n)
    edges = np.linspace(0, n, bins + 1).round().astype(int)
    out = np.add.reduceat(z, edges[:-1], axis=1) / np.diff(edges)[None, :]
    return out.astype(np.float32), edges[:-1]


def heads_heatmap(heads: np.ndarray, removed: np.ndarray | None = None, kv_heads: int = 1,
                  normalise: bool = False) -> go.Figure:
    """Layer x query-head importance; `removed` (L, H) bool marks heads the targets would cut."""
    z = np.asarray(heads, dtype=np.float32)
    shown = _normalise_rows(z) if normalise else z
    n_layers, n_heads = z.shape
    group = max(1, n_heads // max(1, kv_heads))
    custom = np.stack([np.broadcast_to(np.arange(n_heads) // group, z.shape), z, _normalise_rows(z)], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=shown.astype(np.float32), colorscale=HEAT_SCALE, customdata=custom.astype(np.float32),
        colorbar=dict(title=REL_TITLE if normalise else "importance", thickness=12),
        hovertemplate="layer %{y}<br>head %{x} (KV group %{customdata[0]})<br>"
                      f"{_value_hover(1, normalise)}<extra></extra>",
    ))
    if removed is not None and removed.any():
        fig.add_trace(_overlay(np.asarray(removed, dtype=np.uint8) * 255))
    # KV-group boundaries
    fig.update_layout(shapes=[_vline(g * group - 0.5, "white") for g in range(1, n_heads // group)])
    fig.update_xaxes(title="query head", dtick=1 if n_heads <= 32 else None)
    fig.update_yaxes(title="layer", autorange="reversed", dtick=1 if n_layers <= 40 else None)
    return _layout(fig, "Attention heads", height=max(300, 60 + 16 * n_layers))


def experts_heatmap(experts: np.ndarray, frequency: np.ndarray, layers: list[int],
                    removed: np.ndarray | None = None, normalise: bool = False) -> go.Figure:
    """Layer x expert importance of a mixture of experts (router-weighted L2 of each expert's output), the
    router's selection frequency in the hover; rows are the sparse layers `layers` (source indices),
    `removed` (S, E) bool marks experts the targets would cut."""
    z = np.asarray(experts, dtype=np.float32)  # (S, E)
    freq = np.asarray(frequency, dtype=np.float32)
    shown = _normalise_rows(z) if normalise else z
    custom = np.stack([z, _normalise_rows(z), freq], axis=-1)
    y = [str(i) for i in layers]
    fig = go.Figure(go.Heatmap(
        z=shown.astype(np.float32), y=y, colorscale=HEAT_SCALE, customdata=custom.astype(np.float32),
        colorbar=dict(title=REL_TITLE if normalise else "importance", thickness=12),
        hovertemplate="layer %{y}<br>expert %{x}<br>" + _value_hover(0, normalise)
                      + "<br>selected for %{customdata[2]:.1%} of tokens<extra></extra>",
    ))
    if removed is not None and removed.any():
        fig.add_trace(_overlay(np.asarray(removed, dtype=np.uint8) * 255, y=y))
    fig.update_xaxes(title="expert", dtick=1 if z.shape[1] <= 64 else None)
    fig.update_yaxes(title="layer", type="category", autorange="reversed")
    return _layout(fig, "Experts", height=max(300, 60 + 16 * z.shape[0]))


def neurons_heatmap(neurons: np.ndarray, removed: np.ndarray | None = None, sort: bool = True,
                    normalise: bool = True, max_bins: int = MAX_BINS) -> go.Figure:
    """Layer x MLP-neuron importance, binned to <= max_bins columns.

    sort=True sorts each layer's neurons by importance (descending) before binning, so the cut
    shows up as a red tail; sort=False keeps the raw neuron order.
    """
    z = np.asarray(neurons, dtype=np.float32)
    n_layers, n = z.shape
    rm = np.zeros_like(z, dtype=np.float32) if removed is None else np.asarray(removed, dtype=np.float32)
    if sort:
        order = np.argsort(-z, axis=1, kind="stable")
        z = np.take_along_axis(z, order, axis=1)
        rm = np.take_along_axis(rm, order, axis=1)
    binned, starts = bin_columns(z, max_bins)
    frac, _ = bin_columns(rm, max_bins)
    ends = np.append(starts[1:], n) - 1
    shown = _normalise_rows(binned) if normalise else binned
    label = "rank" if sort else "neuron"
    custom = np.stack([np.broadcast_to(starts, binned.shape), np.broadcast_to(ends, binned.shape), frac * 100,
                       binned, _normalise_rows(binned)], axis=-1).astype(np.float32)
    fig = go.Figure(go.Heatmap(
        z=shown.astype(np.float32), colorscale=HEAT_SCALE, customdata=custom,
        colorbar=dict(title=REL_TITLE if normalise else "importance", thickness=12),
        hovertemplate=f"layer %{{y}}<br>{label}s %{{customdata[0]:.0f}}-%{{customdata[1]:.0f}}<br>"
                      f"{_value_hover(3, normalise, 'mean importance')}<br>would be pruned %{{customdata[2]:.0f}}%"
                      "<extra></extra>",
    ))
    if removed is not None and rm.any():
        fig.add_trace(_overlay(np.rint(frac * 255)))
    fig.update_xaxes(title=f"{label} bin ({n} neurons in {binned.shape[1]} bins"
                           f"{', sorted per layer' if sort else ''})")
    fig.update_yaxes(title="layer", autorange="reversed", dtick=1 if n_layers <= 40 else None)
    return _layout(fig, "MLP neurons", height=max(300, 60 + 16 * n_layers))


def channels_heatmap(per_layer: np.ndarray, removed: np.ndarray | None = None,
                     dropped_layers: np.ndarray | None = None, normalise: bool = True,
                     max_bins: int = 192) -> go.Figure:
    """Layer x embedding-channel importance (raw channel order, binned if wide).

    removed: (D,) bool, channels the hidden-size target would cut (they go from every layer).
    dropped_layers: (L,) bool, layers the depth target would remove (their whole row is red).
    """
    z = np.asarray(per_layer, dtype=np.float32)
    n_layers, d = z.shape
    mask = np.zeros_like(z, dtype=np.float32)
    if removed is not None:
        mask[:, np.asarray(removed, dtype=bool)] = 1.0
    binned, starts = bin_columns(z, max_bins)
    frac, _ = bin_columns(mask, max_bins)
    if dropped_layers is not None:
        frac[np.asarray(dropped_layers, dtype=bool), :] = 1.0
    ends = np.append(starts[1:], d) - 1
    shown = _normalise_rows(binned) if normalise else binned
    custom = np.stack([np.broadcast_to(starts, binned.shape), np.broadcast_to(ends, binned.shape), binned,
                       _normalise_rows(binned)], axis=-1).astype(np.float32)
    span = "channel %{customdata[0]:.0f}" if binned.shape[1] == d else \
        "channels %{customdata[0]:.0f}-%{customdata[1]:.0f}"
    fig = go.Figure(go.Heatmap(
        z=shown.astype(np.float32), colorscale=HEAT_SCALE, customdata=custom,
        colorbar=dict(title=REL_TITLE if normalise else "importance", thickness=12),
        hovertemplate=f"layer %{{y}}<br>{span}<br>{_value_hover(2, normalise)}<extra></extra>",
    ))
    if frac.any():
        fig.add_trace(_overlay(np.rint(frac * 255)))
    fig.update_xaxes(title="embedding channel" + (f" ({d} in {binned.shape[1]} bins)" if binned.shape[1] < d else ""))
    fig.update_yaxes(title="layer", autorange="reversed", dtick=1 if n_layers <= 40 else None)
    return _layout(fig, "Embedding channels per layer", height=max(300, 60 + 16 * n_layers))


def channels_bar(channels: np.ndarray, removed: np.ndarray | None = None) -> go.Figure:
    """Channels sorted by importance (bars) with cumulative share of importance (line, right axis)."""
    c = np.asarray(channels, dtype=np.float32)
    order = np.argsort(-c, kind="stable")
    vals = c[order]
    total = float(vals.sum()) or 1.0
    cum = np.cumsum(vals, dtype=np.float64) / total * 100
    rank = np.arange(len(c))
    rm = np.zeros(len(c), bool) if removed is None else np.asarray(removed, bool)[order]
    colors = np.where(rm, PRUNED_RED, BI_COLOR)
    fig = go.Figure([
        go.Bar(x=rank, y=vals, marker=dict(color=colors.tolist(), line=dict(width=0)),
               customdata=order.astype(np.int32), name="importance",
               hovertemplate="rank %{x}: channel %{customdata}<br>importance %{y:.4g}<extra></extra>"),
        go.Scatter(x=rank, y=cum.astype(np.float32), mode="lines", name="cumulative %", yaxis="y2",
                   line=dict(color="#444", width=2), hovertemplate="top %{x} channels hold %{y:.1f}%<extra></extra>"),
    ])
    kept = int((~rm).sum())
    shapes, notes = [], []
    if removed is not None and kept < len(c):
        shapes.append(_vline(kept - 0.5, PRUNED_RED, 2, "dash"))
        # inside the plot, under its top edge, left of the cut line: clear of the legend above the plot
        notes.append(dict(x=kept - 0.5, y=0.06, xref="x", yref="paper", xanchor="right", yanchor="bottom",
                          showarrow=False, text=f"keep {kept}: {cum[kept - 1]:.1f}% of importance ",
                          bgcolor="rgba(255, 255, 255, 0.85)", font=dict(color=PRUNED_RED)))
    fig.update_layout(bargap=0, shapes=shapes, annotations=notes,
                      xaxis=dict(title=dict(text="channel rank (most important first)")),
                      yaxis=dict(title=dict(text="importance")),
                      yaxis2=_right_axis("cumulative share of importance", range=[0, 100.5], autorange=False,
                                         tickvals=[0, 25, 50, 75, 100],
                                         ticktext=["0%", "25%", "50%", "75%", "100%"]))
    return _layout(fig, "Embedding channels, sorted", height=360)


def _ranks(v: np.ndarray) -> np.ndarray:
    """1 = most important."""
    return (np.argsort(np.argsort(-np.asarray(v), kind="stable"), kind="stable") + 1).astype(np.int32)


def layers_chart(bi: np.ndarray, ppl_increase: np.ndarray | None = None, dropped: np.ndarray | None = None,
                 taylor: np.ndarray | None = None, spearman: float | None = None,
                 show: str = "values") -> go.Figure:
    """Per-layer block importance and perplexity increase side by side (bars, two y axes).

    show="ranks" plots each metric's rank instead (1 = most important), on one shared axis.
    Layers the depth target would drop get a red band.
    """
    bi = np.asarray(bi, dtype=np.float32)
    x = np.arange(len(bi))
    series = [("BI (1 - cos)", bi, BI_COLOR, False)]
    if ppl_increase is not None:
        series.append(("perplexity increase", np.asarray(ppl_increase, np.float32), PPL_COLOR, True))
    if taylor is not None:
        series.append(("Taylor+", np.asarray(taylor, np.float32), TAYLOR_COLOR, True))
    ranks_mode = show == "ranks"
    two_axes = len(series) > 1 and not ranks_mode
    right_vals = np.concatenate([v for _, v, _, right in series if right]) if two_axes else np.zeros(0)
    log_right = two_axes and needs_log(right_vals)  # one layer's huge increase would flatten all the others
    floor = log_floor(right_vals) if log_right else 0.0
    traces = []
    for i, (name, v, color, right) in enumerate(series):
        r = _ranks(v)
        y = r if ranks_mode else (np.maximum(v, floor) if log_right and right else v)
        traces.append(go.Bar(x=x, y=y, name=name, marker_color=color, offsetgroup=str(i),
                             yaxis="y2" if two_axes and right else "y",
                             customdata=np.stack([v, r], axis=-1).astype(np.float32),
                             hovertemplate=f"layer %{{x}}<br>{name} %{{customdata[0]:.4g}}"
                                           "<br>rank %{customdata[1]:.0f}<extra></extra>"))
    fig = go.Figure(traces)
    if dropped is not None:  # a red band behind each layer the depth target drops
        fig.update_layout(shapes=[dict(type="rect", x0=i - 0.5, x1=i + 0.5, y0=0, y1=1, xref="x", yref="paper",
                                       fillcolor="rgba(214, 39, 40, 0.16)", line=dict(width=0), layer="below")
                                  for i in np.flatnonzero(np.asarray(dropped, bool))])
    title = "Layers: BI vs perplexity increase" if ppl_increase is not None else "Layers: block importance (BI)"
    if spearman is not None and np.isfinite(spearman):
        title += f"  (Spearman ρ = {spearman:.2f})"
    fig.update_layout(barmode="group", bargap=0.25,
                      xaxis=dict(title=dict(text="layer"), dtick=1 if len(bi) <= 40 else None),
                      yaxis=dict(title=dict(text="rank (1 = most important)" if ranks_mode else "BI"),
                                 autorange="reversed" if ranks_mode else True))
    if two_axes:
        label = "Δ perplexity / Taylor+" if taylor is not None else "Δ perplexity"
        fig.update_layout(yaxis2=_log_axis(label, right_vals, floor) if log_right else _right_axis(label))
    return _layout(fig, title, height=380)


def _log_axis(label: str, values: np.ndarray, floor: float) -> dict:
    """A right-hand log axis for a series spanning orders of magnitude; values <= 0 sit at `floor`."""
    v = np.asarray(values, np.float64)
    hi = float(v[np.isfinite(v)].max())
    clipped = bool((v <= 0).any())
    ticks = log_ticks(floor, hi)
    return _right_axis(f"{label} (log scale{', values ≤ 0 at the bottom' if clipped else ''})", type="log",
                       tickvals=ticks, ticktext=[f"{t:.3g}" for t in ticks],
                       range=[np.log10(floor) - 0.05, np.log10(hi) + 0.15])


def blocks_chart(block_bi: np.ndarray, block_size: int, block_ppl: np.ndarray | None = None) -> go.Figure:
    """Importance of each contiguous block of `block_size` layers, by its first layer."""
    v = np.asarray(block_bi, np.float32)
    x = np.arange(len(v))
    labels = [f"{i}-{i + block_size - 1}" for i in x]
    fig = go.Figure(go.Bar(x=labels, y=v, name="block BI", marker_color=BI_COLOR, offsetgroup="0",
                           hovertemplate="layers %{x}<br>BI %{y:.4g}<extra></extra>"))
    if block_ppl is not None:
        bp = np.asarray(block_ppl, np.float32)
        log = needs_log(bp)
        floor = log_floor(bp) if log else 0.0
        fig.add_trace(go.Bar(x=labels, y=np.maximum(bp, floor) if log else bp, name="perplexity increase",
                             marker_color=PPL_COLOR, offsetgroup="1", yaxis="y2", customdata=bp,
                             hovertemplate="layers %{x}<br>Δ ppl %{customdata:.4g}<extra></extra>"))
        fig.update_layout(yaxis2=_log_axis("Δ perplexity", bp, floor) if log else _right_axis("Δ perplexity"))
    best = int(np.argmin(v))
    fig.update_layout(barmode="group", xaxis=dict(title=dict(text=f"contiguous block of {block_size} layers")),
                      yaxis=dict(title=dict(text="BI")),
                      annotations=[dict(x=labels[best], y=float(v[best]), text="least important", showarrow=True,
                                        arrowhead=2)])
    return _layout(fig, f"Contiguous blocks of {block_size} layers", height=340)


CRITERION_COLORS = {"activation": BI_COLOR, "weighted": PPL_COLOR, "product": TAYLOR_COLOR, "random": "#999999"}


def falloff_chart(curves: list[dict], layer: int, axis: str, metric: str = "rel_rmse") -> go.Figure:
    """Error of one layer's output as its lowest-ranked units are zeroed, one line per criterion.

    curves: FalloffCurve.to_dict() rows (criterion, fractions, rel_rmse, cosine); metric: rel_rmse | cosine.
    The random-order curve is dashed: a criterion is useful where it stays under it (above it for cosine).
    """
    if metric not in ("rel_rmse", "cosine"):
        raise ValueError(f"metric must be rel_rmse or cosine, got {metric!r}")
    label = "relative RMSE of the output" if metric == "rel_rmse" else "cosine to the untouched output"
    fig = go.Figure()
    for c in curves:
        name = c["criterion"]
        fig.add_trace(go.Scatter(
            x=np.asarray(c["fractions"], dtype=np.float32) * 100, y=np.asarray(c[metric], dtype=np.float32),
            mode="lines+markers", name=name, line=dict(color=CRITERION_COLORS.get(name), width=2,
                                                       dash="dash" if name == "random" else "solid"),
            hovertemplate=f"{name}<br>%{{x:.0f}}% of the {axis} zeroed<br>{label}: %{{y:.4f}}<extra></extra>"))
    fig.update_layout(xaxis=dict(title=dict(text=f"lowest-ranked {axis} zeroed (%)"), range=[0, 100]),
                      yaxis=dict(title=dict(text=label)))
    return _layout(fig, f"Layer {layer}: how sharply {axis} importance falls off", height=380)
