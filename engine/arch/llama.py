"""Adapters for the Llama family layout: llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms),
granite (embedding / attention / residual / logits multipliers) and olmo2 (norms after each sublayer,
q/k norms over the whole projection).

All share HF's module names (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`...);
each family is its own small class so its flags are explicit and it has its own registry entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

from engine.arch.base import ArchAdapter, LayerParts
from engine.arch.registry import register


@register
class LlamaAdapter(ArchAdapter):
    model_type = "llama"
    layout = "explicit head_dim; hidden a multiple of the query heads (LlamaConfig checks it)"
    # transformers' LlamaConfig validates hidden_size % num_attention_heads == 0
    hidden_multiple_of_heads = True
    # Where each LayerParts slot lives, as data: LayerParts field -> attribute of the decoder block
    # (None: the family has no such norm), of its `self_attn` and of its `mlp`. q_norm / k_norm are
    # taken from `self_attn` wherever the family has them.
    block_norms: ClassVar[dict[str, str | None]] = {
        "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    attn_projections: ClassVar[dict[str, str]] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    mlp_projections: ClassVar[dict[str, str]] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

    @property
    def base_model(self) -> nn.Module:
        return self.model.model

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.base_model.norm

    def layer(self, i: int) -> LayerParts:
        block = self.layers[i]
        attn, mlp = block.self_attn, block.mlp
        norms = {field: getattr(block, name) if name else None for field, name in self.block_norms.items()}
        projections = {**{field: getattr(attn, name) for field, name in self.attn_projections.items()},
                       **{field: getattr(mlp, name) for field, name in self.mlp_projections.items()}}
        return LayerParts(block=block, attn=attn, mlp=mlp, **norms, **projections,
                          q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))

    def config_updates(self, hidden, ffn, heads, kv_heads, layers, head_dim) -> dict:
        return {
            "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "num_hidden_layers": layers, "head_dim": head_dim,
        }


@register
class MistralAdapter(LlamaAdapter):
    model_type = "mistral"
    layout = "Llama layout, any hidden size"
    hidden_multiple_of_heads = False


@register
class Qwen2Adapter(LlamaAdapter):
    """Qwen2: biases on q/k/v (trimmed with their rows), sliding-window layer types."""

    model_type = "qwen2"
    layout = "biases on q/k/v (trimmed with their rows); sliding-window layer types follow the kept layers"
    hidden_multiple_of_heads = False


@register
class Qwen3Adapter(LlamaAdapter):
    """Qwen3: RMSNorm on each head's q and k (over head_dim, so head pruning leaves it intact)."""

    model_type = "qwen3"
    layout = "q/k norms over head_dim"
    hidden_multiple_of_heads = False


@register
class GraniteAdapter(LlamaAdapter):
    """Granite: Llama's modules; the config's embedding, attention, residual and logits multipliers
    do not depend on any pruned size and are kept as they are."""

    model_type = "granite"
    layout = "Llama modules; embedding, attention, residual and logits multipliers kept"
    hidden_multiple_of_heads = False

    @property
    def embedding_multiplier(self) -> float:
        return float(self.config.embedding_multiplier)

    @property
    def residual_multiplier(self) -> float:
        return float(self.config.residual_multiplier)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) / self.config.logits_scaling


@register
class Olmo2Adapter(LlamaAdapter):
    """OLMo2: no norm before attention or the MLP; `post_attention_layernorm` and
    `post_feedforward_layernorm` normalise each sublayer's output before the residual add. q_norm and
    k_norm span the whole q / k projection, so they are trimmed with the heads (and then normalise over
    the kept heads only)."""

    model_type = "olmo2"
    layout = "norms after attention and the MLP only; q/k norms over the whole projection, trimmed with the heads"
    hidden_multiple_of_heads = False
    qk_norm_full = True
    block_norms = {"attn_norm": None, "mlp_norm": None, "attn_post_norm": "post_attention_layernorm",
                   "mlp_post_norm": "post_feedforward_layernorm"}
