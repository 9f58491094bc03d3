"""Benchmark of the candidate search on the built-in model (results go to docs/BENCHMARKS.md).

Prints:
1. candidates enumerated within the budget (exact parameter counts), and the enumeration's time;
2. wall time split: scores (cached), teacher side (once), previews (per candidate), tournament;
3. preview speed: preview time / (one forward of the pruned model + the KL) on the same blocks,
   with the teacher side cached (target <= 1.3), and the preview's seconds for the evaluation set;
4. tournament throughput ratio: time of K separate distillations (each with its own teacher
   forward) / time of the K-student tournament that shares one teacher forward per batch;
5. Spearman ρ between the one-shot ranking of the top K and their ranking after the tournament;
6. the winner against the best hand-picked shape (bench.common.strategies at the same budget,
   best one-shot KL), distilled on the same batches: held-out KL after distillation.

    .venv/bin/python bench/search.py [--quick] [--out docs/search/result.json]

--quick: 2 x 64 evaluation tokens, 4 candidates previewed (spread over the budget), K = 2, one
step of 1 x 64 tokens: a smoke run of every measurement on a shared CPU (its numbers mean little).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import CALIB_DOCS, EVAL_DOCS, WIKITEXT, strategies, unique_by_shape

from engine.arch import get_adapter
from engine.data import DataSource, get_blocks
from engine.distill import DistillConfig
from engine.importance import ScoreConfig, score
from engine.importance.aggregate import spearman
from engine.models import fingerprint, load
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.search.preview import preview, student_quality, teacher_side
from engine.search.shapes import SearchSpace, enumerate_shapes
from engine.search.tournament import Tournament

ROOT = Path(__file__).resolve().parents[1]


def settings(quick: bool) -> dict:
    if quick:
        return {"calib": (4, 64), "eval": (2, 64), "previews": 4, "top": 2, "steps": 1, "batch": 1, "seq": 64,
                "speed_reps": 1, "speed_shapes": 1}
    return {"calib": (32, 256), "eval": (8, 256), "previews": None, "top": 4, "steps": 40, "batch": 2, "seq": 256,
            "speed_reps": 5, "speed_shapes": 2}


def spread(items: list, n: int | None) -> list:
    """n items evenly spread over the list (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return items
    if n == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def preview_speed(model, scores, shapes, spec, side, reps: int) -> dict:
    """Median preview time and median (forward + KL) time of the same pruned models."""
    ratios, totals = [], []
    for shape in shapes:
        t = shape.targets(spec)
        for _ in range(reps):
            total = preview(model, scores, t, side)["seconds"]["total"]
            student = apply_plan(model, make_plan(scores, t), check_fingerprint=False).eval()
            t0 = time.perf_counter()
            student_quality(student, side)
            fwd = time.perf_counter() - t0
            ratios.append(total / fwd)
            totals.append(total)
    return {"ratio": statistics.median(ratios), "preview_s": statistics.median(totals)}


def distill_group(model, students: dict, train, side, cfg) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = Tournament(model, students, train, side, cfg, None).run()  # no checkpoints: compute only
    return res, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget", type=float, default=0.75)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--out", default=None)
    p.add_argument("--work", default="/tmp/prunescope-bench-search")
    args = p.parse_args()
    s = settings(args.quick)
    out: dict = {"quick": args.quick, "settings": s, "seconds": {}}
    loaded = load("default")
    model, tok = loaded.model, loaded.tokenizer
    spec = get_adapter(model).spec()
    t0 = time.perf_counter()
    scores, _ = score(loaded, DataSource.parse(str(WIKITEXT), docs=CALIB_DOCS), *s["calib"], config=ScoreConfig())
    out["seconds"]["scores"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shapes = enumerate_shapes(spec, SearchSpace(budget=args.budget, tolerance=args.tolerance))
    out["seconds"]["enumerate"] = time.perf_counter() - t0
    kinds = {k: sum(1 for x in shapes if x.kind == k) for k in ("depth", "width", "mixed")}
    out.update(candidates=len(shapes), kinds=kinds)
    print(f"1. candidates within {args.budget:.0%} ± {args.tolerance:.0%}: {len(shapes)} {kinds} "
          f"(enumerated in {out['seconds']['enumerate'] * 1000:.0f} ms)", flush=True)
    blocks = get_blocks(DataSource.parse(str(WIKITEXT), docs=EVAL_DOCS), tok, *s["eval"], seed=1)
    t0 = time.perf_counter()
    side = teacher_side(model, blocks, fingerprint(model), folder=Path(args.work) / "teacher")
    out["seconds"]["teacher_side"] = time.perf_counter() - t0
    tried = spread(shapes, s["previews"])
    t0 = time.perf_counter()
    rows = [{"name": x.name, "params": x.params, "kind": x.kind, **preview(model, scores, x.targets(spec), side)}
            for x in tried]
    out["seconds"]["previews"] = time.perf_counter() - t0
    out["seconds"]["preview_mean"] = out["seconds"]["previews"] / len(rows)
    speed = preview_speed(model, scores, spread(tried, s["speed_shapes"]), spec, side, s["speed_reps"])
    out["preview_speed"] = speed
    print(f"3. preview on {s['eval'][0]} x {s['eval'][1]} tokens: {speed['preview_s']:.2f} s, "
          f"{speed['ratio']:.2f} x (forward + KL)", flush=True)
    rows.sort(key=lambda r: r["kl"])
    top = rows[: s["top"]]
    cfg = DistillConfig(steps=s["steps"], batch_size=s["batch"], seq_len=s["seq"], warmup_steps=max(1, s["steps"] // 10),
                        eval_every=max(1, s["steps"] // 2), checkpoint_every=10**6, lr=1e-4)
    n_train = cfg.total_steps() * cfg.global_batch()
    train = get_blocks(DataSource.parse(str(WIKITEXT), docs=CALIB_DOCS), tok, n_train, s["seq"], seed=2)
    by_name = {x.name: x for x in tried}
    build = lambda n: apply_plan(model, make_plan(scores, by_name[n].targets(spec)), check_fingerprint=False)  # noqa: E731
    res, shared = distill_group(model, {r["name"]: build(r["name"]) for r in top}, train, side, cfg)
    separate = sum(distill_group(model, {r["name"]: build(r["name"])}, train, side, cfg)[1]
                   for i, r in enumerate(top))
    out["seconds"]["tournament"] = shared
    out["throughput_ratio"] = separate / shared
    one_shot = [r["kl"] for r in top]
    after = [res["final"][r["name"]]["kl"] for r in top]
    out["spearman_one_shot_vs_tournament"] = spearman(torch.tensor(one_shot), torch.tensor(after))
    out["tournament"] = {"winner": res["winner"], "ranking": res["final_ranking"], "final": res["final"]}
    print(f"4. tournament of {len(top)}: {shared:.1f} s shared vs {separate:.1f} s separate: "
          f"{out['throughput_ratio']:.2f} x", flush=True)
    print(f"5. Spearman one-shot vs after the tournament: {out['spearman_one_shot_vs_tournament']}", flush=True)
    hand = []
    for st in unique_by_shape(strategies(spec, args.budget)):
        t = replace(st.targets, depth_by="bi")  # the scores hold BI; the hand-picked shapes are what counts
        q = preview(model, scores, t, side)
        hand.append((q["kl"], st.name, t))
    best_kl, best_name, best_t = min(hand, key=lambda h: h[0])
    hres, _ = distill_group(model, {best_name: apply_plan(model, make_plan(scores, best_t), check_fingerprint=False)},
                            train, side, cfg)
    out["hand_picked"] = {"name": best_name, "one_shot_kl": best_kl, "final_kl": hres["final"][best_name]["kl"]}
    win = res["final"][res["winner"]]["kl"]
    print(f"6. winner {res['winner']} KL {win:.4f} vs best hand-picked {best_name} KL "
          f"{out['hand_picked']['final_kl']:.4f} (one-shot {best_kl:.4f})", flush=True)
    sec = out["seconds"]
    print("2. wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in sec.items()), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
