"""Gemma 2 and Gemma 3 (text): four norms per layer, a scaled embedding, soft-capping, mixed
sliding-window / global layers.

Layout facts carried here as data:
- every layer normalises before and after attention and before and after the MLP; all four norms
  span the hidden size, so all four count for channel importance and are trimmed with the channels;
- norms multiply by (1 + weight);
- the embedding output is multiplied by sqrt(config.hidden_size), so a model pruned to a smaller
  hidden size scales its embeddings by less: engine.prune rescales the post-sublayer norms by the
  same ratio, which scales the whole residual stream alike (the pre-norms and the final norm do not
  see a uniform scale), keeping the outputs;
- attention and final-logit soft-capping, query_pre_attn_scalar and the sliding window come from
  the config and do not depend on pruned sizes; `layer_types` follows the kept layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from engine.arch.llama import LlamaAdapter
from engine.arch.registry import register


@register
class Gemma2Adapter(LlamaAdapter):
    model_type = "gemma2"
    layout = ("four norms per layer, all trimmed; embedding x sqrt(hidden) compensated; attention and "
              "final-logit soft-capping; sliding / global layer types follow the kept layers")
    hidden_multiple_of_heads = True  # Gemma2Config validates hidden_size % num_attention_heads
    scaled_embedding = True
    norm_weight_offset = 1.0
    block_norms = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                   "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        import torch

        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


@register
class Gemma3TextAdapter(Gemma2Adapter):
    """Gemma 3 text models (Gemma3ForCausalLM): Gemma 2's layout plus q/k norms over head_dim and
    per-kind rotary settings (`rope_parameters` keyed by layer type)."""

    model_type = "gemma3_text"
    layout = "Gemma 2's layout plus q/k norms over head_dim and per-kind rotary settings"
