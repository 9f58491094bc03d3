"""Prune targets page: sliders for widths and depth, presets, a live size readout, the heatmaps with
what would be cut, and the plan as JSON."""

from __future__ import annotations

import time

import streamlit as st

from dashboard import state
from dashboard.common import (
    current_cut,
    current_model_info,
    have_scores,
    load_scores,
    plan_cut,
    same_targets,
    scores_folder,
    user_message,
)
from dashboard.views import render_score_charts

AXES = [("hidden", "Hidden size (embedding channels)"), ("ffn", "MLP size (neurons per layer)"),
        ("heads", "Query heads per layer"), ("layers", "Layers")]
PRESETS = [("Original", None), ("Width 75%", "width-75"), ("Depth 75%", "depth-75"), ("MLP 75%", "mlp-75"),
           ("Width 50%", "width-50"), ("Depth 50%", "depth-50"), ("All 50%", "all-50")]
DEPTH_LABELS = {"bi": "Block importance (BI)", "ppl": "Perplexity increase", "block": "Contiguous block",
                "taylor": "Taylor+", "list": "Pick layers by hand"}

st.title("Prune targets")

folder = scores_folder()
have = have_scores(folder)
if have:
    tensors, meta = load_scores(folder)
    arch = meta.get("arch")
else:
    tensors, meta, arch = {}, {}, None
if arch is None:
    info = current_model_info()
    if info is None:
        st.stop()
    arch = info["arch"]

from engine.arch.base import ArchSpec  # noqa: E402
from engine.estimate import estimate  # noqa: E402
from engine.importance.scores import DEFAULT_CRITERION  # noqa: E402
from engine.presets import preset_targets  # noqa: E402
from engine.targets import (  # noqa: E402
    DEFAULT_REFIT,
    REFIT_HELP,
    ROUNDINGS,
    Targets,
    default_multiple,
    resolve,
    valid_values,
    validate_targets,
)

spec = ArchSpec.from_dict(arch)
source = {"hidden": spec.hidden_size, "ffn": spec.intermediate_size, "heads": spec.n_heads, "layers": spec.n_layers}


def _snap(values: list[int], v: int) -> int:
    return min(values, key=lambda x: (abs(x - v), -x)) if values else v


def _load_targets(t: Targets, with_refit: bool = True) -> None:
    """Copy targets into the slider widgets' state (before they are drawn); a preset (`with_refit` False)
    leaves the refit switch as it is."""
    for axis, _ in AXES:
        v = getattr(t, axis)
        st.session_state[f"t_{axis}"] = source[axis] if v is None else int(v)
    st.session_state["t_depth_by"] = t.depth_by
    st.session_state["t_experts"] = t.experts or spec.n_experts
    st.session_state["t_drop"] = list(t.drop_layers or [])
    st.session_state["t_merge"] = bool(t.merge_heads)
    if with_refit:
        st.session_state["t_refit"] = bool(t.refit)


def _apply_preset(name: str | None) -> None:
    try:
        _load_targets(Targets() if name is None else preset_targets(spec, name, int(st.session_state.get("t_round") or 1)),
                      with_refit=False)
        st.session_state.pop("preset_error", None)
        st.session_state.pop("loaded_plan", None)
    except Exception as e:  # noqa: BLE001
        st.session_state["preset_error"] = user_message(e)


def _dropped_by(depth_by: str, n_keep: int) -> list[int]:
    """The layers `depth_by` drops to keep `n_keep` (none without scores or without a depth cut)."""
    if n_keep >= spec.n_layers or not tensors:
        return []
    from engine.importance import Scores
    from engine.plan import kept_layers

    depth = {k: v for k, v in tensors.items() if k in ("bi", "ppl_increase", "taylor", "block_bi")}
    try:
        kept = kept_layers(Scores(depth, meta), spec, Targets(layers=n_keep, depth_by=depth_by), n_keep)
    except Exception:  # noqa: BLE001 - a criterion without its scores: start from an empty list
        return []
    return [i for i in range(spec.n_layers) if i not in kept]


def _prefill_drop_list() -> None:
    """Switching to 'Pick layers by hand' starts from the layers the previous criterion drops."""
    if st.session_state.get("t_depth_by") != "list" or st.session_state.get("t_drop"):
        return
    prev = st.session_state.get("t_depth_prev") or "bi"
    n_keep = int(st.session_state.get("t_layers") or spec.n_layers)
    st.session_state["t_drop"] = _dropped_by(prev if prev != "list" else "bi", n_keep)


def _open_plan(text: str, name: str) -> None:
    """Validate a plan.json (the CLI's messages), then load its targets into the widgets."""
    import json

    from engine.errors import PlanError, UserError
    from engine.plan import Plan

    try:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise PlanError(f"{name} is not valid JSON: {e}") from e
        plan = Plan.from_dict(d)
        if plan.spec != spec:
            p = plan.spec
            raise PlanError(f"{name} is for another model ({p.model_type}, {p.n_layers} layers, hidden {p.hidden_size}, "
                            f"MLP {p.intermediate_size}); this one is {spec.model_type}, {spec.n_layers} layers, "
                            f"hidden {spec.hidden_size}, MLP {spec.intermediate_size}")
        mine = meta.get("fingerprint")
        if mine and plan.fingerprint and plan.fingerprint != mine:
            raise PlanError(f"{name} was made from scores of another model (fingerprint {plan.fingerprint}, this "
                            f"model {mine}); make the plan from this model's scores")
    except UserError as e:
        st.session_state["plan_open_error"] = str(e) if str(e).startswith(name) else f"{name}: {e}"
        return
    st.session_state.pop("plan_open_error", None)
    st.session_state["t_round"] = 1  # the plan's sizes as written, whatever their rounding
    _load_targets(plan.targets)
    state.put("targets", {**(state.get("targets") or {}), "criterion": plan.targets.criterion})  # read below
    st.session_state["loaded_plan"] = {"name": name, "plan": plan.to_dict()}


def open_plan_section() -> None:
    """Open a plan.json from a path or an upload; its targets fill the sliders, its kept units the overlays."""
    with st.expander("Open a plan.json (saved here, downloaded, or written by `prunescope prune --plan-only`)",
                     expanded=bool(st.session_state.get("plan_open_error"))):
        up = st.file_uploader("Upload plan.json", type=["json"], key="plan_upload")
        if up is not None and up.file_id != st.session_state.get("plan_upload_seen"):
            st.session_state["plan_upload_seen"] = up.file_id
            _open_plan(up.getvalue().decode("utf-8", errors="replace"), up.name)
        c1, c2 = st.columns([4, 1])
        typed = c1.text_input("Plan file", key="plan_open_path", placeholder=str(state.runs_root() / "plans"),
                              label_visibility="collapsed")
        if c2.button("Open", key="plan_open", icon=":material/file_open:") and typed:
            from pathlib import Path

            path = Path(typed).expanduser()
            path = path / "plan.json" if path.is_dir() else path
            try:
                text = path.read_text()
            except OSError as e:
                st.session_state["plan_open_error"] = f"cannot read {path}: {e.strerror or e}"
            else:
                _open_plan(text, str(path))
        if st.session_state.get("plan_open_error"):
            st.error(f"Not a usable plan: {st.session_state['plan_open_error']}")


if "t_hidden" not in st.session_state or st.session_state.get("t_spec") != arch:
    if st.session_state.get("t_spec") not in (None, arch):
        st.session_state.pop("loaded_plan", None)
    st.session_state["t_spec"] = arch
    multiple = state.get("width_multiple")
    st.session_state["t_round"] = multiple if multiple in ROUNDINGS else default_multiple(spec)
    saved = state.get("targets")
    try:
        _load_targets(Targets.from_dict(saved) if saved else Targets(refit=DEFAULT_REFIT))
    except Exception:  # noqa: BLE001 - targets of another model
        _load_targets(Targets(refit=DEFAULT_REFIT))

# ---------------------------------------------------------------- open a plan, presets
open_plan_section()
cols = st.columns(len(PRESETS))
for col, (label, name) in zip(cols, PRESETS, strict=True):
    col.button(label, key=f"preset_{name or 'none'}", on_click=_apply_preset, args=(name,), width="stretch")
if st.session_state.get("preset_error"):
    st.error(st.session_state["preset_error"])
multiple = st.segmented_control(
    "Round hidden and MLP sizes to multiples of", ROUNDINGS, key="t_round", format_func=str,
    help="Sliders and presets follow it. GPU matrix units run fastest on multiples of 8 (fp16/bf16) and best "
         "on 64 or 128; 1 allows any size. The source size itself is always kept as a choice.") or 1
state.put("width_multiple", int(multiple))

# ---------------------------------------------------------------- sliders
left, right = st.columns([3, 2], gap="large")
with left:
    depth_options = ["bi", "list"]
    if "ppl_increase" in tensors:
        depth_options.insert(1, "ppl")
    if "block_bi" in tensors:
        depth_options.insert(-1, "block")
    if "taylor" in tensors:
        depth_options.insert(-1, "taylor")
    if st.session_state.get("t_depth_by") not in depth_options:
        st.session_state["t_depth_by"] = "bi"
    partial = Targets(heads=st.session_state["t_heads"])
    values = valid_values(spec, partial, int(multiple))
    picked: dict[str, int] = {}
    for axis, label in AXES:
        vals = values[axis]
        if axis == "layers" and st.session_state["t_depth_by"] == "list":
            continue
        key = f"t_{axis}"
        st.session_state[key] = _snap(vals, int(st.session_state.get(key, source[axis])))
        if len(vals) == 1:
            st.caption(f"{label}: {vals[0]} (fixed)")
            picked[axis] = vals[0]
            continue
        steps = {b - a for a, b in zip(vals, vals[1:], strict=False)}
        if len(steps) == 1:
            picked[axis] = st.slider(label, vals[0], vals[-1], step=steps.pop(), key=key,
                                     help=f"source: {source[axis]}")
        else:
            picked[axis] = st.select_slider(label, vals, key=key, help=f"source: {source[axis]}")
    if spec.is_moe:  # uniform across layers, as the configs require
        st.session_state.setdefault("t_experts", spec.n_experts)
        picked["experts"] = st.slider("Experts per layer", 1, spec.n_experts, key="t_experts",
                                      help=f"source: {spec.n_experts}; the router picks {spec.experts_per_tok} per "
                                      "token, clamped to the experts kept. The MLP size is each expert's width.")
    st.session_state["t_depth_prev"] = st.session_state.get("t_depth_by")
    depth_by = st.radio("Choose the layers to drop by", depth_options, key="t_depth_by", horizontal=True,
                        format_func=DEPTH_LABELS.get, on_change=_prefill_drop_list)
    drop: list[int] = []
    if depth_by == "list":
        drop = st.multiselect("Layers to drop", list(range(spec.n_layers)), key="t_drop")
    refit_on = st.toggle("Refit after pruning (least squares on the calibration data)", key="t_refit",
                         help=REFIT_HELP[0].upper() + REFIT_HELP[1:] + ". The one-shot preview is then the refitted "
                         "model's.")
    merge = st.toggle("Merge pruned query heads into kept ones (Minitron residual merge)", key="t_merge",
                      help="Kept head i becomes head_i + (head_i - head_2K-i+1) in its query rows "
                      "and o_proj columns. Off by default: on SmolLM2-135M it made the pruned model far worse, "
                      "one-shot and after distillation (docs/BENCHMARKS.md, Quality).")

targets = Targets(
    hidden=picked["hidden"] if picked["hidden"] != source["hidden"] else None,
    ffn=picked["ffn"] if picked["ffn"] != source["ffn"] else None,
    heads=picked["heads"] if picked["heads"] != source["heads"] else None,
    layers=None if depth_by == "list" or picked.get("layers") == source["layers"] else picked.get("layers"),
    depth_by=depth_by, drop_layers=tuple(sorted(drop)) if depth_by == "list" else None,
    merge_heads=merge, refit=refit_on, criterion=(state.get("targets") or {}).get("criterion", DEFAULT_CRITERION),  # set on Importance
    experts=picked["experts"] if picked.get("experts", spec.n_experts) != spec.n_experts else None,
)
state.put("targets", targets.to_dict())

# ---------------------------------------------------------------- readout
def _kept_layers(t: Targets) -> list[int] | None:
    """The layers the plan keeps, where the count depends on which (a MoE mixing dense and sparse layers)."""
    if not (spec.dense_layers and have and resolve(spec, t).layers < spec.n_layers):
        return None
    from engine.importance import Scores
    from engine.plan import kept_layers

    try:
        return kept_layers(Scores(dict(tensors), meta), spec, t, resolve(spec, t).layers)
    except Exception:  # noqa: BLE001 - the targets' own error is shown by validation
        return None


with right:
    t0 = time.perf_counter()
    try:
        validate_targets(spec, targets)
        est = estimate(spec, targets, kept_layers=_kept_layers(targets))
    except Exception as e:  # noqa: BLE001
        st.error(f"These targets are not valid: {user_message(e)}")
        st.stop()
    base = estimate(spec, Targets())
    with st.container(border=True, key="readout"):
        c1, c2 = st.columns(2)
        c1.metric("Parameters", f"{est.params / 1e6:.2f} M" if est.params >= 1e6 else f"{est.params:,}",
                  f"{(est.fraction_of_source - 1) * 100:+.2f}%", delta_color="off",
                  help=f"{est.params:,} parameters (source: {base.params:,})")
        c2.metric("Of the original", f"{est.fraction_of_source * 100:.2f}%")
        c3, c4 = st.columns(2)
        c3.metric("FLOPs per token", state.human(est.flops_per_token),
                  f"{(est.flops_per_token / base.flops_per_token - 1) * 100:+.1f}%", delta_color="off",
                  help=f"Forward pass at a context of {est.context} tokens.")
        c4.metric("Memory (bf16 weights)", state.human_bytes(est.memory_bytes_bf16),
                  f"{(est.memory_bytes_bf16 / base.memory_bytes_bf16 - 1) * 100:+.1f}%", delta_color="off")
        if spec.is_moe:
            c5, c6 = st.columns(2)
            act = est.active_params
            c5.metric("Active parameters per token", f"{act / 1e6:.2f} M" if act >= 1e6 else f"{act:,}",
                      f"{(est.active_params / base.active_params - 1) * 100:+.2f}%", delta_color="off",
                      help=f"{est.active_params:,} of {est.params:,}: all but the experts the router skips "
                           f"(source: {base.active_params:,})")
            c6.metric("Experts per layer", f"{est.sizes.experts} (top-{est.sizes.experts_per_tok})")
        sz = est.sizes
        st.caption(f"Result: {sz.layers} layers · {sz.heads} query / {sz.kv_heads} KV heads · hidden {sz.hidden} · "
                   f"MLP {sz.ffn} · from {state.human(base.params)} parameters · "
                   f"KV cache {state.human_bytes(est.kv_cache_bytes_per_token_bf16)}/token")
    st.session_state["readout_ms"] = (time.perf_counter() - t0) * 1000
if have:  # one-shot quality of these targets beside the size readout, and the size-vs-quality map
    from dashboard.preview import render_preview

    render_preview(folder, targets.to_dict(), right)

# ---------------------------------------------------------------- what would be cut, and the plan
loaded = st.session_state.get("loaded_plan")
if loaded and not same_targets(loaded["plan"]["targets"], targets.to_dict()):
    st.session_state.pop("loaded_plan")
    st.info(f"The targets changed since `{loaded['name']}` was opened: the plan comes from the scores again.")
    loaded = None
if loaded:
    st.success(f"Plan opened from `{loaded['name']}`: its kept heads, neurons, channels and layers are shown "
               "below and launched as written.")
if not have:
    st.info("Compute importance scores to see which heads, neurons, channels and layers these targets remove.")
    st.page_link("screens/importance.py", label="Go to Importance", icon=":material/grid_on:")
    if loaded:
        st.page_link("screens/distill.py", label="Next: prune and distill with this plan",
                     icon=":material/arrow_forward:")
    st.stop()

cut = plan_cut(loaded["plan"]) if loaded else current_cut(folder, targets.to_dict())
render_score_charts(tensors, meta, cut, key="tgt")

st.subheader("Plan")
if cut.error or not cut.any:
    st.caption("Set at least one target to make a plan." if not cut.error else "")
else:
    from dashboard.common import make_plan_for
    from engine.plan import Plan, dumps

    targets_dict = targets.to_dict()

    def plan_obj() -> Plan:
        return Plan.from_dict(loaded["plan"]) if loaded else make_plan_for(folder, targets_dict)

    c1, c2, c3 = st.columns([1, 1, 3])
    c1.download_button("Download plan.json", lambda: dumps(plan_obj().to_dict()) + "\n", file_name="plan.json",
                       mime="application/json", icon=":material/download:", key="plan_download")
    if c2.button("Save plan", key="plan_save", icon=":material/save:"):
        path = state.runs_root() / "plans" / f"plan-{time.strftime('%Y%m%d-%H%M%S')}.json"
        try:
            plan_obj().save(path)
        except Exception as e:  # noqa: BLE001
            st.error(f"Could not save the plan: {user_message(e)}")
        else:
            state.put("plan_path", str(path))
    if st.session_state.get("plan_path"):
        c3.success(f"Saved to `{st.session_state['plan_path']}`")
    kept = [i for i in range(len(cut.layers)) if not cut.layers[i]]
    st.caption(f"Keeps layers {', '.join(map(str, kept))}; {int((~cut.heads[kept[0]]).sum())} query heads and "
               f"{int((~cut.neurons[kept[0]]).sum())} neurons per layer; {int((~cut.channels).sum())} embedding "
               "channels.")
    if st.toggle("Show plan.json", key="plan_show"):
        text = dumps(plan_obj().to_dict())
        st.code(text[:20000] + ("\n…" if len(text) > 20000 else ""), language="json")
st.page_link("screens/distill.py", label="Next: prune and distill", icon=":material/arrow_forward:")
