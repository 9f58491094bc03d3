"""Pure chart functions for distillation runs: loss curves, held-out perplexity, comparisons."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go

from dashboard.charts import _layout, log_ticks

LOSS_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
NOT_LOSS = {"step", "tokens", "lr", "tokens_per_s", "elapsed", "eval", "ppl", "kl", "time", "epoch",
            "grad_norm", "eta_s"}


def ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average; smoothing in [0, 1)."""
    v = np.asarray(values, dtype=np.float64)
    if smoothing <= 0 or len(v) == 0:
        return v
    out = np.empty_like(v)
    acc, weight = 0.0, 0.0
    for i, x in enumerate(v):
        acc = smoothing * acc + (1 - smoothing) * x
        weight = smoothing * weight + (1 - smoothing)
        out[i] = acc / weight
    return out


def loss_terms(rows: list[dict]) -> list[str]:
    """Names of the loss series in training rows: `loss` first, then every other numeric loss term."""
    names: list[str] = []
    for r in rows[:50]:
        for k, v in r.items():
            if k in NOT_LOSS or k in names or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k == "loss" or "loss" in k or k in ("kd", "ce", "kl_div", "cosine", "mse"):
                names.append(k)
    names = sorted(names, key=lambda k: (k != "loss", k))
    if len(names) == 2 and names[0] == "loss":  # one term: it *is* the loss, do not draw it twice
        return ["loss"]
    return names


def _whole_x(fig: go.Figure, xs: list[float], x: str) -> None:
    """Steps and tokens are whole numbers: no fractional ticks on a short run (plotly picks dtick 0.5 for 0..3)."""
    span = (max(xs) - min(xs)) if xs else 0
    if span <= 10:
        fig.update_xaxes(tick0=0, dtick=1 if x == "step" or span <= 1 else None, tickformat=",d")
    else:
        fig.update_xaxes(tickformat=",d")


def loss_explanation(distill: dict | None) -> str:
    """What the plotted loss is, from the run's distillation settings (weights, temperature)."""
    d = distill or {}
    kl, ce, hid, temp = (float(d.get(k, v)) for k, v in (("kl_weight", 1.0), ("ce_weight", 0.0),
                                                         ("hidden_weight", 0.0), ("temperature", 1.0)))
    terms = []
    if kl:
        terms.append(f"{kl:g} × KL(teacher ‖ student) on the logits" + (f" at temperature {temp:g}" if temp != 1 else ""))
    if ce:
        terms.append(f"{ce:g} × cross-entropy with the next token")
    if hid:
        terms.append(f"{hid:g} × hidden-state distance to the teacher's layers")
    text = " + ".join(terms) or "no loss term has a weight"
    return (f"Loss = {text}; in nats per token, averaged over the batch (0 = the student matches the teacher's "
            "next-token distribution). Faint lines are the raw values, bold ones smoothed.")


def loss_chart(rows: list[dict], smoothing: float = 0.6, log_y: bool = False, x: str = "step",
               terms: list[str] | None = None) -> go.Figure:
    """Training loss (and each loss term) against steps or tokens; raw values shown faintly."""
    rows = [r for r in rows if not r.get("eval")]
    fig = go.Figure()
    terms = terms if terms is not None else loss_terms(rows)
    all_x: list[float] = []
    for i, name in enumerate(terms):
        pts = [(r.get(x, r.get("step", j)), r[name]) for j, r in enumerate(rows)
               if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        if not pts:
            continue
        xs = np.asarray([p[0] for p in pts], dtype=np.float64)
        ys = np.asarray([p[1] for p in pts], dtype=np.float64)
        all_x += xs.tolist()
        color = LOSS_COLORS[i % len(LOSS_COLORS)]
        if smoothing > 0:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=1), opacity=0.25,
                                     showlegend=False, hoverinfo="skip", name=f"{name} (raw)"))
        fig.add_trace(go.Scatter(x=xs, y=ema(ys, smoothing), mode="lines+markers" if len(xs) < 30 else "lines",
                                 line=dict(color=color, width=2), marker=dict(size=4), name=name,
                                 hovertemplate=f"{x} %{{x:,}}<br>{name} %{{y:.4f}}<extra></extra>"))
    fig.update_xaxes(title="tokens" if x == "tokens" else "step")
    _whole_x(fig, all_x, x)
    fig.update_yaxes(title="loss (nats per token)", type="log" if log_y else "linear")
    if not fig.data:
        fig.add_annotation(text="waiting for the first training step…", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper", font=dict(size=14, color="#888"))
    return _layout(fig, "Distillation loss", height=360)


def ppl_chart(rows: list[dict], teacher_ppl: float | None = None, x: str = "step",
              one_shot_ppl: float | None = None, log_y: bool = True) -> go.Figure:
    """Held-out perplexity of the student at each evaluation, with the teacher's as a reference."""
    evals = [r for r in rows if r.get("eval") and isinstance(r.get("ppl"), (int, float))]
    fig = go.Figure()
    if evals:
        xs = [r.get(x, r.get("step", 0)) for r in evals]
        kl = [r.get("kl") for r in evals]
        fig.add_trace(go.Scatter(
            x=xs, y=[r["ppl"] for r in evals], mode="lines+markers", name="student", marker=dict(size=9),
            line=dict(color="#d62728", width=2), customdata=[k if k is not None else float("nan") for k in kl],
            hovertemplate=f"{x} %{{x:,}}<br>perplexity %{{y:.2f}}<br>KL %{{customdata:.4f}}<extra></extra>"))
    xs_all = [r.get(x, r.get("step", 0)) for r in rows if isinstance(r.get(x, r.get("step")), (int, float))]
    span = [min(xs_all), max(xs_all)] if xs_all else [0, 1]
    if teacher_ppl:  # a trace, not add_hline: hline annotations are misplaced on log axes
        fig.add_trace(go.Scatter(x=span, y=[teacher_ppl, teacher_ppl], mode="lines", name=f"teacher ({teacher_ppl:.2f})",
                                 line=dict(color="#2ca02c", dash="dash", width=2),
                                 hovertemplate=f"teacher perplexity {teacher_ppl:.2f}<extra></extra>"))
    if one_shot_ppl and not evals:
        fig.add_trace(go.Scatter(x=span, y=[one_shot_ppl, one_shot_ppl], mode="lines", line=dict(color="#999", dash="dot"),
                                 name=f"pruned, before distillation ({one_shot_ppl:.2f})"))
    fig.update_xaxes(title="tokens" if x == "tokens" else "step")
    _whole_x(fig, xs_all, x)
    fig.update_yaxes(title="perplexity", type="log" if log_y else "linear")
    shown = [r["ppl"] for r in evals] + [v for v in (teacher_ppl, one_shot_ppl if not evals else None) if v]
    if log_y and shown and min(shown) > 0:  # ticks that include the teacher's value, so its line has a label
        ticks = log_ticks(min(shown) / 1.1, max(shown) * 1.1, (round(teacher_ppl, 2),) if teacher_ppl else ())
        fig.update_yaxes(tickvals=ticks, ticktext=[f"{t:.4g}" for t in ticks])
    if not evals and not teacher_ppl:
        fig.add_annotation(text="no evaluation yet", showarrow=False, x=0.5, y=0.5, xref="paper",
                           yref="paper", font=dict(size=14, color="#888"))
    return _layout(fig, "Held-out perplexity", height=360)


def compare_bars(names: list[str], values: list[float | None], title: str, fmt: str | Callable = ".3g",
                 colors: list[str] | None = None) -> go.Figure:
    """A small bar chart comparing one number across models (teacher / one-shot / student).
    fmt: a format spec or a function of the value."""
    colors = colors or ["#2ca02c", "#999999", "#d62728", "#1f77b4"][: len(names)]
    ys = [v if v is not None else 0 for v in values]
    show = fmt if callable(fmt) else (lambda v: format(v, fmt))
    text = [show(v) if v is not None else "n/a" for v in values]
    fig = go.Figure(go.Bar(x=names, y=ys, text=text, textposition="outside", marker_color=colors,
                           hovertemplate="%{x}: %{text}<extra></extra>"))
    fig.update_yaxes(range=[0, max([y for y in ys if y] or [1]) * 1.2])
    return _layout(fig, title, height=280)


SOURCE_COLORS = ["#d62728", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def source_ppl_chart(rows: list[dict], x: str = "step", log_y: bool = True) -> go.Figure:
    """Held-out perplexity per evaluation source (rows of eval_sources.jsonl): one solid line per source
    for the student, a dashed line of the same colour at the teacher's perplexity on that source."""
    fig = go.Figure()
    names = list(dict.fromkeys(r["source"] for r in rows if isinstance(r.get("ppl"), (int, float))))
    xs_all = [r.get(x, r.get("step", 0)) for r in rows]
    span = [min(xs_all), max(xs_all)] if xs_all else [0, 1]
    for i, name in enumerate(names):
        pts = [r for r in rows if r.get("source") == name and isinstance(r.get("ppl"), (int, float))]
        color = SOURCE_COLORS[i % len(SOURCE_COLORS)]
        kl = [r.get("kl") if r.get("kl") is not None else float("nan") for r in pts]
        fig.add_trace(go.Scatter(
            x=[r.get(x, r.get("step", 0)) for r in pts], y=[r["ppl"] for r in pts], mode="lines+markers",
            name=f"{name}: student", line=dict(color=color, width=2), marker=dict(size=7), customdata=kl,
            hovertemplate=f"{name}<br>{x} %{{x:,}}<br>perplexity %{{y:.2f}}<br>KL %{{customdata:.4f}}<extra></extra>"))
        teacher = next((r["teacher_ppl"] for r in pts if r.get("teacher_ppl")), None)
        if teacher:
            fig.add_trace(go.Scatter(x=span, y=[teacher, teacher], mode="lines", name=f"{name}: teacher ({teacher:.2f})",
                                     line=dict(color=color, dash="dash", width=1.5),
                                     hovertemplate=f"{name}: teacher perplexity {teacher:.2f}<extra></extra>"))
    fig.update_xaxes(title="tokens" if x == "tokens" else "step")
    _whole_x(fig, xs_all, x)
    fig.update_yaxes(title="perplexity", type="log" if log_y else "linear")
    if not names:
        fig.add_annotation(text="no evaluation per source yet", showarrow=False, x=0.5, y=0.5, xref="paper",
                           yref="paper", font=dict(size=14, color="#888"))
    return _layout(fig, "Held-out perplexity per source", height=360)


def mix_table(info: list[dict] | None) -> list[dict]:
    """Rows for the Distill page's data-mix table from summary.json's data_mix / calib_mix entries."""
    total = sum(int(m.get("tokens") or 0) for m in info or []) or 1
    return [{"source": m.get("name"), "data": m.get("data"), "weight": f"{float(m.get('weight') or 0):.0%}",
             "blocks": int(m.get("blocks") or 0), "tokens": int(m.get("tokens") or 0),
             "share of tokens": f"{int(m.get('tokens') or 0) / total:.1%}"} for m in info or []]


def source_table(per: dict | None) -> list[dict]:
    """Rows per evaluation source from summary.json's eval_sources: teacher / pruned / distilled
    perplexity, the distilled-to-teacher ratio and the KL."""
    out = []
    for name, r in (per or {}).items():
        t, d = r.get("ppl_teacher"), r.get("ppl_distilled")
        out.append({"source": name, "teacher ppl": t, "pruned ppl": r.get("ppl_one_shot"), "distilled ppl": d,
                    "distilled / teacher": (d / t) if t and d else None,
                    "KL pruned": r.get("kl_one_shot"), "KL distilled": r.get("kl_distilled")})
    return out
