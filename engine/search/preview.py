"""One-shot quality of a set of targets: prune in memory from cached scores, one forward, KL / ppl.

The teacher's side (its log-probabilities over the evaluation blocks, and its perplexity) is
computed once per model and evaluation set and kept in the cache (`TeacherSide`), so a preview is
make_plan + apply_plan (index copies, no model written) + one forward of the pruned model + the KL.
Every preview of a model is appended to its preview store (`previews/<fingerprint>.jsonl` in the
cache), keyed by (model, scores, targets, data, evaluation size): a setting tried before is
answered from the store, and the dashboard's size-vs-quality map is drawn from it.

Numbers: KL is the mean per-token forward KL(teacher || pruned) in nats over all N x T positions,
perplexity is exp(mean next-token NLL) over N x (T - 1) positions: the definitions of
engine.evaluate.evaluate_student, which a test checks them against.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from engine.errors import PlanError
from engine.evaluate import autocast_ctx, logits_of, model_device
from engine.fileio import atomic_write, read_json, write_json
from engine.paths import cache_dir
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.refit import refit
from engine.search.shapes import kind_of
from engine.search.store import arrays_digest, digest

log = logging.getLogger(__name__)

def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def scores_digest(scores) -> str:
    """Identity of a scores object by content (the hash `store.scores_key` gives its folder)."""
    return arrays_digest({k: v.detach().float().cpu().numpy() for k, v in scores.tensors.items()})


# ---------------------------------------------------------------- the teacher's side, once


@dataclass
class TeacherSide:
    """The teacher's log-probabilities over (N, T) evaluation blocks and its perplexity."""

    blocks: torch.Tensor  # (N, T) token ids
    logp: torch.Tensor  # (N, T, V) fp32 log-probabilities on the CPU
    ppl: float
    key: str


@torch.inference_mode()
def compute_teacher_side(teacher: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> TeacherSide:
    """The teacher's fp32 log-probabilities over `blocks` (one forward) and its perplexity."""

    dev = model_device(teacher)
    out, nll = [], 0.0
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i: i + batch_size].to(dev)
        with autocast_ctx(dev):
            logits = logits_of(teacher, b)
        logp = F.log_softmax(logits.float(), -1)  # (B, T, V)
        nll += _nll(logp, b).item()
        out.append(logp.cpu())
    n = blocks.shape[0] * (blocks.shape[1] - 1)
    return TeacherSide(blocks=blocks.cpu(), logp=torch.cat(out), ppl=math.exp(nll / n), key="")


def teacher_side(teacher: torch.nn.Module, blocks: torch.Tensor, model_fp: str, batch_size: int = 4,
                 folder: Path | None = None) -> TeacherSide:
    """`compute_teacher_side`, cached on disk (safetensors + JSON) by model fingerprint and blocks."""
    key = digest({"model": model_fp, "blocks": tensor_digest(blocks), "shape": list(blocks.shape)})
    folder = Path(folder) if folder is not None else cache_dir() / "teacher" / key
    meta = read_json(folder / "teacher.json")
    if meta is not None and meta.get("key") == key and (folder / "teacher.safetensors").is_file():
        try:
            t = load_file(str(folder / "teacher.safetensors"))
            if tuple(t["logp"].shape[:2]) == tuple(blocks.shape) and torch.equal(t["blocks"], blocks.cpu()):
                log.info("teacher side reused from %s", folder)
                return TeacherSide(blocks=t["blocks"], logp=t["logp"], ppl=float(meta["ppl"]), key=key)
        except (OSError, KeyError, ValueError) as e:  # a damaged file is recomputed
            log.warning("teacher side in %s unreadable (%s); recomputing", folder, e)
    side = compute_teacher_side(teacher, blocks, batch_size)
    side.key = key
    data = {"blocks": side.blocks.contiguous(), "logp": side.logp.contiguous()}
    atomic_write(folder / "teacher.safetensors", lambda f: f.write(save(data)), binary=True)
    write_json(folder / "teacher.json", {"key": key, "ppl": side.ppl, "shape": list(side.logp.shape),
                                         "model": model_fp})
    return side


# ---------------------------------------------------------------- one preview


def _nll(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL from (B, T, V) log-probabilities."""
    return -logp[:, :-1].gather(-1, ids[:, 1:, None]).sum()


@torch.inference_mode()
def student_quality(student: torch.nn.Module, side: TeacherSide, batch_size: int = 4) -> dict[str, float]:
    """{"kl", "ppl"} of `student` against the cached teacher side: one forward over the blocks."""

    dev = model_device(student)
    kl, nll = 0.0, 0.0
    for i in range(0, side.blocks.shape[0], batch_size):
        b = side.blocks[i: i + batch_size].to(dev)
        with autocast_ctx(dev):
            logits = logits_of(student, b)
        s = F.log_softmax(logits.float(), -1)  # (B, T, V)
        del logits
        t = side.logp[i: i + batch_size].to(dev)
        kl += F.kl_div(s, t, log_target=True, reduction="sum").item()
        nll += _nll(s, b).item()
    n = side.blocks.numel()
    return {"kl": kl / n, "ppl": math.exp(nll / (n - side.blocks.shape[0]))}


def preview(teacher: torch.nn.Module, scores, targets, side: TeacherSide, batch_size: int = 4,
            calib: torch.Tensor | None = None) -> dict:
    """Prune `teacher` to `targets` in memory (plan from `scores`), measure one-shot KL and ppl; with
    `targets.refit`, the student is refitted on `calib` (the scores' calibration blocks) first.

    Returns {"kl", "ppl", "teacher_ppl", "params", "fraction", "sizes", "kind", "seconds": {...}}."""

    t0 = time.perf_counter()
    plan = make_plan(scores, targets)
    t1 = time.perf_counter()
    student = apply_plan(teacher, plan, check_fingerprint=False).eval()
    if targets.refit:
        if calib is None:
            raise PlanError("a refitted preview needs the calibration blocks the scores were computed on")
        refit(teacher, student, plan, calib)
    t2 = time.perf_counter()
    q = student_quality(student, side, batch_size)
    t3 = time.perf_counter()
    est = plan.estimate()
    sz, spec = plan.sizes, plan.spec
    del student
    return {**q, "teacher_ppl": side.ppl, "params": est.params, "fraction": est.fraction_of_source,
            "source_params": est.source_params, "sizes": dict(sz.__dict__),
            "kind": kind_of(spec, sz.hidden, sz.ffn, sz.heads, sz.layers, sz.experts),
            "seconds": {"plan": t1 - t0, "prune": t2 - t1, "forward_kl": t3 - t2, "total": t3 - t0}}
