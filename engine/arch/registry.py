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


_MOE: dict[str, type[ArchAdapter]] = {}  # mixtures of experts (engine.arch.moe), tested by their own suite


def register_moe(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """A mixture-of-experts family (engine.arch.moe registers its rules here, so the registry imports no
    MoE module)."""
    _MOE[cls.model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    """The dense families (each one in the conformance suite); mixtures of experts: `moe_model_types`."""
    return sorted(_REGISTRY)


def moe_model_types() -> list[str]:
    """The mixture-of-experts families."""
    return sorted(_MOE)


def adapter_class(model_type: str) -> type[ArchAdapter]:
    """The adapter class of a `model_type` (for rules that need no model instance), dense or MoE."""
    cls = _REGISTRY.get(model_type) or _MOE.get(model_type)
    if cls is None:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(supported_model_types() + moe_model_types()))}"
        )
    return cls


def axes(model_type: str) -> list[str]:
    """The axes a family prunes (in the words of the dashboard)."""
    cls = adapter_class(model_type)
    width = ["query heads", "MLP neurons", "embedding channels"] if cls.explicit_head_dim else \
        ["query heads with embedding channels (hidden = heads x head_dim)", "MLP neurons"]
    if model_type in _MOE:  # the MLP axis is each expert's width
        width = ["experts per layer", *(["expert neurons" if w == "MLP neurons" else w for w in width])]
    return [*width, "layers"]


def families_table() -> str:
    """The supported families, dense and mixtures of experts, as a Markdown table (kept equal to the
    README's by a test)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CLASSES

    rows = ["| `model_type` | Hugging Face class | pruned axes | layout handled |", "|---|---|---|---|"]
    for name in sorted(supported_model_types() + moe_model_types()):
        rows.append(f"| {name} | {CLASSES.get(name, '?')} | {', '.join(axes(name))} | {adapter_class(name).layout} |")
    return "\n".join(rows)


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for this model, chosen by `model.config.model_type` (never by name)."""
    return adapter_class(getattr(getattr(model, "config", None), "model_type", None))(model)
