"""Inference speed and size: prefill and decode tokens/s with a KV cache, size on disk.

Used by `engine.evaluate`, the Compare page and bench/latency.py. Timings use the model's own
forward with `past_key_values` (no copied generation code) and wall-clock time with CUDA syncs.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Throughput:
    """Tokens per second at one batch size: prefill over the prompt, then greedy decode."""

    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_ms_per_step: float

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _one_pass(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill of `ids` (B, T) and for `new_tokens` greedy decode steps."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)  # (B, 1)
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def measure_throughput(model, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 32,
                       repeats: int = 3, vocab_size: int | None = None, seed: int = 0) -> Throughput:
    """Median prefill and decode throughput over `repeats` runs after one warm-up run."""
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(device)
    model.eval()
    _one_pass(model, ids, min(new_tokens, 2))  # warm-up: allocator, kernels
    prefill, decode = [], []
    for _ in range(max(1, repeats)):
        p, d = _one_pass(model, ids, new_tokens)
        prefill.append(p)
        decode.append(d)
    p, d = statistics.median(prefill), statistics.median(decode)
    return Throughput(batch_size, prompt_len, new_tokens, batch_size * prompt_len / p,
                      batch_size * new_tokens / d if new_tokens else 0.0,
                      1000 * d / new_tokens if new_tokens else 0.0)


def size_on_disk(folder: str | Path) -> int:
    """Bytes of the weight files of a saved model folder (safetensors / bin)."""
    folder = Path(folder)
    files = [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
    return sum(p.stat().st_size for p in files)
