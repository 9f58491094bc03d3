"""Phi-3 and Phi-4-mini (`phi3`): fused `qkv_proj` (q | k | v rows) and `gate_up_proj` (gate rows,
then up rows), trimmed by slices and saved in the same fused layout.

The config has no head_dim field; it is written explicitly (the attention and the rotary embedding
read `config.head_dim` when present), so head_dim and the partial rotary factor, which applies to
it, are kept when the hidden size or the number of heads changes. LongRoPE checkpoints validate
their rotary factors against hidden_size // num_attention_heads: there the config class rejects
shapes where that differs from head_dim, and the pruning plan says so.
"""

from __future__ import annotations

from engine.arch.llama import LlamaAdapter
from engine.arch.registry import register


@register
class Phi3Adapter(LlamaAdapter):
    model_type = "phi3"
    layout = "fused qkv_proj and gate_up_proj trimmed by slices and saved fused; partial rotary factor kept"
    fused_qkv = True
    fused_gate_up = True
    hidden_multiple_of_heads = False
    attn_projections = {"qkv": "qkv_proj", "o": "o_proj"}
    mlp_projections = {"up": "gate_up_proj", "down": "down_proj"}
