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


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_class(model_type: str) -> type[ArchAdapter]:
    """The adapter class registered for a `model_type` (for rules that need no model instance)."""
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return cls


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for this model, chosen by `model.config.model_type` (never by name)."""
    return adapter_class(getattr(getattr(model, "config", None), "model_type", None))(model)
