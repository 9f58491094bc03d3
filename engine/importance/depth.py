"""Depth scores by perplexity: remove one layer (or a block of n) and measure the loss.

The hidden state entering every layer is captured once (by `WidthCollector(capture=True)`, in the
width pass). Removing layer i then only re-runs layers i+1..L-1 from the cached input of layer i:
the model's own forward runs on `adapter.only_layers(range(i+1, L))`, with a pre-hook on the first
remaining module (that layer, or the final norm) that swaps in the cached hidden state. Embeddings,
masks and rotary/learned positions come from the HF forward itself, so no model code is copied.

Cost of the sweep over all L layers: L(L-1)/2 layer passes + L lm_head passes, i.e. about
(L-1)/2 forward passes plus the lm_head share, instead of L full passes for naive removal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.arch import ArchAdapter

LOGITS_CHUNK_ELEMENTS = 1 << 25  # fp32 logits kept at once: 128 MiB


def lm_nll(adapter: ArchAdapter, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods (fp32 scalar) from final-normed hidden states.

    hidden: (B, T, D) = the base model's last_hidden_state; ids: (B, T). Equals HF's causal-LM loss
    times the B * (T - 1) predicted tokens; the logits are made in chunks to bound memory.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), D)
    target = ids[:, 1:].reshape(-1).to(h.device)  # (B*(T-1),)
    vocab = int(adapter.lm_head.weight.shape[0])
    chunk = max(128, LOGITS_CHUNK_ELEMENTS // vocab)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = adapter.logits(h[s:s + chunk]).float()  # (chunk, V), with the family's logit scaling / capping
        total = total + F.cross_entropy(logits, target[s:s + chunk], reduction="sum")
    return total


def run_from(adapter: ArchAdapter, ids: torch.Tensor, layers: Sequence[int],
             hidden: torch.Tensor) -> torch.Tensor:
    """Run `layers` (in order) with `hidden` (B, T, D) as the input of the first of them, then the
    final norm; returns the base model's last_hidden_state (B, T, D). `hidden` must be the state
    the original model had at that point (e.g. the captured input of the removed layer)."""
    layers = list(layers)

    def swap(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    with adapter.only_layers(layers):
        target = adapter.layers[0] if layers else adapter.final_norm
        handle = target.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            out = adapter.base_model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
    return out.last_hidden_state


def removal_nll(adapter: ArchAdapter, ids: torch.Tensor, captured: Sequence[torch.Tensor], n: int = 1,
                on_step=None) -> torch.Tensor:
    """NLL sums (fp64, CPU) with each window of n contiguous layers removed, shape (L - n + 1,).

    captured[i]: (B, T, D) input of layer i for this batch. Window b removes layers b..b+n-1 and
    re-runs b+n..L-1 from captured[b]. `on_step(b)` is called after each window.
    """
    L = adapter.n_layers
    out = torch.zeros(L - n + 1, dtype=torch.float64)
    for b in range(L - n + 1):
        final = run_from(adapter, ids, range(b + n, L), captured[b])
        out[b] = lm_nll(adapter, final, ids).double().item()
        if on_step is not None:
            on_step(b)
    return out
