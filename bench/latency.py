"""Latency of the original model vs each pruned shape at ~75% of the parameters (no distillation).

Tests Shortened LLaMA's claim that depth pruning speeds up small-batch inference more than width
pruning: prefill and decode tokens/s at batch 1 and 16 (engine.speed.measure_throughput, KV cache,
greedy decode). The depth strategies (BI / ppl / block) share one shape, so one row stands for them.
Models are measured in interleaved rounds (every model once per round, median over rounds) so that
load changes on a shared machine hit every model alike. On a machine shared with other
multi-threaded jobs, `--threads 1` avoids OpenMP threads waiting on busy cores (which can make a
decode step 10x slower and dominate the comparison).

    .venv/bin/python bench/latency.py [--rounds 3] [--prompt-len 128] [--new-tokens 32] [--batch-sizes 1,16]

Writes docs/quality/latency.json and docs/quality/latency.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import (
    OUT_DIR,
    WIKITEXT,
    describe_targets,
    machine_note,
    prune,
    scores_for,
    strategies,
    unique_by_shape,
    write_json,
)

from engine.arch import get_adapter
from engine.evaluate import format_table
from engine.models import count_parameters, load
from engine.speed import measure_throughput


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wikitext", type=Path, default=WIKITEXT, help="WikiText-2 raw file (calibration split 0-60%%)")
    p.add_argument("--samples", type=int, default=8, help="calibration blocks for the scores (shapes only matter)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurements per model (median)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 avoids OpenMP stalls on a shared machine")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    return p.parse_args(argv)


def speed_row(name: str, label: str, model: torch.nn.Module, results: dict[int, list], base: dict | None) -> dict:
    """One table row: medians per batch size and speedups vs the original's row."""
    row: dict = {"model": name, "strategy": label, "params_M": round(count_parameters(model) / 1e6, 2),
                 "layers": get_adapter(model).n_layers}
    for bs, runs in results.items():
        row[f"prefill_b{bs}"] = round(statistics.median(r.prefill_tokens_per_s for r in runs), 1)
        row[f"decode_b{bs}"] = round(statistics.median(r.decode_tokens_per_s for r in runs), 1)
    if base is not None:
        for bs in results:
            for kind in ("prefill", "decode"):
                row[f"{kind}_b{bs}_x"] = round(row[f"{kind}_b{bs}"] / base[f"{kind}_b{bs}"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"start: {machine_note()}", flush=True)
    t_start = time.perf_counter()
    teacher = load("default", dtype="fp32")
    spec = get_adapter(teacher.model).spec()
    plans = unique_by_shape(strategies(spec))
    drop = spec.n_layers - (plans[0].targets.layers or spec.n_layers)
    scores = scores_for(teacher, args.wikitext, args.samples, args.seq_len, drop)
    models = [("original", "original", teacher.model)]
    for s in plans:
        label = "depth (BI; ppl/block same shape)" if s.family == "depth" else s.label
        print(f"{s.name}: {describe_targets(spec, s.targets)}", flush=True)
        models.append((s.name, label, prune(teacher.model, scores, s.targets)))
    results: dict[str, dict[int, list]] = {name: {bs: [] for bs in batch_sizes} for name, _, _ in models}
    notes = []
    for r in range(args.rounds):
        notes.append(f"round {r + 1}: {machine_note()}")
        print(notes[-1], flush=True)
        for name, _, model in models:
            for bs in batch_sizes:
                tp = measure_throughput(model, bs, args.prompt_len, args.new_tokens, repeats=1)
                results[name][bs].append(tp)
                print(f"  {name} b{bs}: prefill {tp.prefill_tokens_per_s:.1f} tok/s, "
                      f"decode {tp.decode_tokens_per_s:.1f} tok/s", flush=True)
    rows: list[dict] = []
    for name, label, model in models:
        rows.append(speed_row(name, label, model, results[name], rows[0] if rows else None))
    notes.append(f"end: {machine_note()}")
    table = format_table(rows)
    print(table)
    meta = {"command": "bench/latency.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "dtype": str(next(teacher.model.parameters()).dtype), "threads": torch.get_num_threads(),
            "machine": notes, "wall_s": round(time.perf_counter() - t_start, 1)}
    write_json(args.out / "latency.json", {"meta": meta, "rows": rows,
                                           "raw": {n: {bs: [t.to_dict() for t in v] for bs, v in d.items()}
                                                   for n, d in results.items()}})
    (args.out / "latency.md").write_text(
        "# Latency (tokens/s; `_x` = speedup vs original)\n\n" + table + "\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in meta.items() if k != "machine")
        + "\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(f"wrote {args.out / 'latency.json'} ({meta['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
