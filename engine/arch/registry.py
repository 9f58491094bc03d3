"""Registry of architecture adapters keyed by `config.model_type`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

from engine.arch.base import ArchAdapter
from engine.errors import UnsupportedArchitecture  # noqa: F401  (re-exported)

_REGISTRY: dict[str, type[ArchAdapter]] = {}


def register(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    _REGISTRY[cls.model_type] = cls
    return cls


_UNLISTED: dict[str, type[ArchAdapter]] = {}  # mixture-of-experts rules (engine.arch.moe), not yet listed


def register_unlisted(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """An adapter that prunes, scores and exports but is not yet among the supported families."""
    _UNLISTED[cls.model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_class(model_type: str) -> type[ArchAdapter]:
    """The adapter class of a `model_type` (for rules that need no model instance): a registered family
    or a mixture-of-experts one (engine.arch.moe: scored, planned, pruned and exported, not yet listed
    among the supported families)."""
    cls = _REGISTRY.get(model_type) or _UNLISTED.get(model_type)
    if cls is None:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return cls


def axes(model_type: str) -> list[str]:
    """The axes a family prunes (in the words of the dashboard)."""
    cls = adapter_class(model_type)
    width = ["query heads", "MLP neurons", "embedding channels"] if cls.explicit_head_dim else \
        ["query heads with embedding channels (hidden = heads x head_dim)", "MLP neurons"]
    return [*width, "layers"]


def families_table() -> str:
    """The supported families as a Markdown table (kept equal to the README's by a test)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CLASSES

    rows = ["| `model_type` | Hugging Face class | pruned axes | layout handled |", "|---|---|---|---|"]
    for name in supported_model_types():
        rows.append(f"| {name} | {CLASSES.get(name, '?')} | {', '.join(axes(name))} | {_REGISTRY[name].layout} |")
    return "\n".join(rows)


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for this model, chosen by `model.config.model_type` (never by name)."""
    return adapter_class(getattr(getattr(model, "config", None), "model_type", None))(model)
