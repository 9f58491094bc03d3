"""Benchmark of the candidate search on the built-in model (results go to docs/BENCHMARKS.md).

With the quality benchmark's calibration and evaluation tokens (bench/quality.py: 32 x 256 of each)
and its distillation recipe (batch 4 x 256, lr 3e-4, KL + CE, fp32), at 75% of the parameters, prints:
1. candidates enumerated within the budget (exact parameter counts), and the enumeration's time;
2. wall time split: scores, teacher side (once), one-shot previews of every candidate, tournament;
3. preview speed on the dashboard's default evaluation set (8 x 256 held-out tokens): preview time /
   (one forward of the pruned model + the KL) on the same blocks, with the teacher side cached
   (target <= 1.3), and the preview's seconds (target <= 15 s on an idle 2-core CPU);
4. tournament throughput: tokens/s of the K-student loop / its bound, 1 teacher forward + K student
   training steps timed separately on one batch (target >= 0.9);
5. Spearman ρ between the one-shot ranking of the top K and their ranking after the tournament, and
   Kendall τ between the rankings at successive evaluations;
6. the best hand-picked shape (bench.common.strategies at the same budget, best one-shot KL) distilled
   on the same batches: held-out KL after the same short budget;
7. (not --quick, unless --no-winner) the tournament winner distilled with the quality benchmark's full
   budget (the token count pinned in docs/quality/quality.json) as the row `search_winner` of that
   file, so its held-out perplexity reads against every hand-picked row there.

    .venv/bin/python bench/search.py [--quick] [--out docs/quality/search.json]
    .venv/bin/python bench/search.py --winner-of docs/quality/search.json   # step 7 alone

--winner-of FILE: take the winner of a saved full run (its JSON) and run step 7 alone, with the same
scores (recomputed: they are deterministic) and the same enumeration; the row goes into FILE too.

--quick: 2 x 64 evaluation tokens, 4 candidates previewed (spread over the budget), K = 2, one
step of 1 x 64 tokens, no winner row: a smoke run of every measurement (its numbers mean little).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import quality
import torch
from common import (
    CALIB_DOCS,
    EVAL_DOCS,
    OUT_DIR,
    WIKITEXT,
    blocks_from,
    describe_targets,
    machine_note,
    prune,
    strategies,
    train_blocks,
    unique_by_shape,
)

from engine.arch import get_adapter
from engine.data import DataSource
from engine.devices import compute_dtype
from engine.distill import DistillConfig, distill_loss, param_groups
from engine.evaluate import autocast_ctx
from engine.importance import ScoreConfig, score
from engine.importance.aggregate import spearman
from engine.models import count_parameters, fingerprint, load
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.search.preview import preview, student_quality, teacher_side
from engine.search.shapes import SearchSpace, enumerate_shapes
from engine.search.tournament import Tournament

ROOT = Path(__file__).resolve().parents[1]


def settings(quick: bool) -> dict:
    """Sizes of each part; the full run uses bench/quality.py's FULL calibration, evaluation and recipe."""
    if quick:
        return {"calib": (4, 64), "eval": (2, 64), "speed_eval": (2, 64), "previews": 4, "top": 2, "tokens": 64,
                "batch": 1, "seq": 64, "lr": 5e-4, "evals": 1, "speed_reps": 1, "speed_shapes": 1, "bound_reps": 1}
    q = quality.FULL
    return {"calib": q["calib"], "eval": q["eval"], "speed_eval": (8, 256), "previews": None, "top": 4,
            "tokens": 24_576, "batch": q["batch"], "seq": q["seq_len"], "lr": q["lr"], "evals": 4,
            "speed_reps": 3, "speed_shapes": 2, "bound_reps": 3}


def spread(items: list, n: int | None) -> list:
    """n items evenly spread over the list (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return items
    if n == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def preview_speed(model, scores, targets_list, side, reps: int) -> dict:
    """Median preview time and median ratio to (forward + KL) of the same pruned models."""
    ratios, totals = [], []
    for t in targets_list:
        for _ in range(reps):
            total = preview(model, scores, t, side)["seconds"]["total"]
            student = apply_plan(model, make_plan(scores, t), check_fingerprint=False).eval()
            t0 = time.perf_counter()
            student_quality(student, side)
            fwd = time.perf_counter() - t0
            ratios.append(total / fwd)
            totals.append(total)
    return {"ratio": statistics.median(ratios), "preview_s": statistics.median(totals),
            "eval_tokens": int(side.blocks.numel())}


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loop_bound(model, students: dict, ids: torch.Tensor, cfg: DistillConfig, reps: int) -> dict:
    """Seconds of one teacher forward and of each student's training step (forward, the tournament's loss,
    backward, clip, AdamW), timed separately on one batch; on copies, so the students are untouched."""
    dev = next(model.parameters()).device
    with torch.no_grad(), autocast_ctx(dev, torch.float32):
        t_logits = model(input_ids=ids, use_cache=False).logits

    def teacher_fwd():
        with torch.no_grad(), autocast_ctx(dev, torch.float32):
            model(input_ids=ids, use_cache=False)

    steps = {}
    for name, s in students.items():
        s = copy.deepcopy(s).float().eval().requires_grad_(True)
        opt = torch.optim.AdamW(param_groups(s, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))

        def step(s=s, opt=opt):
            with autocast_ctx(dev, torch.float32):
                logits = s(input_ids=ids, use_cache=False).logits
            distill_loss(t_logits, logits, ids, cfg, [], [])["loss"].backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = timed(step, reps)
        del s, opt
    teacher = timed(teacher_fwd, reps)
    return {"teacher_s": teacher, "students_s": steps, "bound_s": teacher + sum(steps.values())}


def winner_row(args, scores, targets, name: str, search: dict) -> dict:
    """The winner as a row of the quality benchmark: same evaluation, same recipe and full token budget."""
    q_settings = dict(quality.FULL, dtype=args.dtype)
    old, pinned = quality.open_results(args.quality_out, "quality", None, args.dtype)
    if not pinned:
        raise SystemExit(f"{args.quality_out / 'quality.json'} has no rows to compare with: run bench/quality.py "
                         "first, or pass --no-winner")
    b = quality.Bench(argparse.Namespace(wikitext=args.wikitext, out=args.quality_out, save_students=None), q_settings)
    b.tokens = pinned
    b.train = train_blocks(b.loaded.tokenizer, args.wikitext, b.tokens, q_settings["seq_len"])
    e = quality.Experiment("search_winner", "search", f"search winner {name} (tournament of {len(search['top'])})",
                           targets, lambda: prune(b.teacher, scores, targets), True)
    print(f"7. distilling the winner {name} on {pinned} tokens [{machine_note()}]", flush=True)
    row = quality.run_one(b, e)
    row.update(shape=describe_targets(b.spec, targets), search=search)
    quality.add_row(args.quality_out, "quality", old, row, "bench/search.py " + " ".join(sys.argv[1:]), q_settings, b)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget", type=float, default=0.75)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--wikitext", type=Path, default=WIKITEXT)
    p.add_argument("--out", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--work", default="/tmp/prunescope-bench-search", help="teacher-side cache")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="compute dtype (default fp32, as the quality benchmark's rows)")
    p.add_argument("--no-winner", action="store_true", help="skip the winner's full-budget distillation")
    p.add_argument("--quality-out", type=Path, default=OUT_DIR, help="folder of quality.json (the winner's row)")
    p.add_argument("--winner-of", type=Path, default=None,
                   help="a saved search JSON: run step 7 alone for its winner (and record the row there)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with compute_dtype(args.dtype):
        return winner_only(args) if args.winner_of else run(args)


def winner_only(args: argparse.Namespace) -> int:
    """Step 7 for the winner of a saved full run: same scores, same enumeration, the full token budget."""
    saved = json.loads(args.winner_of.read_text())
    if saved.get("quick") or "tournament" not in saved:
        raise SystemExit(f"{args.winner_of} is not a saved full search (no tournament, or a --quick run)")
    if saved.get("dtype", "fp32") != args.dtype:
        raise SystemExit(f"{args.winner_of} was measured in {saved.get('dtype')}; pass --dtype {saved.get('dtype')}")
    s = settings(False)
    loaded = load("default", dtype="fp32")
    spec = get_adapter(loaded.model).spec()
    scores, _ = score(loaded, DataSource.parse(str(args.wikitext), docs=CALIB_DOCS), *s["calib"], config=ScoreConfig())
    space = SearchSpace(budget=args.budget, tolerance=args.tolerance, criterion=saved["criterion"])
    name = saved["tournament"]["winner"]
    shape = next((x for x in enumerate_shapes(spec, space) if x.name == name), None)
    if shape is None:
        raise SystemExit(f"{name} is not among the candidates at budget {args.budget} ± {args.tolerance}")
    search = {"candidates": saved["candidates"], "top": saved["tournament"]["top"],
              "tournament_tokens": saved["tournament"]["tokens"],
              "one_shot_kl": next(r["kl"] for r in saved["previews"] if r["name"] == name)}
    row = winner_row(args, scores, space.targets_for(shape, spec), name, search)
    saved["winner_row"] = winner_summary(row)
    saved["machine"].append(f"winner row: {machine_note()}")
    write(args.winner_of, saved)
    print(f"7. winner on {row['distill_tokens']} tokens: held-out ppl {row['ppl_distilled']:.2f} "
          f"(KL {row['kl_distilled']:.3f}), params {100 * row['fraction']:.1f}%", flush=True)
    return 0


def winner_summary(row: dict) -> dict:
    """The part of the winner's quality row that the search JSON keeps."""
    return {k: row[k] for k in ("name", "shape", "params", "fraction", "ppl_oneshot", "kl_oneshot",
                                "ppl_distilled", "kl_distilled", "distill_tokens", "wall_s")}


def run(args: argparse.Namespace) -> int:
    s = settings(args.quick)
    out: dict = {"quick": args.quick, "settings": s, "dtype": args.dtype, "seconds": {},
                 "machine": [f"start: {machine_note()}"]}
    print(out["machine"][0], flush=True)
    loaded = load("default", dtype="fp32")
    model, tok = loaded.model, loaded.tokenizer
    spec = get_adapter(model).spec()
    t0 = time.perf_counter()
    scores, _ = score(loaded, DataSource.parse(str(args.wikitext), docs=CALIB_DOCS), *s["calib"], config=ScoreConfig())
    out["seconds"]["scores"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    space = SearchSpace(budget=args.budget, tolerance=args.tolerance)
    shapes = enumerate_shapes(spec, space)
    out["seconds"]["enumerate"] = time.perf_counter() - t0
    kinds = {k: sum(1 for x in shapes if x.kind == k) for k in ("depth", "width", "mixed")}
    out.update(candidates=len(shapes), kinds=kinds, criterion=space.criterion)
    print(f"1. candidates within {args.budget:.0%} ± {args.tolerance:.0%}: {len(shapes)} {kinds} "
          f"(enumerated in {out['seconds']['enumerate'] * 1000:.0f} ms)", flush=True)

    # 3. preview speed on the dashboard's default evaluation set
    speed_blocks = blocks_from(tok, args.wikitext, EVAL_DOCS, *s["speed_eval"], seed=1)
    speed_side = teacher_side(model, speed_blocks, fingerprint(model), folder=Path(args.work) / "teacher-speed")
    speed_targets = [space.targets_for(x, spec) for x in spread(shapes, s["speed_shapes"])]
    speed = preview_speed(model, scores, speed_targets, speed_side, s["speed_reps"])
    out["preview_speed"] = speed
    del speed_side
    print(f"3. preview on {s['speed_eval'][0]} x {s['speed_eval'][1]} tokens: {speed['preview_s']:.2f} s, "
          f"{speed['ratio']:.2f} x (forward + KL)", flush=True)

    # 2. the search itself: the teacher side once, then every candidate one-shot
    blocks = blocks_from(tok, args.wikitext, EVAL_DOCS, *s["eval"])  # bench/quality.py's evaluation blocks
    t0 = time.perf_counter()
    side = teacher_side(model, blocks, fingerprint(model), folder=Path(args.work) / "teacher")
    out["seconds"]["teacher_side"] = time.perf_counter() - t0
    out["teacher_ppl"] = side.ppl
    tried = spread(shapes, s["previews"])
    t0 = time.perf_counter()
    rows = []
    for x in tried:
        q = preview(model, scores, space.targets_for(x, spec), side)
        rows.append({"name": x.name, "params": x.params, "fraction": x.fraction, "kind": x.kind, "kl": q["kl"],
                     "ppl": q["ppl"], "seconds": q["seconds"]["total"]})
    out["seconds"]["previews"] = time.perf_counter() - t0
    out["seconds"]["preview_mean"] = out["seconds"]["previews"] / len(rows)
    rows.sort(key=lambda r: r["kl"])
    out["previews"] = rows
    print(f"2. {len(rows)} previews on {s['eval'][0]} x {s['eval'][1]} tokens in {out['seconds']['previews']:.0f} s; "
          "best: " + ", ".join(f"{r['name']} KL {r['kl']:.3f}" for r in rows[:4]), flush=True)

    # 4-5. the tournament of the top K on the quality recipe, a short budget
    top = rows[: s["top"]]
    cfg = DistillConfig(steps=1, tokens=s["tokens"], batch_size=s["batch"], seq_len=s["seq"], lr=s["lr"],
                        ce_weight=1.0, eval_every=1, checkpoint_every=10**9, keep_checkpoints=1, seed=0,
                        dtype=args.dtype)
    total = cfg.total_steps()
    cfg = replace(cfg, warmup_steps=max(1, total // 20), eval_every=max(1, total // s["evals"]))
    train = train_blocks(tok, args.wikitext, s["tokens"], s["seq"])
    by_name = {x.name: x for x in tried}
    targets_of = {r["name"]: space.targets_for(by_name[r["name"]], spec) for r in top}
    build = lambda n: apply_plan(model, make_plan(scores, targets_of[n]), check_fingerprint=False)  # noqa: E731
    log_rows: list[dict] = []
    students = {r["name"]: build(r["name"]) for r in top}
    t0 = time.perf_counter()
    res = Tournament(model, students, train, side, cfg, None, log_row=log_rows.append).run()  # no checkpoints
    out["seconds"]["tournament"] = time.perf_counter() - t0
    elapsed = sorted({r["step"]: r["elapsed_s"] for r in log_rows if not r.get("eval")}.items())
    step_s = [b - a for (_, a), (_, b) in zip(elapsed, elapsed[1:], strict=False)][1:]  # first steps: warm-up
    ids = train[: cfg.batch_size, : cfg.seq_len]
    bound = loop_bound(model, {n: build(n) for n in students}, ids, cfg, s["bound_reps"])
    loop_s = statistics.median(step_s) if step_s else elapsed[-1][1] / max(1, len(elapsed))
    out["throughput"] = {"loop_step_s": loop_s, **bound, "ratio": bound["bound_s"] / loop_s,
                         "student_tokens_per_s": len(top) * cfg.global_batch() * cfg.seq_len / loop_s}
    one_shot = [r["kl"] for r in top]
    after = [res["final"][r["name"]]["kl"] for r in top]
    taus = [r["kendall_tau"] for r in log_rows if r.get("ranking") and r.get("kendall_tau") is not None]
    out["spearman_one_shot_vs_tournament"] = spearman(torch.tensor(one_shot), torch.tensor(after))
    out["tournament"] = {"tokens": total * cfg.global_batch() * cfg.seq_len, "steps": total, "top": [r["name"] for r in top],
                         "winner": res["winner"], "ranking": res["final_ranking"], "final": res["final"],
                         "kendall_tau_successive": taus}
    print(f"4. tournament of {len(top)} over {out['tournament']['tokens']} tokens: {out['seconds']['tournament']:.0f} s; "
          f"loop step {loop_s:.2f} s vs bound {bound['bound_s']:.2f} s (teacher {bound['teacher_s']:.2f} s + "
          f"students {sum(bound['students_s'].values()):.2f} s): ratio {out['throughput']['ratio']:.3f}", flush=True)
    print(f"5. Spearman one-shot vs after the tournament: {out['spearman_one_shot_vs_tournament']}; "
          f"Kendall τ between successive evaluations: {taus}", flush=True)
    del students

    # 6. the best hand-picked shape on the same batches and budget
    hand = []
    for st in unique_by_shape(strategies(spec, args.budget, space.criterion)):
        t = replace(st.targets, depth_by="bi")  # the search scores hold BI; the hand-picked shapes are what counts
        hand.append((preview(model, scores, t, side)["kl"], st.name, t))
    best_kl, best_name, best_t = min(hand, key=lambda h: h[0])
    hres = Tournament(model, {best_name: apply_plan(model, make_plan(scores, best_t), check_fingerprint=False)},
                      train, side, cfg, None).run()
    out["hand_picked"] = {"name": best_name, "one_shot_kl": best_kl, "final_kl": hres["final"][best_name]["kl"],
                          "final_ppl": hres["final"][best_name]["ppl"]}
    win = res["final"][res["winner"]]
    print(f"6. winner {res['winner']} KL {win['kl']:.4f} ppl {win['ppl']:.2f} vs best hand-picked {best_name} KL "
          f"{out['hand_picked']['final_kl']:.4f} ppl {out['hand_picked']['final_ppl']:.2f} (one-shot KL {best_kl:.4f})",
          flush=True)
    sec = out["seconds"]
    print("2. wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in sec.items()), flush=True)
    if args.out:
        write(args.out, out)

    # 7. the winner on the full budget, as a row of the quality benchmark
    if not (args.quick or args.no_winner):
        search = {"candidates": len(shapes), "top": out["tournament"]["top"], "tournament_tokens":
                  out["tournament"]["tokens"], "one_shot_kl": next(r["kl"] for r in rows if r["name"] == res["winner"])}
        row = winner_row(args, scores, targets_of[res["winner"]], res["winner"], search)
        out["winner_row"] = winner_summary(row)
        print(f"7. winner on {row['distill_tokens']} tokens: held-out ppl {row['ppl_distilled']:.2f} "
              f"(KL {row['kl_distilled']:.3f}), params {100 * row['fraction']:.1f}%", flush=True)
    out["machine"].append(f"end: {machine_note()}")
    out["parameters_source"] = count_parameters(model)
    if args.out:
        write(args.out, out)
    return 0


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
