"""Helpers shared by the pages: cached model info and scores, the current targets and what they cut.

Everything expensive is cached (`st.cache_data`) and keyed by file modification times, so a page
rerun after a slider move only does arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from dashboard import state


def user_message(e: BaseException) -> str:
    """An exception as one plain sentence for `st.error` (no stack trace)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if len(text) > 600 else text


@st.cache_data(show_spinner="Reading the model's architecture…", max_entries=8)
def model_info(spec: str, identity: str) -> dict:
    """Architecture of a model spec without loading its weights: the model is built on the meta device
    from its config (seconds even for a large model; the UI process holds no weights). A GGUF file is
    converted once into the cache first, as `engine.models.load` would."""
    from engine.arch import get_adapter
    from engine.models import BUILTIN_NAME, arch_of, count_parameters, meta_model

    model, config, path = meta_model(spec)
    a = get_adapter(model)
    arch = arch_of(model, config)
    tied = arch.tied
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        "name": BUILTIN_NAME if spec in ("default", "builtin", "") else spec, "model_type": a.model_type,
        "layers": a.n_layers, "query_heads": a.n_heads, "kv_heads": a.n_kv_heads, "head_dim": a.head_dim,
        "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size, "vocab_size": arch.vocab_size,
        "tied_embeddings": tied, "parameters": count_parameters(model), "dtype": str(dtype or "").replace("torch.", ""),
        "source": path, "arch": arch.to_dict(),
    }


def current_model_info() -> dict | None:
    """Info of the session's model, or None after showing the load error."""
    spec = state.get("model")
    try:
        return model_info(spec, state.model_identity(spec))
    except Exception as e:  # noqa: BLE001 - user-facing message, never a trace
        st.error(f"Could not load model **{spec}**: {user_message(e)}")
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_data(show_spinner=False, max_entries=8)
def _load_scores(folder: str, mtime: float) -> tuple[dict[str, np.ndarray], dict]:
    from engine.importance import Scores

    return Scores.load_numpy(folder)  # torch-free: the Importance page's first run stays fast


def load_scores(folder: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors as float32 numpy arrays, meta) of a scores folder, cached until the file changes."""
    folder = Path(folder)
    return _load_scores(str(folder), _mtime(folder / "scores.safetensors"))


def scores_folder() -> Path:
    """Where the session's scores are: an explicitly loaded folder, else the cache folder of the
    current model + data + calibration settings."""
    explicit = state.get("scores_dir")
    if explicit:
        return Path(explicit)
    return state.scores_root() / state.current_scores_key()


def have_scores(folder: Path | None = None) -> bool:
    from engine.importance import Scores

    return Scores.exists(folder or scores_folder())


def scores_engine_object(folder: str | Path):
    """An `engine.importance.Scores` rebuilt from the cached numpy arrays (no disk read)."""
    import torch

    from engine.importance import Scores

    tensors, meta = load_scores(folder)
    return Scores({k: torch.from_numpy(v) for k, v in tensors.items()}, meta)


# ---------------------------------------------------------------- targets and what they remove


@dataclass
class Cut:
    """Boolean masks of what the current targets would remove (True = pruned)."""

    heads: np.ndarray  # (L, H)
    neurons: np.ndarray  # (L, F)
    channels: np.ndarray  # (D,)
    layers: np.ndarray  # (L,)
    error: str | None = None
    experts: np.ndarray | None = None  # (S, E) over the sparse layers of a mixture of experts

    @property
    def any(self) -> bool:
        return bool(self.heads.any() or self.neurons.any() or self.channels.any() or self.layers.any()
                    or (self.experts is not None and self.experts.any()))


def targets_obj(d: dict | None):
    """engine.plan.Targets from the session's dict (None fields mean 'keep as is'; no criterion means the
    default one, where a plan file without it means activation)."""
    from engine.importance.scores import DEFAULT_CRITERION
    from engine.targets import Targets

    d = {k: v for k, v in dict(d or {}).items() if k in Targets.__dataclass_fields__}
    d.setdefault("criterion", DEFAULT_CRITERION)
    return Targets.from_dict(d)


def cut_masks(tensors: dict[str, np.ndarray], meta: dict, targets: dict) -> dict[str, np.ndarray]:
    """What the plan for these targets removes, as masks (True = pruned): the engine's own make_plan
    on the cached numpy scores (no torch; a few milliseconds, so a slider move stays far under
    300 ms), then the masks read off the plan."""
    from engine.importance import Scores
    from engine.plan import make_plan

    cut = plan_cut(make_plan(Scores(dict(tensors), meta), targets_obj(targets)).to_dict())
    return {"heads": cut.heads, "neurons": cut.neurons, "channels": cut.channels, "layers": cut.layers,
            "experts": cut.experts}


def same_targets(a: dict, b: dict) -> bool:
    """Targets that give the same plan (the depth criterion does not matter when no layer is dropped)."""
    def norm(d: dict) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        if d.get("layers") is None and d.get("depth_by") != "list":
            d["depth_by"] = "bi"
        return d

    return norm(a) == norm(b)


def plan_cut(plan: dict) -> Cut:
    """What a plan.json (as a dict, already validated) removes, from its own lists (True = pruned)."""
    a = plan["arch"]
    L, H, F, D = a["n_layers"], a["n_heads"], a["intermediate_size"], a["hidden_size"]
    if a.get("n_experts"):  # a mixture of experts: experts per sparse layer (its neurons are per expert)
        return _moe_plan_cut(plan)
    layers, heads, neurons, channels = np.ones(L, bool), np.ones((L, H), bool), np.ones((L, F), bool), np.ones(D, bool)
    for e in plan["layers"]:
        i = e["source"]
        layers[i] = False
        heads[i, e["heads"]] = False
        neurons[i, e["neurons"]] = False
    channels[plan["channels"]] = False
    return Cut(heads, neurons, channels, layers)


def _moe_plan_cut(plan: dict) -> Cut:
    """plan_cut of a mixture of experts: heads, channels, layers, and experts of the sparse layers."""
    a = plan["arch"]
    L, H, D, E = a["n_layers"], a["n_heads"], a["hidden_size"], a["n_experts"]
    sparse = [i for i in range(L) if i not in a.get("dense_layers", [])]
    layers, heads, channels = np.ones(L, bool), np.ones((L, H), bool), np.ones(D, bool)
    experts = np.ones((len(sparse), E), bool)
    for e in plan["layers"]:
        i = e["source"]
        layers[i] = False
        heads[i, e["heads"]] = False
        if i in sparse:
            experts[sparse.index(i), e.get("experts", [])] = False
    channels[plan["channels"]] = False
    return Cut(heads, np.zeros((L, 0), bool), channels, layers, experts=experts)


@st.cache_data(show_spinner=False, max_entries=64)
def _cut(folder: str, mtime: float, targets_key: tuple) -> dict:
    tensors, meta = load_scores(folder)
    return cut_masks(tensors, meta, {k: list(v) if isinstance(v, tuple) else v for k, v in targets_key})


def make_plan_for(folder: str | Path, targets: dict):
    """The engine's plan for these targets (for saving / downloading; not on the slider path)."""
    from engine.plan import make_plan

    return make_plan(scores_engine_object(folder), targets_obj(targets))


def current_cut(folder: Path, targets: dict | None) -> Cut:
    """Masks for the session's targets; errors (bad targets) come back in `.error`, not raised."""
    tensors, _ = load_scores(folder)
    L, H = tensors["heads"].shape
    none = Cut(np.zeros((L, H), bool), np.zeros(tensors["neurons"].shape if "neurons" in tensors else (L, 0), bool),
               np.zeros(tensors["channels"].shape, bool), np.zeros(L, bool),
               experts=np.zeros(tensors["experts"].shape, bool) if "experts" in tensors else None)
    if not targets or all(v in (None, False, [], "bi") for v in targets.values()):
        return none
    try:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in targets.items()))
        c = _cut(str(folder), _mtime(Path(folder) / "scores.safetensors"), key)
    except Exception as e:  # noqa: BLE001 - bad targets are the user's to fix
        none.error = user_message(e)
        return none
    return Cut(**c)
