"""Benchmark of the importance engine on the built-in model (results go to docs/BENCHMARKS.md).

Measures, in one process:
1. width+BI ratio: wall time of `compute_scores(model, blocks)` (default config: one hooked pass of
   the base model, no lm_head) / wall time of a plain forward `model(ids, use_cache=False).logits`
   over the same blocks and batch size. Also the ratio to a hook-free base-model pass (hook cost).
2. depth sweep cost in forward-pass equivalents: (time of compute_scores with depth_ppl - time of the
   default config) / plain forward time, on `--depth-samples` blocks; target (L+1)/2 + 1.
3. peak memory: on CUDA torch's allocator peak (max_memory_allocated after reset); on CPU the
   process's peak RSS (VmHWM) above its RSS at the start of the measurement, after gc, malloc_trim
   and a VmHWM reset through /proc/self/clear_refs (so heap kept by earlier runs does not hide it).
4. with `--stream`: the width+BI pass on a streamed copy of the model (weights kept in RAM on `meta`
   placeholders, each module copied to the execution device only while it runs; engine.importance.stream)
   / the same pass unstreamed, interleaved with the other runs.
Warm-up first; timings are medians of `--repeats` interleaved repeats.

    .venv/bin/python bench/scoring.py [--samples 32 --seq-len 256 --depth-samples 8 --repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from engine.arch import get_adapter
from engine.data import DataSource, get_blocks
from engine.importance import ScoreConfig, compute_scores
from engine.models import describe, load
from engine.paths import SHARED_WIKITEXT

ROOT = Path(__file__).resolve().parents[1]

WIKITEXT = SHARED_WIKITEXT


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure(fn, device: torch.device) -> tuple[float, float | None]:
    """(seconds, peak memory MiB above the starting point) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        gc.collect()
        try:  # give freed heap back to the OS, then reset VmHWM to the current RSS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        start = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        hwm = _rss_kib("VmHWM")
        peak = (hwm - start) / 1024 if hwm is not None and start is not None else None
    return seconds, peak


@torch.no_grad()
def plain_forward(model, blocks, bs: int) -> None:
    dev = next(model.parameters()).device
    for i in range(0, blocks.shape[0], bs):
        model(blocks[i:i + bs].to(dev), use_cache=False).logits  # noqa: B018


@torch.no_grad()
def base_forward(model, blocks, bs: int) -> None:
    dev, base = next(model.parameters()).device, get_adapter(model).base_model
    for i in range(0, blocks.shape[0], bs):
        base(input_ids=blocks[i:i + bs].to(dev), use_cache=False)


def _fixed_mmap_threshold() -> None:
    """Re-run this script with glibc's mmap threshold fixed, so freed temporaries go back to the OS
    and peak RSS measures live memory (glibc's dynamic threshold otherwise keeps ~0.7 GB of freed
    heap resident after the first big temporary, which hid the real difference)."""
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _fixed_mmap_threshold()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(WIKITEXT))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--depth-samples", type=int, default=8, help="blocks for the (slow) depth sweep")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--stream", action="store_true", help="also time the width+BI pass with streamed layers")
    args = ap.parse_args(argv)

    loaded = load(args.model, dtype=args.dtype, device=args.device)
    model, bs = loaded.model, args.batch_size
    device = next(model.parameters()).device
    info = describe(loaded)
    L = info["layers"]
    blocks = get_blocks(DataSource.parse(args.data, docs=(0.0, 0.6)), loaded.tokenizer, args.samples, args.seq_len)
    dblocks = blocks[: args.depth_samples]
    width = ScoreConfig(batch_size=bs)
    runs = {
        "plain": lambda b: plain_forward(model, b, bs),
        "base": lambda b: base_forward(model, b, bs),
        "width": lambda b: compute_scores(model, b, width),
    }
    if args.stream:
        import copy

        from engine.importance.stream import stream_model

        streamed = stream_model(copy.deepcopy(model), device)
        runs["stream"] = lambda b: compute_scores(streamed, b, width)
    for fn in runs.values():  # warm-up
        fn(blocks[:bs])
    t: dict[str, list[float]] = {k: [] for k in runs}
    mem: dict[str, float | None] = {}
    for r in range(args.repeats):
        for k, fn in runs.items():
            s, m = measure(lambda fn=fn: fn(blocks), device)
            t[k].append(s)
            if r == 0:
                mem[k] = m
    med = {k: statistics.median(v) for k, v in t.items()}
    td_plain = statistics.median(measure(lambda: plain_forward(model, dblocks, bs), device)[0] for _ in range(2))
    td_width = measure(lambda: compute_scores(model, dblocks, width), device)[0]
    box: dict = {}
    td_depth, mem["depth"] = measure(lambda: box.setdefault("s", compute_scores(
        model, dblocks, ScoreConfig(batch_size=bs, depth_ppl=True))), device)
    sweep_eq = (td_depth - td_width) / td_plain
    # the same cost counted in FLOPs per token: a layer = 2 x its weights + causal attention
    # (2 T H hd), the lm_head = 2 V D; the sweep runs L(L-1)/2 layers and L + 1 lm_heads (base incl.)
    layer = 2 * sum(p.numel() for p in get_adapter(model).layers[0].parameters()) \
        + 2 * args.seq_len * info["query_heads"] * info["head_dim"]
    head = 2 * info["vocab_size"] * info["hidden_size"]
    flops_eq = (L * (L - 1) / 2 * layer + (L + 1) * head) / (L * layer + head)
    fwd = L * layer + head
    layers_eq, heads_eq = L * (L - 1) / 2 * layer / fwd, (L + 1) * head / fwd  # the two parts of flops_eq
    head_share = head / fwd
    res = {
        "model": info["name"], "layers": L, "device": str(device), "dtype": info["dtype"],
        "threads": torch.get_num_threads(), "samples": args.samples, "seq_len": args.seq_len,
        "batch_size": bs, "repeats": args.repeats, "depth_samples": args.depth_samples,
        "plain_forward_s": med["plain"], "base_forward_s": med["base"], "width_bi_s": med["width"],
        "ratio_width_vs_plain": med["width"] / med["plain"], "ratio_width_vs_base": med["width"] / med["base"],
        "depth_plain_forward_s": td_plain, "depth_width_s": td_width, "depth_total_s": td_depth,
        "depth_stage_timings": box["s"].meta["timings"], "sweep_forward_equivalents": sweep_eq,
        "sweep_forward_equivalents_flops": flops_eq, "sweep_flops_layer_part": layers_eq,
        "sweep_flops_lm_head_part": heads_eq,
        "lm_head_flop_share": head_share,
        "ratio_stream_vs_width": med["stream"] / med["width"] if args.stream else None,
        "sweep_target": (L + 1) / 2 + 1, "naive_sweep_forward_equivalents": L + 1,
        "peak_mib": mem, "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda"
        else "VmHWM - VmRSS at start (after gc + malloc_trim, VmHWM reset via /proc/self/clear_refs)",
    }
    rows = [
        ("plain forward (logits)", f"{med['plain']:.2f} s", f"{mem['plain'] or 0:.0f} MiB"),
        ("base forward (no lm_head, no hooks)", f"{med['base']:.2f} s", f"{mem['base'] or 0:.0f} MiB"),
        ("width + BI scoring", f"{med['width']:.2f} s", f"{mem['width'] or 0:.0f} MiB"),
        (f"depth ppl scoring ({args.depth_samples} blocks)", f"{td_depth:.2f} s", f"{mem['depth'] or 0:.0f} MiB"),
    ]
    if args.stream:
        rows.insert(3, ("width + BI scoring, streamed layers", f"{med['stream']:.2f} s", "-"))
    print(f"{info['name']} ({L} layers) on {device} ({info['dtype']}, {res['threads']} threads); "
          f"{args.samples} x {args.seq_len} tokens, batch {bs}, median of {args.repeats}")
    print(f"{'':40} {'time':>10} {'peak above model':>18}")
    for name, a, b in rows:
        print(f"{name:40} {a:>10} {b:>18}")
    print(f"ratio width+BI / plain forward: {res['ratio_width_vs_plain']:.3f} (target <= 1.10); "
          f"/ hook-free base forward: {res['ratio_width_vs_base']:.3f}")
    if args.stream:
        print(f"streamed / unstreamed width+BI pass: {res['ratio_stream_vs_width']:.3f}")
    print(f"depth sweep: {sweep_eq:.2f} forward-pass equivalents (target <= {res['sweep_target']:.1f}, "
          f"naive {L + 1}); by FLOP count {flops_eq:.2f} = {layers_eq:.2f} for the L(L-1)/2 layer passes + "
          f"{heads_eq:.2f} for the L+1 lm_head + CE passes (the lm_head is {100 * head_share:.0f}% of a forward); "
          f"stages {res['depth_stage_timings']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
