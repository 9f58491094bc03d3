"""GPT-2: fused `c_attn` Conv1D (weights stored in x out), LayerNorm with bias, learned positions.

Here to keep the abstraction honest: nothing in the engine may assume Llama's layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

from engine.arch.base import ArchAdapter, LayerParts
from engine.arch.registry import register


@register
class GPT2Adapter(ArchAdapter):
    model_type = "gpt2"
    layout = "fused c_attn Conv1D, LayerNorm with bias, learned positions; hidden = heads x head_dim"
    conv1d = True
    fused_qkv = True
    gated_mlp = False
    # GPT2Attention derives head_dim = n_embd // n_head, so hidden = heads x head_dim always.
    explicit_head_dim = False
    layers_attr = "h"

    @property
    def base_model(self) -> nn.Module:
        return self.model.transformer

    @property
    def intermediate_size(self) -> int:
        return int(self.config.n_inner or 4 * self.hidden_size)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.base_model.wte

    @property
    def position_embeddings(self) -> nn.Embedding:
        return self.base_model.wpe

    @property
    def final_norm(self) -> nn.Module:
        return self.base_model.ln_f

    def layer(self, i: int) -> LayerParts:
        block = self.layers[i]
        attn, mlp = block.attn, block.mlp
        return LayerParts(
            block=block, attn=attn, mlp=mlp, attn_norm=block.ln_1, mlp_norm=block.ln_2,
            qkv=attn.c_attn, o=attn.c_proj, up=mlp.c_fc, down=mlp.c_proj,
        )

    def config_updates(self, hidden, ffn, heads, kv_heads, layers, head_dim) -> dict:
        if hidden != heads * head_dim:
            raise ValueError(
                f"GPT-2 needs hidden size = heads x head_dim ({heads} x {head_dim} = {heads * head_dim}), "
                f"got {hidden}"
            )
        return {"n_embd": hidden, "n_inner": ffn, "n_head": heads, "n_layer": layers}
