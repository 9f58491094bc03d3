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

Mixtures of experts (engine.arch.moe): neurons live inside experts and are scored per expert, so the
neuron criteria apply to each expert's own weights, over the S sparse layers (E experts of F neurons):

- expert_neurons:weighted (S, E, F) = a_ej * ||down_e[:, j]||
- expert_neurons:product  (S, E, F) = a_ej * ||gate_e[j, :]|| * ||up_e[j, :]|| * ||down_e[:, j]||

Heads are as above; a sparse layer's channel readers are q, k, v, the router and every expert's gate and
up rows. Experts themselves keep their own ranking (router-weighted output L2, which already includes
what each expert writes) under every criterion; dense layers of a mixed model keep their whole MLP.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from engine.arch import ArchAdapter, get_adapter
from engine.arch.moe import MOE_FIELDS, moe_parts


def _param(module: nn.Module, attr: str, weights: Mapping[str, torch.Tensor] | None,
           names: dict[int, str]) -> torch.Tensor:
    """`module.<attr>` as fp32 on the CPU; read from the offloaded weights when the module's own is a `meta`
    placeholder (a streamed model)."""
    w = getattr(module, attr)
    if w.device.type == "meta":
        if weights is None:
            raise RuntimeError("weights are on `meta` and no offloaded copy was given")
        w = weights[f"{names[id(module)]}.{attr}"]
    return w.detach().float().cpu()


def _matrix(adapter: ArchAdapter, module: nn.Module, weights: Mapping[str, torch.Tensor] | None,
            names: dict[int, str]) -> torch.Tensor:
    """A linear module's weight as an fp32 (out, in) matrix (Conv1D transposed)."""
    w = _param(module, "weight", weights, names)
    return w.t() if adapter.conv1d else w


def expert_weight_norms(model: nn.Module, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per expert neuron over the sparse layers, fp32 CPU: down_cols, gate_rows, up_rows (S, E, F), and
    readers (S, D): the column norms of the router and every expert's gate and up rows (squared, summed)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("down_cols", "gate_rows", "up_rows", "readers")}
    for i in range(int(model.config.num_hidden_layers)):
        p = moe_parts(model, i)
        if p is None:
            continue
        gate_up = _param(p.experts, "gate_up_proj", weights, names)  # (E, 2F, D): gate rows, then up rows
        down = _param(p.experts, "down_proj", weights, names)  # (E, D, F)
        F = down.shape[2]
        out["down_cols"].append(torch.linalg.vector_norm(down, dim=1))
        out["gate_rows"].append(torch.linalg.vector_norm(gate_up[:, :F], dim=2))
        out["up_rows"].append(torch.linalg.vector_norm(gate_up[:, F:], dim=2))
        router = _param(p.router, "weight", weights, names)  # (E, D)
        out["readers"].append(gate_up.square().sum((0, 1)) + router.square().sum(0))  # (D,) squared
    return {k: torch.stack(v) for k, v in out.items()}


def weight_norms(adapter: ArchAdapter, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-unit weight norms, fp32 CPU: down_cols (L, F), up_rows (L, F), gate_rows (L, F) (ones without a
    gate), o_blocks (L, H), readers (L, D). A mixture of experts has no (L, F) norms (its neurons are per
    expert: `expert_weight_norms`); its sparse layers' readers include the router and the experts."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    H = adapter.n_heads
    moe = getattr(adapter.config, "model_type", None) in MOE_FIELDS
    experts = expert_weight_norms(adapter.model, weights) if moe else None
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("down_cols", "up_rows", "gate_rows", "o_blocks", "readers")}
    sparse = 0
    for i in range(adapter.n_layers):
        p = adapter.layer(i)
        mat = lambda m: _matrix(adapter, m, weights, names)  # noqa: E731
        o = mat(p.o)  # (D, H*hd)
        out["o_blocks"].append(torch.linalg.vector_norm(o.view(o.shape[0], H, -1), dim=(0, 2)))
        readers = [p.qkv] if p.qkv is not None else [p.q, p.k, p.v]
        if p.down is None:  # a sparse layer: the router and the experts read the hidden stream
            sq = sum(mat(m).square().sum(0) for m in readers) + experts["readers"][sparse]
            out["readers"].append(sq.sqrt())
            sparse += 1
            continue
        readers += [m for m in (p.gate, p.up) if m is not None]
        sq = sum(mat(m).square().sum(0) for m in readers)  # (D,) sum of squares of each input column
        out["readers"].append(sq.sqrt())
        if moe:  # a dense layer of a mixed model keeps its whole MLP: no neuron norms
            continue
        down = mat(p.down)  # (D, F)
        F = down.shape[1]
        out["down_cols"].append(torch.linalg.vector_norm(down, dim=0))
        up = mat(p.up)  # (F, D), or (2F, D) gate rows then up rows when fused
        gate = up[:F] if adapter.fused_gate_up else (mat(p.gate) if p.gate is not None else None)
        up = up[F:] if adapter.fused_gate_up else up
        out["up_rows"].append(torch.linalg.vector_norm(up, dim=1))
        out["gate_rows"].append(torch.linalg.vector_norm(gate, dim=1) if gate is not None else torch.ones(F))
    norms = {k: torch.stack(v) for k, v in out.items() if v}
    if experts is not None:
        norms.update({f"expert_{k}": v for k, v in experts.items() if k != "readers"})
    return norms


def add_criteria(model: nn.Module, scores) -> bool:
    """Add the weight-aware tensors to scores made before they existed (from their activation tensors and
    the model's weights: no forward pass). True when they were added."""
    from engine.importance.stream import stream_info  # stream imports this module: a cycle at the top

    if "heads:weighted" in scores.tensors or "channels_per_layer" not in scores.tensors:
        return False
    info = stream_info(model)
    scores.tensors.update(criterion_tensors(get_adapter(model), scores.tensors,
                                            info.weights if info is not None else None))
    return True


def criterion_tensors(adapter: ArchAdapter, tensors: Mapping[str, torch.Tensor],
                      weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weight-aware tensors from the activation tensors (heads, neurons or expert_neurons,
    channels_per_layer): heads:weighted (L, H), neurons:weighted / neurons:product (L, F) or, for a mixture
    of experts, expert_neurons:weighted / expert_neurons:product (S, E, F), channels:weighted (D,) and
    channels_per_layer:weighted (L, D)."""
    w = weight_norms(adapter, weights)
    per_layer = tensors["channels_per_layer"] * w["readers"]  # (L, D)
    out = {"heads:weighted": tensors["heads"] * w["o_blocks"], "channels:weighted": per_layer.sum(0),
           "channels_per_layer:weighted": per_layer}
    if "expert_down_cols" in w:
        a = tensors["expert_neurons"]  # (S, E, F)
        out["expert_neurons:weighted"] = a * w["expert_down_cols"]
        out["expert_neurons:product"] = a * w["expert_down_cols"] * w["expert_up_rows"] * w["expert_gate_rows"]
    else:
        out["neurons:weighted"] = tensors["neurons"] * w["down_cols"]
        out["neurons:product"] = tensors["neurons"] * w["down_cols"] * w["up_rows"] * w["gate_rows"]
    return out
