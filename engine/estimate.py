"""A closed-form estimate of a pruned model's size: exact parameter counts, FLOPs per token and
memory, from an `ArchSpec` and targets (no model is built; equal to the pruned model's count).

Mixtures of experts: `params` counts every expert, `active_params` those a token runs through
(all parameters but the (experts - top-k) experts its router skips in each sparse layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from engine.arch import ArchSpec
from engine.targets import Sizes, Targets, resolve

DEFAULT_CONTEXT = 2048  # context length at which attention FLOPs per token are counted


@dataclass(frozen=True)
class Estimate:
    params: int
    flops_per_token: int  # forward pass, 2 x multiply-accumulates, attention at `context` tokens
    memory_bytes_bf16: int  # weights only
    fraction_of_source: float  # params / source params
    source_params: int
    kv_cache_bytes_per_token_bf16: int
    context: int
    sizes: Sizes
    active_params: int = 0  # parameters a token runs through (equal to params for a dense model)

    def to_dict(self) -> dict:
        return asdict(self)


def _kept(spec: ArchSpec, targets: Targets, kept_layers: Sequence[int] | None) -> list[int]:
    """Source indices of the kept layers where they are known (a list, or depth_by 'list'); otherwise the
    first ones: only mixed MoE models (dense and sparse layers) count differently per layer."""
    if kept_layers is not None:
        return list(kept_layers)
    drop = set(targets.drop_layers or ()) if targets.depth_by == "list" else set()
    kept = [i for i in range(spec.n_layers) if i not in drop]
    return kept[:resolve(spec, targets).layers]


def _count_moe(spec: ArchSpec, s: Sizes, kept: list[int]) -> tuple[int, int, int]:
    """Mixture of experts: (MLP parameters, MLP parameters in matmuls per token, inactive expert
    parameters) over the kept layers: a router of E x D and E experts of 3 x D x F per sparse layer,
    the source's dense MLP (3 x D x dense_ffn) per dense layer."""
    D, F, E, k = s.hidden, s.ffn, s.experts, s.experts_per_tok
    dense = sum(1 for i in kept if i in spec.dense_layers)
    sparse = len(kept) - dense
    expert = 3 * D * F
    params = sparse * (E * D + E * expert) + dense * 3 * D * spec.dense_ffn
    matmul = sparse * (E * D + k * expert) + dense * 3 * D * spec.dense_ffn
    return params, matmul, sparse * (E - k) * expert


def _count(spec: ArchSpec, s: Sizes, kept: list[int]) -> tuple[int, int, int]:
    """(parameters, parameters that take part in matmuls per token incl. lm_head, inactive parameters)."""
    D, F, H, KV, hd, V = s.hidden, s.ffn, s.heads, s.kv_heads, s.head_dim, spec.vocab_size
    nb = 2 if spec.norm_bias else 1
    attn_mm = D * H * hd + 2 * D * KV * hd + H * hd * D
    attn = attn_mm + (H * hd + 2 * KV * hd if spec.qkv_bias else 0) + (D if spec.o_bias else 0) \
        + (((H + KV) * hd if spec.qk_norm_full else 2 * hd) if spec.qk_norm else 0)
    mlp_mm = (3 if spec.gated_mlp else 2) * D * F
    mlp = mlp_mm + ((2 if spec.gated_mlp else 1) * F + D if spec.mlp_bias else 0)
    layer = attn + spec.norms_per_layer * nb * D
    outer = V * D + spec.n_positions * D + (0 if spec.tied else V * D) + nb * D
    if spec.is_moe:
        moe, moe_mm, inactive = _count_moe(spec, s, kept)
        return outer + s.layers * layer + moe, s.layers * attn_mm + moe_mm + V * D, inactive
    return outer + s.layers * (layer + mlp), s.layers * (attn_mm + mlp_mm) + V * D, 0


def estimate(spec: ArchSpec, targets: Targets, context: int = DEFAULT_CONTEXT,
             kept_layers: Sequence[int] | None = None) -> Estimate:
    """Parameters (total and active per token), forward FLOPs per token and bf16 weight memory of the
    pruned model; `kept_layers` (source indices) matter only for a MoE model mixing dense layers.

    Equal to `count_parameters` of the model `apply_plan` builds. Microseconds per call.
    """
    s = resolve(spec, targets)
    params, matmul, inactive = _count(spec, s, _kept(spec, targets, kept_layers))
    source, _, _ = _count(spec, resolve(spec, Targets()), list(range(spec.n_layers)))
    attn_flops = 2 * 2 * s.layers * s.heads * s.head_dim * context  # q.k scores + weighted sum of v
    return Estimate(
        params=params, flops_per_token=2 * matmul + attn_flops, memory_bytes_bf16=2 * params,
        fraction_of_source=params / source, source_params=source,
        kv_cache_bytes_per_token_bf16=2 * 2 * s.layers * s.kv_heads * s.head_dim, context=context, sizes=s,
        active_params=params - inactive,
    )
