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


@st.cache_data(show_spinner="Loading the model to read its architecture…", max_entries=8)
def model_info(spec: str, identity: str) -> dict:
    """`engine.models.describe` plus the ArchSpec dict; the model itself is dropped after reading."""
    from engine.arch import get_adapter
    from engine.models import describe, load

    loaded = load(spec, device="cpu")
    info = describe(loaded)
    info["arch"] = get_adapter(loaded.model).spec().to_dict()
    return info


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

    s = Scores.load(folder)
    return {k: v.float().numpy() for k, v in s.tensors.items()}, s.meta


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
    plan: object | None = None
    error: str | None = None


def targets_obj(d: dict | None):
    """engine.plan.Targets from the session's dict (None fields mean 'keep as is')."""
    from engine.plan import Targets

    d = {k: v for k, v in dict(d or {}).items() if k in Targets.__dataclass_fields__}
    return Targets.from_dict(d)


@st.cache_data(show_spinner=False, max_entries=64)
def _cut(folder: str, mtime: float, targets_key: tuple) -> dict:
    from engine.plan import make_plan

    tensors, meta = load_scores(folder)
    scores = scores_engine_object(folder)
    L, H = tensors["heads"].shape
    F = tensors["neurons"].shape[1]
    D = tensors["channels"].shape[0]
    plan = make_plan(scores, targets_obj(dict(targets_key)))
    heads = np.ones((L, H), bool)
    neurons = np.ones((L, F), bool)
    channels = np.ones(D, bool)
    layers = np.ones(L, bool)
    layers[list(plan.kept_layers)] = False
    for j, i in enumerate(plan.kept_layers):
        heads[i, plan.heads[j]] = False
        neurons[i, plan.neurons[j]] = False
    channels[plan.channels] = False
    heads[layers] = True
    neurons[layers] = True
    return {"heads": heads, "neurons": neurons, "channels": channels, "layers": layers, "plan": plan}


def current_cut(folder: Path, targets: dict | None) -> Cut:
    """Masks for the session's targets; errors (bad targets) come back in `.error`, not raised."""
    tensors, _ = load_scores(folder)
    L, H = tensors["heads"].shape
    none = Cut(np.zeros((L, H), bool), np.zeros(tensors["neurons"].shape, bool),
               np.zeros(tensors["channels"].shape, bool), np.zeros(L, bool))
    if not targets or all(v in (None, False, [], "bi") for v in targets.values()):
        return none
    try:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in targets.items()))
        c = _cut(str(folder), _mtime(Path(folder) / "scores.safetensors"), key)
    except Exception as e:  # noqa: BLE001 - bad targets are the user's to fix
        none.error = user_message(e)
        return none
    return Cut(**c)
