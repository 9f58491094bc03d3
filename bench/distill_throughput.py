"""Distillation throughput against its bound.

bound = 1 / (t_teacher_fwd + t_student_step) tokens/s, where both are timed separately on the same
batch: the teacher's forward (no grad) and the student's forward + KL loss (against precomputed
teacher logits) + backward + AdamW step. The distill loop's median step then gives the ratio
(target >= 0.9).

    .venv/bin/python bench/distill_throughput.py [--batch 4] [--seq-len 256] [--steps 8] [--student pruned|copy]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.devices import resolve_dtype
from engine.distill import DistillConfig, distill, param_groups
from engine.evaluate import autocast_ctx, token_kl
from engine.models import count_parameters, load
from engine.paths import SHARED_WIKITEXT
from engine.runs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]

WIKITEXT = SHARED_WIKITEXT


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of fn() over reps runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_student(teacher, tok, how: str, ffn: int):
    if how == "copy":
        return copy.deepcopy(teacher.model).float()
    from engine.data import DataSource
    from engine.importance import score
    from engine.plan import make_plan
    from engine.prune import apply_plan
    from engine.targets import Targets

    src = DataSource.parse(str(WIKITEXT) if WIKITEXT.is_file() else "generated:16", docs=(0.0, 0.6))
    scores, _ = score(teacher, src, 8, 128)
    return apply_plan(teacher.model, make_plan(scores, Targets(ffn=ffn))).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="distill steps (the first 2 are warm-up)")
    ap.add_argument("--reps", type=int, default=4, help="timed repetitions of each separate piece")
    ap.add_argument("--student", choices=["pruned", "copy"], default="pruned")
    ap.add_argument("--ffn", type=int, default=896, help="MLP width of the pruned student (~75%% params)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    teacher = load("default")
    student = make_student(teacher, teacher.tokenizer, args.student, args.ffn)
    dev = next(teacher.model.parameters()).device
    student.to(dev)
    amp = resolve_dtype("auto", dev)
    B, T = args.batch, args.seq_len
    ids = torch.randint(3, teacher.tokenizer.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(dev)
    tokens = B * T
    print(f"device {dev}, autocast {amp}, threads {torch.get_num_threads()}, batch {B} x {T}")
    print(f"teacher {count_parameters(teacher.model) / 1e6:.1f}M params, student "
          f"{count_parameters(student) / 1e6:.1f}M ({args.student})")

    tm = teacher.model.eval().requires_grad_(False)

    def teacher_fwd():
        with torch.no_grad(), autocast_ctx(dev, amp):
            return tm(input_ids=ids, use_cache=False).logits

    t_logits = teacher_fwd()
    s = copy.deepcopy(student).train()
    opt = torch.optim.AdamW(param_groups(s, 0.01), lr=1e-5, betas=(0.9, 0.95), fused=dev.type == "cuda")

    def student_step():
        with autocast_ctx(dev, amp):
            logits = s(input_ids=ids, use_cache=False).logits
        loss = token_kl(t_logits, logits) / ids.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    t_teacher = timed(teacher_fwd, args.reps, dev)
    t_student = timed(student_step, args.reps, dev)
    bound = tokens / (t_teacher + t_student)
    print(f"teacher forward        {t_teacher * 1000:8.1f} ms  ({tokens / t_teacher:8.0f} tok/s)")
    print(f"student fwd+bwd+step   {t_student * 1000:8.1f} ms  ({tokens / t_student:8.0f} tok/s)")
    print(f"bound (sum)            {(t_teacher + t_student) * 1000:8.1f} ms  ({bound:8.0f} tok/s)")

    blocks = torch.randint(3, teacher.tokenizer.vocab_size, (max(B * args.steps, 8), T),
                           generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(steps=args.steps, batch_size=B, seq_len=T, lr=1e-5, warmup_steps=1,
                        eval_every=10**6, checkpoint_every=10**6, keep_checkpoints=1)
    with tempfile.TemporaryDirectory() as d:
        distill(tm, student, blocks, None, cfg, d)
        rows = [r for r in read_jsonl(Path(d) / "metrics.jsonl") if not r.get("eval")]
    per_step = [r["tokens_per_s"] for r in rows[2:]] or [r["tokens_per_s"] for r in rows]
    loop = statistics.median(per_step)
    print(f"distill loop (median)  {tokens / loop * 1000:8.1f} ms  ({loop:8.0f} tok/s) over {len(per_step)} steps")
    print(f"ratio loop / bound     {loop / bound:8.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
