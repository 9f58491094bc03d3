"""Width and block-importance statistics from one forward pass, with hooks on the model's own modules.

Per layer i (hooks via the adapter, no model code copied):

- heads:    input of `o` (B, T, H*hd), the concatenated per-head context   -> channel stats -> L2 per head
- neurons:  input of `down` (B, T, F), act(gate) * up (or GPT-2's act(c_fc))
- channels: output of each norm in `adapter.norms(i)` (B, T, D), one stat per norm, summed afterwards
- BI:       1 - cos(layer input, layer output) per token, summed; blocks of n layers likewise
            between the input of the first and the output of the last layer of the block.

Only per-batch reductions are kept: (B, C) per hook before they are merged into running stats.
With `capture=True` the input of every layer for the current batch is kept (cloned) so the depth
sweep can restart from it; `clear_batch()` drops it.
"""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle

from engine.arch import ArchAdapter, hidden_from_args, hidden_from_output
from engine.importance.aggregate import RunningStats, parse_aggregation, reduce_seq
from engine.importance.scores import ScoreError


def _cos_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over all tokens of cos(x_t, y_t), fp32 scalar; x, y: (B, T, D)."""
    if x.dtype != torch.float32:
        x, y = x.float(), y.float()
    # vecdot + norms: no normalised copies of x and y (F.cosine_similarity makes them; 1.5x slower)
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)  # (B, T)
    return (torch.linalg.vecdot(x, y) / norms.clamp_min(1e-8)).sum()  # (B, T) -> ()


class WidthCollector:
    """Attach with `with collector:`; run forward passes; read `result()`.

    Hooks do nothing while `enabled` is False (the depth sweep runs with them silenced).
    """

    def __init__(self, adapter: ArchAdapter, aggregation: str = "l2_mean", block_size: int | None = None,
                 capture: bool = False):
        self.adapter = adapter
        self.batch_how, self.seq_how = parse_aggregation(aggregation)
        self.n_layers = L = adapter.n_layers
        if block_size is not None and not 1 <= block_size <= L:
            raise ScoreError(f"block size must be between 1 and the number of layers ({L}), got {block_size}")
        self.block_size = block_size
        self.capture = capture
        self.enabled = True
        self.heads = [RunningStats() for _ in range(L)]
        self.neurons = [RunningStats() for _ in range(L)]
        self.norms = [[RunningStats() for _ in adapter.norms(i)] for i in range(L)]
        self.cos_sum: torch.Tensor | None = None  # (L,) fp32 on the model's device
        self.block_cos_sum: torch.Tensor | None = None  # (L - n + 1,)
        self.tokens = 0
        self.captured: list[torch.Tensor | None] = [None] * L  # inputs of each layer, this batch
        self._window: dict[int, torch.Tensor] = {}  # layer inputs still needed for block BI
        self._handles: list[RemovableHandle] = []

    # -- hooks -------------------------------------------------------------
    def _stat_pre_hook(self, stats: RunningStats):
        def hook(module, args):
            if self.enabled:
                stats.update(reduce_seq(args[0].detach(), self.seq_how))  # (B, T, C) -> (B, C)
        return hook

    def _stat_out_hook(self, stats: RunningStats):
        def hook(module, args, output):
            if self.enabled:
                stats.update(reduce_seq(hidden_from_output(output).detach(), self.seq_how))
        return hook

    def _block_hook(self, i: int):
        n = self.block_size

        def hook(module, args, kwargs, output):
            if not self.enabled:
                return
            x = hidden_from_args(args, kwargs).detach()  # (B, T, D) layer input
            y = hidden_from_output(output).detach()  # (B, T, D) layer output
            if self.cos_sum is None:
                self.cos_sum = torch.zeros(self.n_layers, dtype=torch.float32, device=y.device)
                if n is not None:
                    self.block_cos_sum = torch.zeros(self.n_layers - n + 1, dtype=torch.float32,
                                                     device=y.device)
            self.cos_sum[i] += _cos_sum(x, y)
            if self.capture:
                self.captured[i] = x.clone()
            if n is not None:
                self._window[i] = self.captured[i] if self.capture else x
                first = i - n + 1
                if first >= 0:
                    self.block_cos_sum[first] += _cos_sum(self._window.pop(first), y)
        return hook

    def __enter__(self) -> WidthCollector:
        a = self.adapter
        try:
            for i in range(self.n_layers):
                p = a.layer(i)
                self._handles.append(p.o.register_forward_pre_hook(self._stat_pre_hook(self.heads[i])))
                if p.down is not None:  # None: a mixture-of-experts layer (engine.importance.experts)
                    self._handles.append(p.down.register_forward_pre_hook(self._stat_pre_hook(self.neurons[i])))
                for norm, stats in zip(a.norms(i), self.norms[i], strict=True):
                    self._handles.append(norm.register_forward_hook(self._stat_out_hook(stats)))
                self._handles.append(p.block.register_forward_hook(self._block_hook(i), with_kwargs=True))
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear_batch()

    def count_tokens(self, ids: torch.Tensor) -> None:
        """Call once per calibration batch (the BI means are over all its tokens)."""
        self.tokens += ids.numel()

    def clear_batch(self) -> None:
        self.captured = [None] * self.n_layers
        self._window.clear()

    # -- results -----------------------------------------------------------
    def result(self) -> dict[str, torch.Tensor]:
        """The width and BI tensors (fp32, CPU): heads (L, H), neurons (L, F), channels (D,),
        channels_per_layer (L, D), bi (L,), block_bi (L - n + 1,) when a block size is set."""
        if self.cos_sum is None or self.tokens == 0:
            raise ScoreError("no activations were recorded (was the model run inside the collector?)")
        how = self.batch_how
        try:
            channels_o = torch.stack([s.result(how) for s in self.heads])  # (L, H*hd)
            sparse = any(self.adapter.layer(i).down is None for i in range(self.n_layers))
            neurons = None if sparse else torch.stack([s.result(how) for s in self.neurons])  # (L, F)
            per_layer = torch.stack([sum(s.result(how) for s in layer) for layer in self.norms])  # (L, D)
        except RuntimeError as e:  # torch.stack on different widths
            raise ScoreError(f"layers have different widths; scoring needs uniform layers ({e})") from e
        H = self.adapter.n_heads
        if channels_o.shape[1] % H:
            raise ScoreError(f"attention output width {channels_o.shape[1]} is not a multiple of "
                             f"{H} heads")
        heads = torch.linalg.vector_norm(channels_o.view(self.n_layers, H, -1), dim=-1)  # (L, H)
        out = {
            "heads": heads, "neurons": neurons, "channels": per_layer.sum(0),
            "channels_per_layer": per_layer, "bi": 1 - self.cos_sum / self.tokens,
        }
        if neurons is None:  # the experts' neurons are scored per expert instead
            del out["neurons"]
        if self.block_cos_sum is not None:
            out["block_bi"] = 1 - self.block_cos_sum / self.tokens
        return {k: v.detach().float().cpu() for k, v in out.items()}
