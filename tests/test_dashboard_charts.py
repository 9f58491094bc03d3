"""Pure chart functions of the dashboard: shapes, overlays, binning, smoothing (no Streamlit)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from dashboard import charts, train_charts


def _z(trace) -> np.ndarray:
    return np.asarray(trace.z)


def test_bin_columns_means_and_starts():
    z = np.arange(20, dtype=np.float32).reshape(2, 10)
    binned, starts = charts.bin_columns(z, max_bins=4)
    assert binned.shape == (2, 4) and binned.dtype == np.float32
    assert starts[0] == 0 and len(starts) == 4
    edges = list(starts) + [10]
    for b in range(4):
        np.testing.assert_allclose(binned[0, b], z[0, edges[b]:edges[b + 1]].mean())
    same, s2 = charts.bin_columns(z, max_bins=128)  # fewer columns than bins: unchanged
    np.testing.assert_array_equal(same, z)
    assert list(s2) == list(range(10))


def test_heads_heatmap_overlay_marks_removed_heads():
    heads = np.random.default_rng(0).random((4, 6)).astype(np.float32)
    removed = np.zeros((4, 6), bool)
    removed[1, 2] = removed[3] = True
    fig = charts.heads_heatmap(heads, removed, kv_heads=2)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    base, overlay = fig.data
    np.testing.assert_allclose(_z(base), heads)  # raw values when not normalised
    assert _z(overlay).dtype == np.uint8
    np.testing.assert_array_equal(_z(overlay) == 255, removed)
    assert overlay.hoverinfo == "skip" and overlay.showscale is False
    assert overlay.colorscale[0][1].endswith(", 0)")  # transparent where kept
    # KV-group boundaries: 6 heads in 2 groups -> one separator line
    assert len(fig.layout.shapes) == 1


def test_heads_heatmap_without_cut_has_no_overlay_and_normalises():
    heads = np.array([[1.0, 2.0], [10.0, 40.0]], np.float32)
    fig = charts.heads_heatmap(heads, np.zeros((2, 2), bool), normalise=True)
    assert len(fig.data) == 1
    np.testing.assert_allclose(_z(fig.data[0]), [[0.5, 1.0], [0.25, 1.0]])
    assert "importance" in fig.data[0].hovertemplate


@pytest.mark.parametrize("sort", [True, False])
def test_neurons_heatmap_is_binned_and_overlay_is_fraction(sort):
    rng = np.random.default_rng(1)
    neurons = rng.random((3, 1536)).astype(np.float32)
    removed = np.zeros_like(neurons, bool)
    order = np.argsort(neurons, axis=1)[:, :384]  # the 384 least important per layer
    np.put_along_axis(removed, order, True, axis=1)
    fig = charts.neurons_heatmap(neurons, removed, sort=sort)
    base, overlay = fig.data
    assert _z(base).shape == (3, 128)
    ov = _z(overlay).astype(int)
    # the overlay's total red equals the removed share
    np.testing.assert_allclose(ov.sum(1) / 255 / 128, 0.25, atol=0.01)
    if sort:  # sorted descending: the cut is the right-hand tail
        assert (ov[:, -32:] == 255).all() and (ov[:, :96] == 0).all()


def test_channels_heatmap_and_bar():
    rng = np.random.default_rng(2)
    per_layer = rng.random((4, 40)).astype(np.float32)
    channels = per_layer.sum(0)
    removed = channels < np.quantile(channels, 0.25)
    dropped = np.array([False, True, False, False])
    fig = charts.channels_heatmap(per_layer, removed, dropped)
    ov = _z(fig.data[1])
    assert (ov[1] == 255).all()  # a dropped layer is red across
    np.testing.assert_array_equal(ov[0] == 255, removed)
    bar = charts.channels_bar(channels, removed)
    vals = np.asarray(bar.data[0].y)
    assert (np.diff(vals) <= 0).all()  # sorted descending
    cum = np.asarray(bar.data[1].y)
    assert cum[-1] == pytest.approx(100, abs=1e-3)
    colors = bar.data[0].marker.color
    assert colors[-1] == charts.PRUNED_RED and colors[0] != charts.PRUNED_RED


def test_layers_chart_values_ranks_and_dropped():
    bi = np.array([0.5, 0.1, 0.3, 0.05], np.float32)
    ppl = np.array([9.0, 0.5, 2.0, 0.1], np.float32)
    fig = charts.layers_chart(bi, ppl, np.array([0, 0, 0, 1], bool), spearman=1.0)
    assert [t.name for t in fig.data] == ["BI (1 - cos)", "perplexity increase"]
    assert "Spearman" in fig.layout.title.text
    assert len(fig.layout.shapes) == 1  # one dropped layer band
    ranks = charts.layers_chart(bi, ppl, show="ranks")
    assert list(ranks.data[0].y) == [1, 3, 2, 4]
    only_bi = charts.layers_chart(bi)
    assert len(only_bi.data) == 1


def test_blocks_chart_marks_least_important():
    fig = charts.blocks_chart(np.array([0.3, 0.1, 0.2], np.float32), 2, np.array([3.0, 1.0, 2.0], np.float32))
    assert list(fig.data[0].x) == ["0-1", "1-2", "2-3"]
    assert fig.layout.annotations[0].x == "1-2"


def test_ema_and_loss_chart():
    np.testing.assert_allclose(train_charts.ema(np.array([1.0, 1.0, 1.0]), 0.9), [1, 1, 1])
    np.testing.assert_allclose(train_charts.ema(np.array([1.0, 3.0]), 0.0), [1, 3])
    rows = [{"step": i, "tokens": 100 * i, "loss": 5.0 - 0.1 * i, "kl_loss": 5.0 - 0.1 * i, "lr": 1e-4,
             "tokens_per_s": 10.0, "elapsed_s": i} for i in range(1, 11)]
    rows.append({"eval": True, "step": 10, "tokens": 1000, "ppl": 30.0, "kl": 0.5, "teacher_ppl": 20.0})
    assert train_charts.loss_terms(rows) == ["loss"]  # a single term is the loss itself
    for r in rows[:10]:
        r["ce_loss"] = 1.0
    assert train_charts.loss_terms(rows) == ["loss", "ce_loss", "kl_loss"]
    fig = train_charts.loss_chart(rows, smoothing=0.5, log_y=True, x="tokens")
    assert fig.layout.yaxis.type == "log"
    named = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in named] == ["loss", "ce_loss", "kl_loss"]
    assert list(named[0].x)[-1] == 1000
    empty = train_charts.loss_chart([])
    assert empty.layout.annotations and not empty.data
    ppl = train_charts.ppl_chart(rows, teacher_ppl=20.0)
    assert list(ppl.data[0].y) == [30.0]
    assert ppl.data[1].name.startswith("teacher") and list(ppl.data[1].y) == [20.0, 20.0]


def test_compare_bars_handles_missing():
    fig = train_charts.compare_bars(["a", "b"], [1.5, None], "t", ".2f")
    assert list(fig.data[0].text) == ["1.50", "n/a"]


@pytest.mark.parametrize("targets", [
    {"ffn": 20}, {"heads": 4, "hidden": 36}, {"layers": 3}, {"hidden": 24, "ffn": 11, "heads": 2, "layers": 2},
    {"depth_by": "list", "drop_layers": [0, 2]},
])
def test_cut_masks_match_make_plan(targets):
    """The dashboard's fast overlay masks remove exactly what engine.plan.make_plan removes."""
    import torch
    from tiny_models import tiny_model

    from dashboard.common import cut_masks
    from engine.arch import get_adapter
    from engine.importance import Scores
    from engine.plan import make_plan
    from engine.targets import Targets

    spec = get_adapter(tiny_model("llama")).spec()  # 4 layers, 6 query / 2 KV heads, hidden 48, MLP 37
    g = torch.Generator().manual_seed(0)
    t = {"heads": torch.rand(4, 6, generator=g), "neurons": torch.rand(4, 37, generator=g).round(decimals=1),
         "channels": torch.rand(48, generator=g), "channels_per_layer": torch.rand(4, 48, generator=g),
         "bi": torch.rand(4, generator=g)}
    meta = {"arch": spec.to_dict()}
    targets = {"criterion": "activation", **targets}  # the scores above are activation's alone
    plan = make_plan(Scores(t, meta), Targets.from_dict(targets))
    m = cut_masks({k: v.numpy() for k, v in t.items()}, meta, targets)
    assert [i for i in range(4) if not m["layers"][i]] == plan.kept_layers
    for j, i in enumerate(plan.kept_layers):
        assert list(np.flatnonzero(~m["heads"][i])) == plan.heads[j]
        assert list(np.flatnonzero(~m["neurons"][i])) == plan.neurons[j]  # ties (rounded scores) included
    assert list(np.flatnonzero(~m["channels"])) == plan.channels


def test_layers_chart_puts_a_huge_perplexity_increase_on_a_log_axis():
    """Layer 0 of SmolLM2 raises perplexity by ~157k, the others by 0.1-20: on a linear axis they vanish."""
    rng = np.random.default_rng(3)
    bi = rng.random(30).astype(np.float32)
    ppl = rng.uniform(0.1, 20, 30).astype(np.float32)
    ppl[0], ppl[7] = 157_000, -0.3  # removing a layer can also lower perplexity a little
    fig = charts.layers_chart(bi, ppl)
    ax = fig.layout.yaxis2
    assert ax.type == "log" and "log scale" in ax.title.text and "≤ 0" in ax.title.text
    bars = np.asarray(fig.data[1].y, np.float64)
    assert (bars > 0).all() and np.log10(bars.min()) > ax.range[0]  # every layer drawn above the axis floor
    assert np.log10(157_000) < ax.range[1] and max(ax.tickvals) >= 1e5 and min(ax.tickvals) <= ppl[ppl > 0].min()
    assert fig.data[1].customdata[7][0] == pytest.approx(-0.3)  # hover shows the true value
    flat = charts.layers_chart(bi, np.linspace(1, 5, 30).astype(np.float32))
    assert flat.layout.yaxis2.type != "log"  # a small spread keeps its linear axis
    blocks = charts.blocks_chart(np.array([0.3, 0.1], np.float32), 2, np.array([90_000.0, 2.0], np.float32))
    assert blocks.layout.yaxis2.type == "log"


def test_channels_bar_label_clear_of_legend_and_full_cumulative_axis():
    c = np.random.default_rng(4).random(576).astype(np.float32)
    removed = c < np.quantile(c, 0.17)
    fig = charts.channels_bar(c, removed)
    note = fig.layout.annotations[0]
    assert note.text.startswith("keep 478:") and note.yref == "paper" and note.y < 0.5  # inside, far from the top
    assert fig.layout.legend.y >= 1.0 and fig.layout.legend.yanchor == "bottom"  # the legend sits above the plot
    y2 = fig.layout.yaxis2
    assert y2.autorange is False and list(y2.range) == [0, 100.5] and list(y2.ticktext)[-1] == "100%"


@pytest.mark.parametrize("normalise", [True, False])
def test_heatmap_hover_shows_raw_value_and_share(normalise):
    heads = np.array([[1.0, 4.0], [10.0, 40.0]], np.float32)
    neurons = np.random.default_rng(5).random((2, 300)).astype(np.float32)
    figs = [charts.heads_heatmap(heads, normalise=normalise), charts.neurons_heatmap(neurons, normalise=normalise),
            charts.channels_heatmap(neurons, normalise=normalise)]
    for fig in figs:
        t = fig.data[0]
        assert ("of the layer's largest" in t.hovertemplate) is normalise
        assert ("layer's largest" in t.colorbar.title.text) is normalise  # no bare "rel."
    custom = np.asarray(figs[0].data[0].customdata)
    np.testing.assert_allclose(custom[..., 1], heads)  # raw value
    np.testing.assert_allclose(custom[..., 2], [[0.25, 1.0], [0.25, 1.0]])  # share of the row's largest


def test_short_runs_have_whole_step_ticks_and_a_labelled_teacher_line():
    rows = [{"step": i, "tokens": 256 * i, "loss": 3.0 - 0.2 * i} for i in range(1, 4)]
    rows += [{"eval": True, "step": s, "tokens": 256 * s, "ppl": p, "kl": 0.3} for s, p in ((0, 95.0), (3, 61.0))]
    loss = train_charts.loss_chart(rows, smoothing=0)
    assert loss.layout.xaxis.dtick == 1 and loss.layout.xaxis.tickformat == ",d"
    assert "nats per token" in loss.layout.yaxis.title.text
    ppl = train_charts.ppl_chart(rows, teacher_ppl=21.37)
    assert ppl.layout.xaxis.dtick == 1 and 21.37 in ppl.layout.yaxis.tickvals
    ticks = list(ppl.layout.yaxis.tickvals)
    assert min(ticks) <= 21.37 and max(ticks) >= 61 and len(ticks) >= 3
    long = train_charts.loss_chart([{"step": i, "loss": 1.0} for i in range(0, 500, 10)])
    assert long.layout.xaxis.dtick is None and long.layout.xaxis.tickformat == ",d"


def test_loss_explanation_names_the_terms():
    kl_only = train_charts.loss_explanation({"kl_weight": 1.0, "ce_weight": 0.0, "hidden_weight": 0.0})
    assert "KL(teacher ‖ student)" in kl_only and "nats per token" in kl_only and "cross-entropy" not in kl_only
    mixed = train_charts.loss_explanation({"kl_weight": 1.0, "ce_weight": 0.5, "temperature": 2.0})
    assert "0.5 × cross-entropy" in mixed and "temperature 2" in mixed
