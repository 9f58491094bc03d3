"""Search page: every valid shape within a parameter budget, previewed one-shot, then a tournament of
the best K distilled side by side; the winner is promoted to a full prune + distill run.

The search runs as a "search" job (engine.search); this page starts it and reads its run folder.
The run's name lives in the URL (`?search=<name>`), so a refresh or a dashboard restart reattaches.
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from dashboard import state
from dashboard.common import current_model_info, have_scores, scores_folder, user_message
from dashboard.preview import quality_map, rank_stability, tournament_chart

AXIS_LABELS = {"hidden": "Hidden size", "ffn": "MLP size", "heads": "Query heads", "layers": "Layers"}

st.title("Search")
st.caption("Minitron's lightweight architecture search: every valid shape within the budget is pruned one-shot "
           "and scored by KL(teacher ‖ pruned) on held-out text; the best K are then distilled on the same "
           "batches to see whether the one-shot ranking holds.")


def searches() -> list[dict]:
    """Search runs of the session's model, newest first."""
    from engine.runs import list_runs

    return [r for r in list_runs(state.runs_root())
            if r["config"].get("kind") == "search" and r["config"].get("model") == state.get("model")]


@st.cache_data(max_entries=64, show_spinner=False)
def _shapes(spec_dict: dict, space_dict: dict) -> list[dict]:
    """enumerate_shapes, cached by its inputs (about a second on an 8B model's millions of combinations)."""
    from engine.arch.base import ArchSpec
    from engine.search.shapes import SearchSpace, enumerate_shapes

    return [s.to_dict() for s in enumerate_shapes(ArchSpec.from_dict(spec_dict), SearchSpace.from_dict(space_dict))]


def _space_form(spec) -> dict | None:
    """The search space widgets; returns SearchSpace fields, or None when invalid (after an error)."""
    from engine.search.shapes import SearchSpace
    from engine.targets import AXES

    c1, c2, c3 = st.columns(3)
    budget = c1.slider("Parameter budget (% of the source)", 10, 100, 75, key="s_budget") / 100
    tol = c2.slider("Tolerance (±%)", 0.5, 10.0, 2.0, step=0.5, key="s_tol") / 100
    rounding = c3.selectbox("Width rounding", [0, 1, 8, 32, 64, 128], key="s_round",
                            format_func=lambda r: "auto (64 where the width allows)" if r == 0 else f"multiples of {r}")
    axes = st.multiselect("Axes that may change", list(AXES), default=list(AXES), key="s_axes",
                          format_func=AXIS_LABELS.get)
    bounds = {}
    with st.expander("Bounds per axis"):
        source = {"hidden": spec.hidden_size, "ffn": spec.intermediate_size, "heads": spec.n_heads,
                  "layers": spec.n_layers}
        for axis in axes:
            lo, hi = st.slider(AXIS_LABELS[axis], 1, source[axis], (1, source[axis]), key=f"s_b_{axis}")
            if (lo, hi) != (1, source[axis]):
                bounds[axis] = (lo, hi)
    try:
        space = SearchSpace(budget=budget, tolerance=tol, axes=tuple(axes), bounds=bounds, rounding=rounding)
        shapes = _shapes(spec.to_dict(), space.to_dict())
    except Exception as e:  # noqa: BLE001 - engine.errors.UserError: shown as one line
        st.error(user_message(e))
        return None
    kinds = {k: sum(1 for s in shapes if s["kind"] == k) for k in ("depth", "width", "mixed")}
    st.info(f"{len(shapes)} valid shapes within {100 * budget:.0f}% ± {100 * tol:g}% of the parameters "
            f"({', '.join(f'{n} {k}' for k, n in kinds.items() if n)}).")
    return space.to_dict()


def start_form() -> None:
    info = current_model_info()
    if info is None:
        st.stop()
    from engine.arch.base import ArchSpec

    space = _space_form(ArchSpec.from_dict(info["arch"]))
    d = state.defaults()
    c1, c2, c3 = st.columns(3)
    top = c1.number_input("Tournament size K", 1, 16, 4 if d.device == "cpu" else 8, key="s_top")
    steps = c2.number_input("Distillation steps per candidate", 1, 10000, 8 if d.device == "cpu" else 200,
                            key="s_steps")
    halving = c3.toggle("Successive halving", key="s_halving",
                        help="The worse half stops at each of log2(K) checkpoints; its budget goes to the rest.")
    if space is None or not st.button("Start search", type="primary", key="s_start", icon=":material/search:"):
        return
    from dashboard.preview import held_out_range
    from engine.runs import start_job
    from engine.search.job import SearchConfig, cpu_distill, create_search

    rng = held_out_range(state.get("data_range") or "0:0.6")
    if rng is None:
        st.error("The calibration range uses every document: set a range like 0:0.6 on Model and data.")
        return
    from dataclasses import replace

    dcfg = replace(cpu_distill(), steps=int(steps), eval_every=max(1, int(steps) // 4),
                   checkpoint_every=max(1, int(steps) // 4), batch_size=d.batch if d.device != "cpu" else 2)
    folder = scores_folder()
    cfg = SearchConfig(model=state.get("model"), data=state.get("data"), text_column=state.get("text_column") or None,
                       train_range=tuple(float(x) for x in (state.get("data_range") or "0:0.6").split(":")),
                       eval_range=rng, space=space, scores=str(folder) if have_scores(folder) else None,
                       top=int(top), halving=bool(halving), distill=dcfg, device=d.device)
    name = f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run = create_search(state.runs_root() / name, cfg)
        start_job(run.path)
    except Exception as e:  # noqa: BLE001
        st.error(f"Could not start the search: {user_message(e)}")
        return
    st.query_params["search"] = name
    st.rerun()


def candidates_table(rows: list[dict]) -> list[dict]:
    """Table rows, best one-shot KL first."""
    out = []
    for rank, r in enumerate(sorted(rows, key=lambda r: (r["kl"], r["name"])), 1):
        s = r.get("sizes") or {}
        out.append({"rank": rank, "shape": r["name"], "kind": r.get("kind"), "layers": s.get("layers"),
                    "heads": s.get("heads"), "hidden": s.get("hidden"), "MLP": s.get("ffn"), "params": r["params"],
                    "% of source": round(100 * r["fraction"], 2), "one-shot KL": r["kl"], "perplexity": r["ppl"]})
    return out


def controls(path: Path, status: dict) -> None:
    from engine.runs import cancel, is_live, resume

    c1, c2, c3 = st.columns([1, 1, 4])
    state_ = status.get("effective")
    if is_live(status) and c1.button("Cancel", key="s_cancel", icon=":material/stop:"):
        cancel(path)
        st.rerun()
    if state_ in ("cancelled", "failed", "stale") and c1.button("Resume", key="s_resume", icon=":material/play_arrow:"):
        resume(path)
        st.rerun()
    if state_ == "done" and c2.button("Promote the winner", key="s_promote", icon=":material/rocket_launch:",
                                      help="A prune + distill run that continues from the winner's distilled weights"):
        from engine.search.job import promote

        try:
            run = promote(path, state.runs_root() / f"{path.name}-winner")
        except Exception as e:  # noqa: BLE001
            st.error(f"Could not promote: {user_message(e)}")
        else:
            c3.success(f"Started `{run.name}`: follow it on Distill or Runs.")
    c3.caption(f"`{path.name}` · {state_} · {status.get('stage') or ''} {100 * float(status.get('progress') or 0):.0f}% "
               f"· {status.get('message') or ''}")


def show_search(path: Path) -> None:
    from engine.fileio import read_json, read_jsonl
    from engine.runs import Run

    status = Run(path).status()
    controls(path, status)
    if status.get("error"):
        st.error(status["error"])
    rows = [r for r in read_jsonl(path / "candidates.jsonl") if "kl" in r]
    summary = read_json(path / "summary.json") or {}
    if summary.get("n_candidates"):
        st.progress(len(rows) / summary["n_candidates"],
                    text=f"{len(rows)} of {summary['n_candidates']} candidates previewed")
    if rows:
        st.subheader("Candidates")
        y = st.radio("Quality", ["kl", "ppl"], horizontal=True, key="s_map_y",
                     format_func={"kl": "One-shot KL (log scale)", "ppl": "Perplexity"}.get)
        st.plotly_chart(quality_map(rows, y=y), key="s_map", width="stretch")
        st.dataframe(candidates_table(rows), hide_index=True, key="s_table", width="stretch")
    metrics = read_jsonl(path / "metrics.jsonl")
    if metrics:
        st.subheader("Tournament")
        st.plotly_chart(tournament_chart(metrics), key="s_tournament", width="stretch")
        ranks = rank_stability(metrics)
        if ranks:
            last = ranks[-1]
            tau = last["kendall_tau"]
            st.metric("Rank stability (Kendall τ to the previous evaluation)", "-" if tau is None else f"{tau:.2f}",
                      help="1 = the ranking did not change between successive evaluations")
            st.caption(f"Ranking at step {last['step']}: {' > '.join(last['ranking'])}")
    if summary.get("winner"):
        st.success(f"Winner: {summary['winner']} (final ranking {' > '.join(summary.get('final_ranking', []))})")


@st.fragment(run_every=2.0)
def follow(path: Path) -> None:
    from engine.runs import Run, is_live

    show_search(path)
    if not is_live(Run(path).status()):
        st.rerun()


all_searches = searches()
name = st.query_params.get("search")
if name is None and all_searches:
    name = all_searches[0]["name"]
with st.expander("New search", expanded=name is None):
    start_form()
if name:
    path = state.runs_root() / name
    if not (path / "config.json").is_file():
        st.warning(f"No search run `{name}` under {state.runs_root()}.")
    else:
        if len(all_searches) > 1:
            names = [r["name"] for r in all_searches]
            pick = st.selectbox("Search", names, index=names.index(name) if name in names else 0, key="s_pick")
            if pick != name:
                st.query_params["search"] = pick
                st.rerun()
        from engine.runs import Run, is_live

        if is_live(Run(path).status()):
            follow(path)
        else:
            show_search(path)
