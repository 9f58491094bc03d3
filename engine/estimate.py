"""A closed-form estimate of a pruned model's size: exact parameter counts, FLOPs per token and
memory, from an `ArchSpec` and targets (no model is built; equal to the pruned model's count).
"""

from __future__ import annotations

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

    def to_dict(self) -> dict:
        return asdict(self)


def _count(spec: ArchSpec, s: Sizes) -> tuple[int, int]:
    """(parameters, parameters that take part in matmuls per token incl. lm_head)."""
    D, F, H, KV, hd, V = s.hidden, s.ffn, s.heads, s.kv_heads, s.head_dim, spec.vocab_size
    nb = 2 if spec.norm_bias else 1
    attn_mm = D * H * hd + 2 * D * KV * hd + H * hd * D
    attn = attn_mm + (H * hd + 2 * KV * hd if spec.qkv_bias else 0) + (D if spec.o_bias else 0) \
        + (((H + KV) * hd if spec.qk_norm_full else 2 * hd) if spec.qk_norm else 0)
    mlp_mm = (3 if spec.gated_mlp else 2) * D * F
    mlp = mlp_mm + ((2 if spec.gated_mlp else 1) * F + D if spec.mlp_bias else 0)
    layer = attn + mlp + spec.norms_per_layer * nb * D
    outer = V * D + spec.n_positions * D + (0 if spec.tied else V * D) + nb * D
    return outer + s.layers * layer, s.layers * (attn_mm + mlp_mm) + V * D


def estimate(spec: ArchSpec, targets: Targets, context: int = DEFAULT_CONTEXT) -> Estimate:
    """Parameters, forward FLOPs per token and bf16 weight memory of the pruned model.

    Equal to `count_parameters` of the model `apply_plan` builds. Microseconds per call.
    """
    s = resolve(spec, targets)
    params, matmul = _count(spec, s)
    source, _ = _count(spec, resolve(spec, Targets()))
    attn_flops = 2 * 2 * s.layers * s.heads * s.head_dim * context  # q.k scores + weighted sum of v
    return Estimate(
        params=params, flops_per_token=2 * matmul + attn_flops, memory_bytes_bf16=2 * params,
        fraction_of_source=params / source, source_params=source,
        kv_cache_bytes_per_token_bf16=2 * 2 * s.layers * s.kv_heads * s.head_dim, context=context, sizes=s,
    )
