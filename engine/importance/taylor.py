"""Shortened LLaMA's Taylor criterion for depth: per layer, sum over its weights of |w * dL/dw|.

L is the calibration LM loss (mean next-token NLL over all blocks). Gradients are accumulated in
fp32 buffers across batches; the model's `requires_grad` flags and `.grad` fields are restored.
(The "+" of Taylor+ in the paper — keeping the first and last blocks — is a planning rule, not part
of the score.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.arch import ArchAdapter
from engine.importance.depth import lm_nll


def taylor_scores(adapter: ArchAdapter, blocks: torch.Tensor, batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """(L,) fp32 CPU: sum over each layer's parameters of |w * grad| of the mean calibration loss."""
    model = adapter.model
    device = next(model.parameters()).device
    L = adapter.n_layers
    layer_params = [[p for p in adapter.layers[i].parameters()] for i in range(L)]
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    grads = [[torch.zeros_like(p, dtype=torch.float32) for p in ps] for ps in layer_params]
    n_tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for ps in layer_params:
            for p in ps:
                p.requires_grad_(True)
        with torch.enable_grad():
            for k, b0 in enumerate(range(0, blocks.shape[0], batch_size)):
                ids = blocks[b0:b0 + batch_size].to(device)  # (b, T)
                hidden = adapter.base_model(input_ids=ids, use_cache=False).last_hidden_state
                loss = lm_nll(adapter, hidden, ids) / n_tokens  # this batch's share of the mean loss
                loss.backward()
                for ps, gs in zip(layer_params, grads, strict=True):
                    for p, g in zip(ps, gs, strict=True):
                        if p.grad is not None:
                            g += p.grad.float()
                            p.grad = None
                if on_batch is not None:
                    on_batch(k)
        with torch.no_grad():
            out = torch.stack([
                sum(((p.detach().float() * g).abs().sum() for p, g in zip(ps, gs, strict=True)),
                    torch.zeros((), device=device))
                for ps, gs in zip(layer_params, grads, strict=True)
            ])  # (L,)
    finally:
        for p, req, grad in saved:
            p.requires_grad_(req)
            p.grad = grad
    return out.float().cpu()
