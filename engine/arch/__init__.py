"""Architecture adapters: one per Hugging Face `model_type`, in a registry."""

from engine.arch import gemma, gpt2, llama, moe, phi3  # noqa: F401  (register the adapters)
from engine.arch.base import ArchAdapter, ArchSpec, LayerParts, hidden_from_args, hidden_from_output
from engine.arch.registry import UnsupportedArchitecture, adapter_class, get_adapter, supported_model_types

__all__ = [
    "ArchAdapter", "ArchSpec", "LayerParts", "UnsupportedArchitecture", "adapter_class", "get_adapter", "hidden_from_args",
    "hidden_from_output", "supported_model_types",
]
