"""Shared pieces of bench/quality.py and bench/latency.py: data, strategy shapes, scores, baselines.

Strategy shapes are chosen so the estimated parameter count is within ~2% of GOAL (75%) of the
source: depth from `preset_targets(spec, "depth-75")`, MLP-only from "mlp-75", and the mixed
shapes from fixed head / hidden / layer cuts with the MLP width solved for the budget.

Baseline importance (same shapes, other unit choices):
- random: every score tensor replaced by uniform noise (seeded);
- magnitude: weight norms, no data. Head h of a layer: ||W_q rows of h||_F + ||W_o columns of h||_F;
  neuron j: ||gate row j|| * ||up row j|| * ||down column j|| (the three weights that touch it);
  embedding channel c: ||E[:, c]||; layer i (used as `bi`, so depth keeps the largest): the sum of
  the Frobenius norms of its attention and MLP matrices. Block scores are the sum over the block.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.arch import ArchSpec, get_adapter
from engine.data import DataSource, get_blocks, load_documents, make_blocks, tokenize_documents
from engine.estimate import estimate
from engine.importance import ScoreConfig, Scores, score
from engine.models import LoadedModel
from engine.paths import SHARED_WIKITEXT
from engine.plan import make_plan
from engine.presets import preset_targets
from engine.prune import apply_plan
from engine.refit import refit
from engine.targets import Targets, valid_values

ROOT = Path(__file__).resolve().parents[1]

WIKITEXT = SHARED_WIKITEXT
OUT_DIR = ROOT / "docs" / "quality"
GOAL = 0.75
CALIB_DOCS = (0.0, 0.6)  # shared convention: first 60% of articles for calibration / distillation
EVAL_DOCS = (0.6, 1.0)  # last 40% held out


@dataclass(frozen=True)
class Strategy:
    """A named pruning strategy: its family (depth | width | depth+width) and targets."""

    name: str
    family: str
    label: str
    targets: Targets

    def shape(self) -> tuple:
        """Targets without the unit-selection method (strategies with one shape share it)."""
        return (self.targets.hidden, self.targets.ffn, self.targets.heads, self.targets.layers)


def machine_note() -> str:
    """Load average and cores, to print with every measurement (the machine is shared)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} CPU cores"


def blocks_from(tokenizer, wikitext: Path, docs: tuple[float, float], n: int, seq_len: int,
                seed: int = 0) -> torch.Tensor:
    """(n, seq_len) token blocks from a document range of the WikiText file."""
    return get_blocks(DataSource.parse(str(wikitext), docs=docs), tokenizer, n, seq_len, seed)


def with_ffn_for_goal(spec: ArchSpec, base: Targets, goal: float = GOAL) -> Targets:
    """`base` with the MLP width whose estimated parameter count is closest to goal x source."""
    best = min(range(1, spec.intermediate_size + 1),
               key=lambda f: abs(estimate(spec, replace(base, ffn=f)).fraction_of_source - goal))
    return replace(base, ffn=best)


def _snap_hidden(spec: ArchSpec, heads: int, frac: float) -> int:
    ok = valid_values(spec, Targets(heads=heads))["hidden"]
    return min(ok, key=lambda h: abs(h - spec.hidden_size * frac))


def strategies(spec: ArchSpec, goal: float = GOAL, criterion: str = "activation") -> list[Strategy]:
    """The seven pruning strategies the quality benchmark compares, each at ~goal of the source parameters,
    ranking units by `criterion` (activation, Minitron's: what every strategy row was measured with; the
    criterion rows change it)."""
    pct = round(goal * 100)
    depth = preset_targets(spec, f"depth-{pct}")
    heads = valid_values(spec)["heads"]
    fewer_heads = min(heads, key=lambda h: abs(h - spec.n_heads * 2 / 3))  # 6 of 9 on SmolLM2
    mixed_layers = round(spec.n_layers * 0.9)
    out = [
        Strategy("depth_bi", "depth", "depth, layers by BI", replace(depth, depth_by="bi")),
        Strategy("depth_ppl", "depth", "depth, layers by ppl increase", replace(depth, depth_by="ppl")),
        Strategy("depth_block", "depth", "depth, best contiguous block", replace(depth, depth_by="block")),
        Strategy("width_mlp", "width", "width: MLP", preset_targets(spec, f"mlp-{pct}")),
        Strategy("width_mlp_heads", "width", "width: MLP + heads",
                 with_ffn_for_goal(spec, Targets(heads=fewer_heads), goal)),
        Strategy("width_all", "width", "width: MLP + heads + channels",
                 with_ffn_for_goal(spec, Targets(heads=fewer_heads, hidden=_snap_hidden(spec, fewer_heads, 0.9)),
                                   goal)),
        Strategy("depth_width", "depth+width", "depth + width",
                 with_ffn_for_goal(spec, Targets(layers=mixed_layers, heads=fewer_heads,
                                                 hidden=_snap_hidden(spec, fewer_heads, 0.95)), goal)),
    ]
    return [replace(s, targets=replace(s.targets, criterion=criterion)) for s in out]


def describe_targets(spec: ArchSpec, t: Targets) -> str:
    """e.g. 'L 21, D 576, F 1536, H 9 -> 102.65M (76.3%)'."""
    e = estimate(spec, t)
    s = e.sizes
    return f"L {s.layers}, D {s.hidden}, F {s.ffn}, H {s.heads} -> {e.params / 1e6:.2f}M ({100 * e.fraction_of_source:.1f}%)"


def train_blocks(tokenizer, wikitext: Path, tokens: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    """Distillation blocks from the calibration split: enough for `tokens` (capped at what the split
    holds, in which case distillation cycles over them in epochs)."""
    stream = tokenize_documents(load_documents(DataSource.parse(str(wikitext), docs=CALIB_DOCS)), tokenizer)
    n = min(stream.numel() // seq_len, -(-tokens // seq_len))
    return make_blocks(stream, n, seq_len, seed, what="the calibration split")


def scores_for(loaded: LoadedModel, wikitext: Path, n: int, seq_len: int, drop: int = 0,
               aggregation: str = "l2_mean", depth: bool = True) -> Scores:
    """Cached scores on the calibration split: width and BI, plus (with `depth`) the per-layer ppl
    sweep and the BI of blocks of `drop` layers."""
    cfg = ScoreConfig(aggregation=aggregation, depth_ppl=depth, block_size=drop if depth and drop else None)
    source = DataSource.parse(str(wikitext), docs=CALIB_DOCS)
    t0 = time.perf_counter()
    scores, folder = score(loaded, source, n, seq_len, config=cfg)
    print(f"scores ({aggregation}, {n} x {seq_len}): {folder} [{scores.meta.get('reused')}, "
          f"{time.perf_counter() - t0:.0f}s]", flush=True)
    return scores


def random_scores(like: Scores, seed: int = 0) -> Scores:
    """Scores of the same shapes filled with uniform noise: a random choice of units and layers."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.rand(v.shape, generator=gen) for k, v in like.tensors.items()}
    return Scores(tensors, {**like.meta, "aggregation": "random"})


@torch.no_grad()
def magnitude_scores(model: torch.nn.Module, like: Scores) -> Scores:
    """Weight-norm importance (see the module docstring) in the layout of `like`."""
    a = get_adapter(model)
    hd, per_layer, heads, neurons = a.head_dim, [], [], []
    for p in a.all_layers():
        q = p.q.weight.float().view(a.n_heads, hd, -1)  # (H, hd, D)
        o = p.o.weight.float().view(p.o.weight.shape[0], a.n_heads, hd)  # (D, H, hd)
        heads.append(q.norm(dim=(1, 2)) + o.norm(dim=(0, 2)))
        n = p.up.weight.float().norm(dim=1) * p.down.weight.float().norm(dim=0)
        if p.gate is not None:
            n = n * p.gate.weight.float().norm(dim=1)
        neurons.append(n)
        mats = [m.weight for m in (p.q, p.k, p.v, p.o, p.gate, p.up, p.down) if m is not None]
        per_layer.append(sum(float(w.float().norm()) for w in mats))
    bi = torch.tensor(per_layer)
    tensors = {"heads": torch.stack(heads), "neurons": torch.stack(neurons),
               "channels": a.embed_tokens.weight.float().norm(dim=0), "bi": bi}
    size = like.meta.get("block_size")
    if size:  # low score = dropped: the block with the smallest total norm goes
        tensors["block_bi"] = bi.unfold(0, size, 1).sum(1)
    if like.has("ppl_increase"):
        tensors["ppl_increase"] = bi.clone()
    return Scores({k: v.cpu() for k, v in tensors.items()}, {**like.meta, "aggregation": "magnitude"})


def prune(model: torch.nn.Module, scores: Scores, targets: Targets, calib: torch.Tensor | None = None) -> torch.nn.Module:
    """The pruned copy of `model` (fp32) for these scores and targets; with `targets.refit`, refitted on the
    calibration blocks `calib` (engine.refit)."""
    plan = make_plan(scores, targets)
    student = apply_plan(model, plan).float().eval()
    if targets.refit:
        if calib is None:
            raise ValueError("a refitted student needs the calibration blocks")
        refit(model, student, plan, calib)
    return student


@torch.no_grad()
def reinit(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every weight with the model's own `_init_weights` (random-init baseline).

    `model.init_weights()` is a no-op on weights transformers marks as initialised, so the
    per-module initialiser is applied directly; tied embeddings stay tied."""
    torch.manual_seed(seed)
    model.apply(model._init_weights)
    model.tie_weights()
    return model


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (so a partial run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def unique_by_shape(items: Iterable[Strategy]) -> list[Strategy]:
    """The first strategy of each distinct shape (depth strategies share one)."""
    seen: set[tuple] = set()
    out = []
    for s in items:
        if s.shape() not in seen:
            seen.add(s.shape())
            out.append(s)
    return out


REPORT_COLUMNS = ("name", "group", "shape", "params_M", "ppl_oneshot", "kl_oneshot", "ppl_distilled", "kl_distilled",
                  "loss", "wall_s")


def write_report(out: Path, stem: str, meta: dict, rows: list[dict]) -> str:
    """Write `<stem>.md` (a Markdown table) and `<stem>.html` (plotly bars of held-out perplexity,
    one-shot vs distilled, log scale); returns the table."""
    from engine.evaluate import format_table

    flat = [{**r, "params_M": round(r["params"] / 1e6, 2), "shape": r["shape"].split(" -> ")[0]} for r in rows]
    table = format_table(flat, REPORT_COLUMNS)
    head = (f"# Quality ({stem})\n\nTeacher: {meta['teacher_params'] / 1e6:.2f}M parameters, held-out ppl "
            f"{meta['teacher_ppl']:.3f} on {meta['eval_tokens']} tokens; distillation budget "
            f"{meta['distill_tokens']} tokens per run; command `{meta['command']}`.\n\n"
            + "".join(f"- {line}\n" for line in _run_lines(meta)) + "\n")
    (out / f"{stem}.md").write_text(head + table + "\n")
    if importlib.util.find_spec("plotly") is None:
        return table
    fig = quality_figure(meta, rows, stem)
    fig.write_html(out / f"{stem}.html", include_plotlyjs="cdn")
    try:
        write_png(fig, out / f"{stem}.png")
    except Exception as e:  # the PNG is a convenience; the JSON, table and HTML are the results
        print(f"warning: no {stem}.png ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
    return table


def _run_lines(meta: dict) -> list[str]:
    """One line per invocation that wrote rows: command, wall time, rows added, load notes."""
    runs = meta.get("runs") or [{"command": meta["command"], "wall_s": meta.get("wall_s"),
                                 "machine": meta.get("machine", []), "rows": None}]
    lines = []
    for r in runs:
        n = None if r.get("rows") is None else len(r["rows"])
        added = "earlier rows" if n is None else f"{n} row" + ("" if n == 1 else "s")
        lines.append("; ".join([f"`{r['command']}`: {r.get('wall_s') or 0:.0f} s, {added}", *r.get("machine", [])]))
    return lines


def quality_figure(meta: dict, rows: list[dict], stem: str):
    """Horizontal grouped bars, one row per experiment (top to bottom in run order): held-out
    perplexity one-shot and after distillation, log scale, the teacher as a dotted line."""
    import plotly.graph_objects as go

    names = [f"{r['name']} ({r['params'] / 1e6:.1f}M)" for r in rows][::-1]
    bars = [go.Bar(name=label, y=names, x=[r[key] for r in rows][::-1], orientation="h", marker_color=color,
                   text=[_short(r[key]) for r in rows][::-1], textposition="outside", cliponaxis=False)
            for label, key, color in (("distilled", "ppl_distilled", "#1f77b4"),
                                      ("one-shot", "ppl_oneshot", "#ff7f0e"))]
    fig = go.Figure(bars)
    values = [r[k] for r in rows for k in ("ppl_oneshot", "ppl_distilled") if r[k]] + [meta["teacher_ppl"]]
    x_range = [math.log10(min(values) * 0.8), math.log10(max(values)) + 0.5]  # room for the labels
    fig.add_vline(x=meta["teacher_ppl"], line_dash="dot", line_color="#444")
    # annotations on a log axis take log10 coordinates (add_vline's own annotation would not)
    fig.add_annotation(x=math.log10(meta["teacher_ppl"]), y=1, yref="paper", yanchor="bottom", xanchor="left",
                       text=f"teacher {meta['teacher_ppl']:.1f}", showarrow=False)
    fig.update_layout(barmode="group", template="none", paper_bgcolor="white", plot_bgcolor="white",
                      xaxis=dict(type="log", range=x_range, dtick=1, gridcolor="#e5e5e5",
                                 title="held-out perplexity (log scale; lower is better)"),
                      yaxis=dict(automargin=True),
                      legend=dict(orientation="h", y=1.0, yanchor="bottom", x=1, xanchor="right",
                                  traceorder="reversed"),
                      title=f"Pruned to ~75% of {meta['teacher_params'] / 1e6:.1f}M parameters: "
                            f"one-shot and after {meta['distill_tokens']:,} distillation tokens ({stem})",
                      width=1000, height=160 + 34 * len(rows), margin=dict(l=10, r=60, t=80, b=60),
                      font=dict(size=13))
    return fig


def _short(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}" if x < 1e6 else f"{x:.1e}"


def write_png(fig, path: Path) -> None:
    """Render a plotly figure to PNG with Debian's Chromium through Playwright (no kaleido, no
    network: plotly.js is inlined)."""
    import shutil

    from playwright.sync_api import sync_playwright

    html = fig.to_html(include_plotlyjs=True, full_html=True, config={"staticPlot": True})
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                     args=["--no-sandbox", "--headless", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": fig.layout.width, "height": fig.layout.height})
            page.set_content(html)
            page.wait_for_selector(".main-svg", timeout=30_000)
            page.locator(".plotly-graph-div").first.screenshot(path=str(path))
        finally:
            browser.close()
