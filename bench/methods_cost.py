"""What each retraining method costs per step on the built-in model: training tokens/s and measured peak
memory of kd, cpt and lora on the quality benchmark's students, with engine.resources' estimate beside it.

The quality rows (bench/quality.py, group "retraining method") give each method's quality after the full
98,304-token budget; their wall times depend on whatever else ran on the machine. This script runs a few
steps of each method back to back, in one process, so their speeds are comparable as ratios:

    .venv/bin/python bench/methods_cost.py [--steps 5] [--shapes depth_block,width_all] [--out FILE]

Each method runs in a fresh process (so one method's freed memory cannot raise the next one's peak); the
teacher is dropped before training when the method does not use it (cpt), as a cpt job never loads it.
Speed: the median tokens/s of the steps after the first (a warm-up). Peak: engine.peak_memory's measure
of the distillation (on a CPU the process's resident-set high-water mark, reset when training starts,
so it also holds the interpreter, the libraries and the calibration scores: compare methods with each
other; the estimate counts the training step's tensors only). Settings as bench/quality.py's full run: batch 4 x 256 tokens, lr 3e-4, KL + CE,
LoRA rank 16 on the KD loss, fp32.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import WIKITEXT, machine_note, prune, scores_for, strategies, train_blocks

from engine.arch import get_adapter
from engine.devices import compute_dtype
from engine.distill import DistillConfig, distill
from engine.fileio import read_jsonl
from engine.models import load
from engine.resources import training_peak

METHODS = ("kd", "cpt", "lora")


def measure(teacher, student, train, method: str, steps: int, batch: int, seq_len: int, teacher_config) -> dict:
    """A few steps of one method: median tokens/s after the first step, and the measured peak."""
    cfg = DistillConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=3e-4, warmup_steps=1, ce_weight=1.0,
                        eval_every=10**9, checkpoint_every=10**9, keep_checkpoints=1, seed=0, method=method,
                        dtype="fp32")
    with tempfile.TemporaryDirectory(prefix="prunescope-methods-") as run_dir:
        r = distill(teacher, student, train, None, cfg, run_dir, resume=False)
        rows = [x for x in read_jsonl(Path(run_dir) / "metrics.jsonl") if "tokens_per_s" in x]
    tps = statistics.median(x["tokens_per_s"] for x in rows[1:] or rows)
    est = training_peak(student.config, method=method, batch=batch, seq_len=seq_len,
                        teacher_config=teacher_config)
    return {"tokens_per_s": round(tps, 1), "peak_mib": round(r["peak_memory_bytes"] / 2**20, 1),
            "estimate_mib": round(est.total / 2**20, 1), "steps": steps}


def one(shape: str, method: str, steps: int, batch: int, seq_len: int) -> dict:
    """One method on one shape, in this process: prune, then measure."""
    with compute_dtype("fp32"):
        loaded = load("default", dtype="fp32")
        teacher = loaded.model
        spec = get_adapter(teacher).spec()
        by_name = {s.name: s for s in strategies(spec)}
        drop = spec.n_layers - (by_name["depth_bi"].targets.layers or spec.n_layers)
        scores = scores_for(loaded, WIKITEXT, 32, 256, drop)
        train = train_blocks(loaded.tokenizer, WIKITEXT, steps * batch * seq_len, seq_len)
        t0 = time.perf_counter()
        student = prune(teacher, scores, by_name[shape].targets)
        teacher_config = teacher.config
        if method == "cpt":
            del teacher, loaded, scores
            gc.collect()
            teacher = None
        row = measure(teacher, student, train, method, steps, batch, seq_len, teacher_config)
    return {"shape": shape, "method": method, **row, "seconds": round(time.perf_counter() - t0, 1),
            "machine": machine_note()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shapes", default="depth_block,width_all")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    batch, seq_len = 4, 256
    if a.one:
        print("RESULT " + json.dumps(one(*a.one, a.steps, batch, seq_len)), flush=True)
        return
    notes = [f"start: {machine_note()}"]
    out = []
    for shape in a.shapes.split(","):
        for method in METHODS:
            r = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--one", shape, method],
                               capture_output=True, text=True, check=True)
            out.append(json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:]))
            print(json.dumps(out[-1]), flush=True)
    notes.append(f"end: {machine_note()}")
    for shape in a.shapes.split(","):
        kd = next(r for r in out if r["shape"] == shape and r["method"] == "kd")
        for r in out:
            if r["shape"] == shape:
                print(f"{shape:>12} {r['method']:>5}: {r['tokens_per_s']:7.1f} tokens/s "
                      f"({r['tokens_per_s'] / kd['tokens_per_s']:.2f} x kd), peak {r['peak_mib']:,.0f} MiB "
                      f"(estimate {r['estimate_mib']:,.0f} MiB)")
    if a.out:
        a.out.write_text(json.dumps({"machine": notes, "batch": batch, "seq_len": seq_len, "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
