"""Evaluation on held-out token blocks: perplexity, and KL divergence from a teacher.

All functions run in inference mode, in mini-batches, under bf16 autocast where the device has
native bf16 (CUDA, or a CPU with AVX512-BF16/AMX); losses are reduced in fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Progress = Callable[[float, str], None]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_ctx(device: torch.device, dtype: torch.dtype | None = None):
    """bf16 autocast on CUDA / bf16-capable CPUs (or `dtype` when given), else a no-op."""
    from engine.models import resolve_dtype

    dt = dtype or resolve_dtype("auto", device)
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dt)


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, V) logits, no KV cache."""
    return model(input_ids=ids, use_cache=False).logits


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Summed forward KL(teacher || student) over all positions, in fp32; (B, T, V) x 2 -> scalar.

    Divide by the number of tokens for the mean per-token KL."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood; (B, T, V), (B, T) -> scalar over B*(T-1) tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def _batches(blocks: torch.Tensor, batch_size: int):
    for i in range(0, blocks.shape[0], batch_size):
        yield i, blocks[i: i + batch_size]


@torch.inference_mode()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8,
               progress: Progress | None = None) -> float:
    """exp(mean next-token NLL) of `model` over (N, T) blocks."""
    dev = model_device(model)
    nll, n = 0.0, 0
    for i, b in _batches(blocks, batch_size):
        b = b.to(dev)
        with autocast_ctx(dev):
            logits = logits_of(model, b)
        nll += token_nll(logits, b).item()
        n += b.shape[0] * (b.shape[1] - 1)
        if progress:
            progress(min(1.0, (i + b.shape[0]) / blocks.shape[0]), "perplexity")
    return math.exp(nll / n)


@torch.inference_mode()
def kl_to_teacher(teacher: torch.nn.Module, student: torch.nn.Module, blocks: torch.Tensor,
                  batch_size: int = 8, temperature: float = 1.0) -> float:
    """Mean per-token forward KL(teacher || student) over (N, T) blocks."""
    return evaluate_student(teacher, student, blocks, batch_size, temperature)["kl"]


@torch.inference_mode()
def evaluate_student(teacher: torch.nn.Module | None, student: torch.nn.Module, blocks: torch.Tensor,
                     batch_size: int = 8, temperature: float = 1.0,
                     progress: Progress | None = None) -> dict[str, float]:
    """Student perplexity and (with a teacher) mean per-token KL(teacher || student), one pass each.

    Returns {"ppl": float, "kl": float | None}."""
    dev = model_device(student)
    tdev = model_device(teacher) if teacher is not None else dev
    nll, kl, n_nll, n_kl = 0.0, 0.0, 0, 0
    for i, b in _batches(blocks, batch_size):
        b = b.to(dev)
        with autocast_ctx(dev):
            s_logits = logits_of(student, b)  # (B, T, V)
        nll += token_nll(s_logits, b).item()
        n_nll += b.shape[0] * (b.shape[1] - 1)
        if teacher is not None:
            with autocast_ctx(tdev):
                t_logits = logits_of(teacher, b.to(tdev)).to(dev)
            kl += token_kl(t_logits, s_logits, temperature).item()
            n_kl += b.numel()
            del t_logits
        del s_logits
        if progress:
            progress(min(1.0, (i + b.shape[0]) / blocks.shape[0]), "evaluating")
    return {"ppl": math.exp(nll / n_nll), "kl": kl / n_kl if teacher is not None else None}
