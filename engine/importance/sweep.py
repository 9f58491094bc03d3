"""The cost of the perplexity sweep, before it starts: a formula in layer passes times a measured time.

One "layer pass" is one decoder layer run over one calibration sample of seq_len tokens. Per sample:

    capture forward      L            (shared with the width pass when that runs too)
    base perplexity      h            (one lm_head pass; h = its cost in layer passes)
    layer sweep          L(L-1)/2 + L*h     (removing layer i re-runs layers i+1..L-1, then the lm_head)
    block sweep (n)      sum_b (L-b-n) + (L-n+1)*h   over the L-n+1 blocks b..b+n-1

h is the lm_head's multiply-adds over one decoder layer's (vocab x hidden against the attention and
MLP projections), e.g. 8.0 for SmolLM2-135M (49,152 x 576 against 3.5M weights per layer): its 30
lm_head passes cost about half as much as its 435 layer passes. The seconds per layer pass come from
a timed forward (`measure_layer_seconds`) or from the width pass of existing scores
(`layer_seconds_from_meta`). Torch-free at import (the dashboard shows estimates).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

CPU_DEPTH_SAMPLES = 8  # default sweep samples on a CPU (the sweep costs ~(L-1)/2 forwards per sample)


def default_depth_samples(n_samples: int, device_type: str) -> int:
    """Calibration samples the perplexity sweep uses by default: all on a GPU, at most 8 on a CPU."""
    return n_samples if device_type != "cpu" else min(n_samples, CPU_DEPTH_SAMPLES)


def lm_head_layers(arch: Mapping) -> float:
    """The lm_head's cost in decoder-layer passes (multiply-adds), from an ArchSpec dict."""
    d, hd = int(arch["hidden_size"]), int(arch["head_dim"])
    attn = d * hd * (2 * int(arch["n_heads"]) + 2 * int(arch["n_kv_heads"]))  # q, o + k, v
    mlp = (3 if arch.get("gated_mlp", True) else 2) * d * int(arch["intermediate_size"])
    return int(arch["vocab_size"]) * d / max(attn + mlp, 1)


def sweep_layer_passes(n_layers: int, head: float, depth_ppl: bool = True, block_size: int | None = None,
                       block_ppl: bool = False, capture: bool = True) -> float:
    """Layer passes per calibration sample for the perplexity sweep (see the module docstring)."""
    L = n_layers
    units = ((L if capture else 0) + head) if (depth_ppl or block_ppl) else 0.0
    if depth_ppl:
        units += L * (L - 1) / 2 + L * head
    if block_ppl and block_size:
        n = block_size
        units += sum(L - b - n for b in range(L - n + 1)) + (L - n + 1) * head
    return units


def estimate_sweep_seconds(layer_seconds: float, arch: Mapping, depth_samples: int, depth_ppl: bool = True,
                           block_size: int | None = None, block_ppl: bool = False, capture: bool = True) -> float:
    """Seconds the perplexity sweep will take on `depth_samples` samples, given the measured seconds of
    one layer pass over one sample (`measure_layer_seconds` or `layer_seconds_from_meta`)."""
    per_sample = sweep_layer_passes(int(arch["n_layers"]), lm_head_layers(arch), depth_ppl, block_size,
                                    block_ppl, capture)
    return layer_seconds * per_sample * depth_samples


def layer_seconds_from_meta(meta: Mapping) -> float | None:
    """Seconds per layer pass per sample, from a scores file's timed width pass (None when not recorded)."""
    t, n, L = (meta.get("timings") or {}).get("width_bi"), meta.get("n_samples"), meta.get("n_layers")
    if not t or not n or not L:
        return None
    return float(t) / (int(n) * int(L))


def measure_layer_seconds(model, seq_len: int, batch_size: int = 1, repeats: int = 1) -> float:
    """Seconds per layer pass per sample of `seq_len` tokens: the fastest of `repeats` timed forwards of the
    decoder (no lm_head) on random (batch_size, seq_len) ids, after a short warm-up forward, divided by
    batch x layers. Time it at the batch the sweep will run (per-sample cost falls with the batch)."""
    import torch

    from engine.arch import get_adapter
    from engine.importance.stream import execution_device

    adapter = get_adapter(model)
    device = execution_device(model)
    gen = torch.Generator().manual_seed(0)
    vocab = int(adapter.embed_tokens.weight.shape[0])
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
    best = math.inf
    with torch.no_grad():
        adapter.base_model(input_ids=ids[:1, :16], use_cache=False)  # warm-up: kernels, allocator
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            adapter.base_model(input_ids=ids, use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return best / (batch_size * adapter.n_layers)


def format_seconds(seconds: float) -> str:
    """'45 s', '3 min 20 s', '1 h 05 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
