"""Weight-aware importance criteria beside Minitron's activation statistic.

Minitron ranks a unit by how strongly it fires. A unit that fires strongly but writes almost nothing
to the residual stream (a tiny `down_proj` column) matters little, and a hidden channel that no weight
reads matters little, so these criteria multiply the activation statistic `a` (the same one, from the
same forward pass) by the norms of the weights the unit writes through or is read by:

- neurons, "weighted": a_j * ||W_down[:, j]||   (what neuron j writes to the residual stream)
- neurons, "product":  a_j * ||W_gate[j, :]|| * ||W_up[j, :]|| * ||W_down[:, j]||   (gate / up / down;
  without a gate, as in GPT-2: a_j * ||W_up[j, :]|| * ||W_down[:, j]||)
- heads, "weighted":   a_h * ||W_o[:, h*hd:(h+1)*hd]||_F   (its block of o_proj columns)
- channels, "weighted": sum over layers i of a_ic * r_ic, where a_ic is the layer's norm-output
  statistic (the `channels_per_layer` row) and r_ic the L2 norm of column c over every weight of
  layer i that reads the hidden stream (q, k, v or the fused qkv, gate, up).

Heads and channels have no product form: "product" reads their "weighted" tensors. Only weight norms
are added, so the criteria cost no extra forward pass. Tensor names are in engine.importance.scores.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from engine.arch import ArchAdapter


def _matrix(adapter: ArchAdapter, module: nn.Module, weights: Mapping[str, torch.Tensor] | None,
            names: dict[int, str]) -> torch.Tensor:
    """A linear module's weight as an fp32 (out, in) matrix (Conv1D transposed); read from the offloaded
    weights when the module's own is a `meta` placeholder (a streamed model)."""
    w = module.weight
    if w.device.type == "meta":
        if weights is None:
            raise RuntimeError("weights are on `meta` and no offloaded copy was given")
        w = weights[f"{names[id(module)]}.weight"]
    w = w.detach().float().cpu()
    return w.t() if adapter.conv1d else w


def weight_norms(adapter: ArchAdapter, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-unit weight norms, fp32 CPU: down_cols (L, F), up_rows (L, F), gate_rows (L, F) (ones without a
    gate), o_blocks (L, H), readers (L, D)."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    H = adapter.n_heads
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("down_cols", "up_rows", "gate_rows", "o_blocks", "readers")}
    for i in range(adapter.n_layers):
        p = adapter.layer(i)
        mat = lambda m: _matrix(adapter, m, weights, names)  # noqa: E731
        down = mat(p.down)  # (D, F)
        F = down.shape[1]
        out["down_cols"].append(torch.linalg.vector_norm(down, dim=0))
        up = mat(p.up)  # (F, D), or (2F, D) gate rows then up rows when fused
        gate = up[:F] if adapter.fused_gate_up else (mat(p.gate) if p.gate is not None else None)
        up = up[F:] if adapter.fused_gate_up else up
        out["up_rows"].append(torch.linalg.vector_norm(up, dim=1))
        out["gate_rows"].append(torch.linalg.vector_norm(gate, dim=1) if gate is not None else torch.ones(F))
        o = mat(p.o)  # (D, H*hd)
        out["o_blocks"].append(torch.linalg.vector_norm(o.view(o.shape[0], H, -1), dim=(0, 2)))
        readers = [p.qkv] if p.qkv is not None else [p.q, p.k, p.v]
        readers += [m for m in (p.gate, p.up) if m is not None]
        sq = sum(mat(m).square().sum(0) for m in readers)  # (D,) sum of squares of each input column
        out["readers"].append(sq.sqrt())
    return {k: torch.stack(v) for k, v in out.items()}


def add_criteria(model: nn.Module, scores) -> bool:
    """Add the weight-aware tensors to scores made before they existed (from their activation tensors and
    the model's weights: no forward pass). True when they were added."""
    from engine.arch import get_adapter
    from engine.importance.stream import stream_info

    if "neurons:weighted" in scores.tensors or "channels_per_layer" not in scores.tensors:
        return False
    info = stream_info(model)
    scores.tensors.update(criterion_tensors(get_adapter(model), scores.tensors,
                                            info.weights if info is not None else None))
    return True


def criterion_tensors(adapter: ArchAdapter, tensors: Mapping[str, torch.Tensor],
                      weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weight-aware tensors from the activation tensors (heads, neurons, channels_per_layer):
    heads:weighted (L, H), neurons:weighted / neurons:product (L, F), channels:weighted (D,) and
    channels_per_layer:weighted (L, D)."""
    w = weight_norms(adapter, weights)
    per_layer = tensors["channels_per_layer"] * w["readers"]  # (L, D)
    return {
        "heads:weighted": tensors["heads"] * w["o_blocks"],
        "neurons:weighted": tensors["neurons"] * w["down_cols"],
        "neurons:product": tensors["neurons"] * w["down_cols"] * w["up_rows"] * w["gate_rows"],
        "channels:weighted": per_layer.sum(0),
        "channels_per_layer:weighted": per_layer,
    }
