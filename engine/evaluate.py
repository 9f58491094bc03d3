"""Evaluation on held-out token blocks: perplexity, KL divergence from a teacher, and the full
model report (`evaluate_model`: quality, parameters, size on disk, prefill/decode throughput).

All functions run in inference mode, in mini-batches, under bf16 autocast where the device has
native bf16 (CUDA, or a CPU with AVX512-BF16/AMX); losses are reduced in fp32. A teacher can be
given as a model or as its precomputed logits over the same blocks (`teacher_logits`), which
saves one teacher forward per evaluation when many students are compared.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.devices import resolve_dtype
from engine.models import count_parameters
from engine.progress import Progress
from engine.speed import measure_throughput, size_on_disk

log = logging.getLogger(__name__)



def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_ctx(device: torch.device, dtype: torch.dtype | None = None):
    """bf16 autocast on CUDA / bf16-capable CPUs (or `dtype` when given), else a no-op."""

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
def teacher_logits(teacher: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, T, V) fp32 CPU logits of `teacher` over (N, T) blocks, to pass as `teacher` below.

    Memory is N x T x V x 4 bytes (8 x 256 tokens of a 49k vocabulary: 400 MB)."""
    dev = model_device(teacher)
    out = []
    for _, b in _batches(blocks, batch_size):
        with autocast_ctx(dev):
            out.append(logits_of(teacher, b.to(dev)).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def kl_to_teacher(teacher: torch.nn.Module | torch.Tensor, student: torch.nn.Module, blocks: torch.Tensor,
                  batch_size: int = 8, temperature: float = 1.0) -> float:
    """Mean per-token forward KL(teacher || student) over (N, T) blocks."""
    return evaluate_student(teacher, student, blocks, batch_size, temperature)["kl"]


@torch.inference_mode()
def evaluate_student(teacher: torch.nn.Module | torch.Tensor | None, student: torch.nn.Module,
                     blocks: torch.Tensor, batch_size: int = 8, temperature: float = 1.0,
                     progress: Progress | None = None) -> dict[str, float]:
    """Student perplexity and (with a teacher) mean per-token KL(teacher || student), one pass each.

    `teacher` is a model or its (N, T, V) logits over `blocks` (from `teacher_logits`).
    Returns {"ppl": float, "kl": float | None, "teacher_ppl": float | None}."""
    dev = model_device(student)
    cached = isinstance(teacher, torch.Tensor)
    if cached and tuple(teacher.shape[:2]) != tuple(blocks.shape):
        raise ValueError(f"teacher logits cover {tuple(teacher.shape[:2])} tokens, the blocks are {tuple(blocks.shape)}")
    tdev = model_device(teacher) if teacher is not None and not cached else dev
    nll, kl, t_nll, n_nll, n_kl = 0.0, 0.0, 0.0, 0, 0
    for i, b in _batches(blocks, batch_size):
        b = b.to(dev)
        with autocast_ctx(dev):
            s_logits = logits_of(student, b)  # (B, T, V)
        nll += token_nll(s_logits, b).item()
        n_nll += b.shape[0] * (b.shape[1] - 1)
        if cached:
            t_logits = teacher[i: i + b.shape[0]].to(dev)
        elif teacher is not None:
            with autocast_ctx(tdev):
                t_logits = logits_of(teacher, b.to(tdev)).to(dev)
        if teacher is not None:
            kl += token_kl(t_logits, s_logits, temperature).item()
            t_nll += token_nll(t_logits, b).item()  # the teacher's own ppl comes free with its logits
            n_kl += b.numel()
            del t_logits
        del s_logits
        if progress:
            progress(min(1.0, (i + b.shape[0]) / blocks.shape[0]), "evaluating")
    return {"ppl": math.exp(nll / n_nll), "kl": kl / n_kl if teacher is not None else None,
            "teacher_ppl": math.exp(t_nll / n_nll) if teacher is not None else None}


# ---------------------------------------------------------------- the full report of one model


def evaluate_model(model: torch.nn.Module, blocks: torch.Tensor | None,
                   teacher: torch.nn.Module | torch.Tensor | None = None, batch_sizes: Sequence[int] = (1, 16),
                   prompt_len: int = 128, new_tokens: int = 32, folder: str | Path | None = None,
                   repeats: int = 3, batch_size: int = 8, progress: Progress | None = None) -> dict:
    """Quality, size and speed of `model`.

    blocks: held-out (N, T) token blocks (None skips ppl / KL); teacher: a model or its logits over
    `blocks` (adds the mean per-token KL); batch_sizes: one throughput row per batch size from
    `engine.speed.measure_throughput` (empty skips speed); folder: the saved model folder, for
    its size on disk. Returns {"params", "ppl", "kl", "eval_tokens", "eval_s", "size_on_disk",
    "throughput": [Throughput.to_dict(), ...]} (absent measurements are None / []).
    """

    if any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if prompt_len < 1 or new_tokens < 0:
        raise ValueError(f"prompt_len must be >= 1 and new_tokens >= 0, got {prompt_len} and {new_tokens}")
    out: dict = {"params": count_parameters(model), "ppl": None, "kl": None, "eval_tokens": 0, "eval_s": None,
                 "size_on_disk": size_on_disk(folder) if folder is not None else None, "throughput": []}
    if blocks is not None:
        t0 = time.perf_counter()
        r = evaluate_student(teacher, model, blocks, batch_size, progress=progress)
        out.update(ppl=r["ppl"], kl=r["kl"], eval_tokens=int(blocks.numel()), eval_s=time.perf_counter() - t0)
        log.info("perplexity %.3f%s on %d tokens", r["ppl"], "" if r["kl"] is None else f", KL {r['kl']:.4f}",
                 blocks.numel())
    for bs in batch_sizes:
        tp = measure_throughput(model, int(bs), prompt_len, new_tokens, repeats)
        log.info("batch %d: prefill %.1f tok/s, decode %.1f tok/s", bs, tp.prefill_tokens_per_s,
                 tp.decode_tokens_per_s)
        out["throughput"].append(tp.to_dict())
    return out


def summary_row(name: str, result: dict) -> dict:
    """A flat table row from an `evaluate_model` result: name, params, ppl, KL, size, tok/s per batch."""
    row: dict = {"model": name, "params": result.get("params"), "ppl": result.get("ppl"), "kl": result.get("kl")}
    if result.get("size_on_disk") is not None:
        row["size_MB"] = result["size_on_disk"] / 1e6
    for tp in result.get("throughput") or []:
        row[f"prefill_b{tp['batch_size']}"] = tp["prefill_tokens_per_s"]
        row[f"decode_b{tp['batch_size']}"] = tp["decode_tokens_per_s"]
    return row


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table (also readable in a terminal) of `rows`; columns default to every key, in
    first-seen order; missing values show as '-', numbers compactly (4 significant digits)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    width = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, width, numeric, strict=True)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                         for w, num in zip(width, numeric, strict=True)) + "|"
    return "\n".join([line(list(columns)), sep, *(line(r) for r in cells)])
