"""Which rows and columns of each projection a plan keeps, in the source module's (out, in) coordinates.

The one statement of the plan's index layout: `engine.prune.apply_plan` copies these rows and columns, and
`engine.refit` fits the student's projections against the teacher's outputs at the same rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.targets import is_gqa

if TYPE_CHECKING:
    from engine.arch.base import ArchAdapter
    from engine.plan import Plan


def idx_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """A LongTensor of indices on `device`."""
    return torch.tensor(values, dtype=torch.long, device=device)


def head_rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    """Feature indices of these heads in a projection laid out head by head."""
    return idx_tensor([h * head_dim + j for h in heads for j in range(head_dim)], device)


def kv_heads(plan: Plan, k: int) -> list[int]:
    """The K/V heads kept in kept layer k: all under GQA (shared by the groups), the kept heads without it."""
    return plan.heads[k] if not is_gqa(plan.spec) else list(range(plan.spec.n_kv_heads))


def projection_indices(src: ArchAdapter, i_src: int, plan: Plan, k: int,
                       ch: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Kept (output, input) feature indices of each projection of kept layer k (source layer i_src), in the
    source module's own (out, in) coordinates, under the LayerParts names (qkv or q, k, v; o; gate, up,
    down)."""
    s, spec = src.layer(i_src), plan.spec
    dev, hd = ch.device, spec.head_dim
    q_rows, kv_rows = head_rows(plan.heads[k], hd, dev), head_rows(kv_heads(plan, k), hd, dev)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if src.fused_qkv:
        q_size, kv_size = spec.n_heads * hd, spec.n_kv_heads * hd
        out["qkv"] = (torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows]), ch)
    else:
        out.update(q=(q_rows, ch), k=(kv_rows, ch), v=(kv_rows, ch))
    out["o"] = (ch, q_rows)
    if s.down is not None:  # None: a mixture of experts' sparse layer (_copy_experts)
        n = idx_tensor(plan.neurons[k], dev)
        out["up"] = (torch.cat([n, spec.intermediate_size + n]) if src.fused_gate_up else n, ch)  # gate rows, then up
        if s.gate is not None:
            out["gate"] = (n, ch)
        out["down"] = (ch, n)
    return out
