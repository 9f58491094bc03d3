"""Mixture-of-experts layout shared by qwen3_moe, mixtral and olmoe (transformers' fused experts).

Every sparse layer's `mlp` is a block with a router `gate` (weight (E, D): one row per expert) and
`experts` holding all experts' weights as 3-D tensors: `gate_up_proj` (E, 2F, D) with each expert's
gate rows, then its up rows, and `down_proj` (E, D, F); F is the expert width (moe_intermediate_size,
or Mixtral's intermediate_size). The block calls `experts(hidden (N, D), top_k_index (N, k),
top_k_weights (N, k))`, so a hook on `experts` sees each token's chosen experts and their weights.

Which layers are sparse comes from the config (Qwen3-MoE's mlp_only_layers and decoder_sparse_step);
dense layers keep a plain MLP of config.intermediate_size. `spec` gives the ArchSpec the targets and the
estimator work on (engine.estimate counts total and active parameters). The adapters below are registered
as mixture-of-experts families (README table; their own test suites, tests/test_moe*.py): scoring adds
the expert tensors (engine.importance.experts) and their weight-aware forms (engine.importance.criteria),
plan.json keeps experts and expert neurons per sparse layer, apply_plan trims them with
`config_updates`, `layer_updates` and `engine.prune.copy_experts`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.arch.base import ArchSpec, LayerParts
from engine.arch.llama import LlamaAdapter
from engine.arch.registry import register_moe

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# model_type -> (config field with the number of experts, config field with the expert width)
MOE_FIELDS: dict[str, tuple[str, str]] = {
    "qwen3_moe": ("num_local_experts", "moe_intermediate_size"),  # num_experts is an alias of it
    "mixtral": ("num_local_experts", "intermediate_size"),
    "olmoe": ("num_experts", "intermediate_size"),
}


@dataclass(frozen=True)
class MoEParts:
    """The modules of one sparse MLP block."""

    block: nn.Module  # the sparse block (the layer's `mlp`)
    router: nn.Module  # .weight (E, D)
    experts: nn.Module  # .gate_up_proj (E, 2F, D), .down_proj (E, D, F)

    @property
    def n_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def expert_ffn(self) -> int:
        return int(self.experts.down_proj.shape[2])

    def expert_forward(self, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e on tokens x (n, D): (neuron activations act(gate) * up (n, F), output (n, D))."""
        from torch.nn import functional as F

        gate, up = F.linear(x, self.experts.gate_up_proj[e]).chunk(2, dim=-1)  # (n, F) each
        h = self.experts.act_fn(gate) * up
        return h, F.linear(h, self.experts.down_proj[e])


class _MoERules(LlamaAdapter):
    """Adapter of the MoE families: Llama's attention and norms; a sparse layer's MLP parts (gate, up,
    down) are None, its experts are `moe_parts`; `config_updates` writes the expert width."""

    hidden_multiple_of_heads = False

    def layer(self, i: int) -> LayerParts:
        p = super().layer(i) if not sparse_layers(self.config)[i] else _sparse_layer(self.layers[i])
        return p

    def spec(self) -> ArchSpec:
        return spec(self.model)

    @property
    def intermediate_size(self) -> int:
        return expert_ffn(self.config)

    def config_updates(self, hidden, ffn, heads, kv_heads, layers, head_dim) -> dict:
        d = super().config_updates(hidden, ffn, heads, kv_heads, layers, head_dim)
        del d["intermediate_size"]  # the dense layers' width (Qwen3-MoE) is kept; the expert width is the axis
        return {**d, MOE_FIELDS[self.config.model_type][1]: ffn}


def _sparse_layer(block: nn.Module) -> LayerParts:
    attn = block.self_attn
    return LayerParts(block=block, attn=attn, mlp=block.mlp, attn_norm=block.input_layernorm,
                      mlp_norm=block.post_attention_layernorm, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj,
                      o=attn.o_proj, up=None, down=None, q_norm=getattr(attn, "q_norm", None),
                      k_norm=getattr(attn, "k_norm", None))


_EXPERTS = "router rows trimmed with the experts kept, top-k clamped to them; fused expert weights trimmed per expert"


class Qwen3MoeRules(_MoERules):
    model_type = "qwen3_moe"
    layout = f"{_EXPERTS}; dense layers (mlp_only_layers, decoder_sparse_step) keep their MLP width; q/k norms over head_dim"


class MixtralRules(_MoERules):
    model_type = "mixtral"
    layout = f"{_EXPERTS}; intermediate_size is each expert's width"


class OlmoeRules(_MoERules):
    """OLMoE's q_norm spans hidden_size, so hidden = heads x head_dim (as GPT-2)."""

    model_type = "olmoe"
    explicit_head_dim = False
    qk_norm_full = True
    layout = f"{_EXPERTS}; q/k norms over the whole projection, trimmed with the heads"


RULES: dict[str, type[LlamaAdapter]] = {c.model_type: register_moe(c)
                                         for c in (Qwen3MoeRules, MixtralRules, OlmoeRules)}


def n_experts(config) -> int:
    return int(getattr(config, MOE_FIELDS[config.model_type][0]))


def expert_ffn(config) -> int:
    return int(getattr(config, MOE_FIELDS[config.model_type][1]))


def sparse_layers(config) -> list[bool]:
    """Per layer: does it hold experts (True) or a dense MLP (False)?"""
    n = int(config.num_hidden_layers)
    if config.model_type != "qwen3_moe":
        return [True] * n
    only = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return [i not in only and n_experts(config) > 0 and (i + 1) % step == 0 for i in range(n)]


def moe_parts(model: nn.Module, i: int) -> MoEParts | None:
    """The experts of layer i of a Hugging Face MoE causal LM, None for a dense layer."""
    if model.config.model_type not in MOE_FIELDS:
        raise ValueError(f"{model.config.model_type} is not a mixture of experts; known: {', '.join(MOE_FIELDS)}")
    if not sparse_layers(model.config)[i]:
        return None
    mlp = model.model.layers[i].mlp
    return MoEParts(block=mlp, router=mlp.gate, experts=mlp.experts)


def spec(model: nn.Module) -> ArchSpec:
    """The shape of a Hugging Face MoE causal LM as plain data: intermediate_size is the expert width
    (the MLP axis), dense_ffn / dense_layers the dense MLPs of a mixed model."""
    cfg = model.config
    attn = model.model.layers[0].self_attn
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    q_norm = getattr(attn, "q_norm", None)
    sparse = sparse_layers(cfg)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    return ArchSpec(
        model_type=cfg.model_type, vocab_size=int(emb.shape[0]), hidden_size=int(cfg.hidden_size),
        intermediate_size=expert_ffn(cfg), n_heads=int(cfg.num_attention_heads),
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads), head_dim=hd,
        n_layers=int(cfg.num_hidden_layers), tied=head is emb or head.data_ptr() == emb.data_ptr(),
        gated_mlp=True, qkv_bias=attn.q_proj.bias is not None, o_bias=attn.o_proj.bias is not None,
        mlp_bias=False, norm_bias=False, qk_norm=q_norm is not None,
        n_positions=0, qk_norm_full=q_norm is not None and int(q_norm.weight.shape[0]) != hd,
        n_experts=n_experts(cfg), experts_per_tok=int(cfg.num_experts_per_tok),
        dense_ffn=int(cfg.intermediate_size) if not all(sparse) else 0,
        dense_layers=tuple(i for i, s in enumerate(sparse) if not s),
    )


def layer_updates(config, kept_layers: list[int]) -> dict:
    """Config fields that keep each kept layer's kind (sparse or dense) once layers are renumbered."""
    if config.model_type != "qwen3_moe":
        return {}
    sparse = sparse_layers(config)
    return {"decoder_sparse_step": 1, "mlp_only_layers": [k for k, i in enumerate(kept_layers) if not sparse[i]]}


def config_updates(config, n_experts_kept: int, expert_width: int) -> dict:
    """Config fields of a model keeping `n_experts_kept` experts of `expert_width` neurons per sparse
    layer; the router's top-k is clamped to the experts kept."""
    experts_field, width_field = MOE_FIELDS[config.model_type]
    return {experts_field: n_experts_kept, width_field: expert_width,
            "num_experts_per_tok": min(int(config.num_experts_per_tok), n_experts_kept)}


def fit_experts_kernel(model: nn.Module) -> None:
    """Switch a MoE model to transformers' per-expert loop ("eager") when its widths rule out the grouped
    matmul kernel, which needs 16-byte row strides (hidden and expert width x bytes per element); other
    models are left as they are."""
    if getattr(model.config, "model_type", None) not in MOE_FIELDS:
        return
    nbytes = next(model.parameters()).element_size()
    widths = (int(model.config.hidden_size), expert_ffn(model.config))
    if any(w * nbytes % 16 for w in widths) and model.config._experts_implementation != "eager":
        log.info("expert widths %s do not give 16-byte strides: experts run one by one (eager)", widths)
        model.set_experts_implementation("eager")
