"""Expert importance for mixture-of-experts layers, from hooks on the experts module.

For every sparse layer and expert e, over the calibration tokens routed to e (w_t: the router's
weight of e for token t, y_e(x_t): the expert's output, h_e(x_t): its neuron activations act(gate) * up):

- importance[e] = sqrt(sum_t ||w_t y_e(x_t)||^2)   router-weighted L2 of the expert's output
- frequency[e]  = (tokens routed to e) / (tokens)   how often the router selects e
- neurons[e, j] = sqrt(sum_t (w_t h_e(x_t)_j)^2)    router-weighted L2 of each neuron inside e

The hook receives the block's own routing (top_k_index, top_k_weights) and recomputes each chosen
expert on its tokens from the module's weights (one extra expert pass during scoring).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

from engine.arch.moe import MOE_FIELDS, MoEParts, moe_parts


class ExpertCollector:
    """Attach with `with collector:`; run forward passes; read `result()`."""

    def __init__(self, model: torch.nn.Module, when: Callable[[], bool] = lambda: True):
        self.when = when  # hooks record only while this says so (the depth sweep reruns layers)
        n = int(model.config.num_hidden_layers)
        self.parts: dict[int, MoEParts] = {i: p for i in range(n) if (p := moe_parts(model, i)) is not None}
        self.sq: dict[int, torch.Tensor] = {}  # (E,) sum of squared weighted output norms
        self.neuron_sq: dict[int, torch.Tensor] = {}  # (E, F)
        self.count: dict[int, torch.Tensor] = {}  # (E,) routed tokens
        self.tokens: dict[int, int] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, i: int):
        parts = self.parts[i]

        @torch.no_grad()
        def hook(module, args, output):
            if not self.when():
                return
            x, index, weights = args[0], args[1], args[2]  # (N, D), (N, k), (N, k)
            E, F = parts.n_experts, parts.expert_ffn
            if i not in self.sq:
                self.sq[i] = torch.zeros(E, dtype=torch.float64, device=x.device)
                self.neuron_sq[i] = torch.zeros(E, F, dtype=torch.float64, device=x.device)
                self.count[i] = torch.zeros(E, dtype=torch.float64, device=x.device)
                self.tokens[i] = 0
            self.tokens[i] += x.shape[0]
            for e in index.unique().tolist():
                tok, slot = torch.where(index == e)  # tokens routed to e and where e sits in their top-k
                w = weights[tok, slot].float()[:, None]  # (n, 1)
                h, y = parts.expert_forward(e, x[tok])  # (n, F), (n, D)
                self.sq[i][e] += (w * y.float()).pow(2).sum().double()
                self.neuron_sq[i][e] += (w * h.float()).pow(2).sum(0).double()
                self.count[i][e] += tok.numel()
        return hook

    @staticmethod
    def applies(model: torch.nn.Module) -> bool:
        """Is `model` a mixture of experts this collector scores?"""
        return getattr(model.config, "model_type", None) in MOE_FIELDS

    def __enter__(self) -> ExpertCollector:
        for i, p in self.parts.items():
            self._handles.append(p.experts.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> dict[str, torch.Tensor]:
        """experts (S, E), expert_frequency (S, E), expert_neurons (S, E, F) over the S sparse layers in
        order (fp32, CPU), and expert_layers (S,): their layer indices."""
        layers = sorted(self.parts)
        missing = [i for i in layers if i not in self.sq]
        if missing:
            raise RuntimeError(f"no tokens reached the experts of layers {missing} (was the model run?)")
        return {
            "experts": torch.stack([self.sq[i].sqrt() for i in layers]).float().cpu(),
            "expert_frequency": torch.stack([self.count[i] / self.tokens[i] for i in layers]).float().cpu(),
            "expert_neurons": torch.stack([self.neuron_sq[i].sqrt() for i in layers]).float().cpu(),
            "expert_layers": torch.tensor(layers),
        }
