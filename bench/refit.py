"""Refit benchmark: what the least-squares refit (engine/refit.py) costs against the scoring pass, and what it
buys one-shot, on the built-in model with the quality benchmark's data and shapes.

    .venv/bin/python bench/refit.py                 # everything (~20 min on 2 idle cores)
    .venv/bin/python bench/refit.py --only-speed    # the time ratio alone (~3 min)
    .venv/bin/python bench/refit.py --resume --shapes width_all   # rows of more shapes into the same file

1. Speed: the width + BI scoring pass (`compute_scores`, 32 x 256 calibration tokens) and the refit of all 30
   layers of the MLP 888 student on the same tokens, alternated `--repeats` times in one process; the ratio of
   the medians (target: <= 2).
2. One-shot held-out perplexity / KL (the quality benchmark's split: 32 x 256 tokens of the last 40% of the
   WikiText-2 test articles; calibration: 32 x 256 of the first 60%) of the quality benchmark's shapes, by
   criterion with the refit (without it: the quality benchmark's one-shot rows of the same students, read from
   docs/quality/quality.json), and the refit's settings (target, ridge term, readers) where they matter.

Writes docs/quality/refit.json and prints the Markdown tables docs/BENCHMARKS.md quotes. fp32 throughout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import (
    OUT_DIR,
    WIKITEXT,
    blocks_from,
    describe_targets,
    machine_note,
    scores_for,
    strategies,
    write_json,
)

from engine.arch import get_adapter
from engine.devices import compute_dtype
from engine.evaluate import evaluate_student, teacher_logits
from engine.importance import ScoreConfig, compute_scores
from engine.models import load
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.refit import RefitSettings, refit

SHAPES = ("width_mlp", "width_mlp_heads", "width_all", "depth_width", "depth_block")
CRITERIA = ("activation", "weighted")
# the settings compared on the shapes where each one applies (the default is RefitSettings())
VARIANTS = {
    "width_mlp": {"teacher target": RefitSettings(target="teacher"), "ridge 1e-2": RefitSettings(damping=1e-2),
                  "ridge 1e-5": RefitSettings(damping=1e-5)},
    "width_mlp_heads": {"teacher target": RefitSettings(target="teacher")},
    "width_all": {"readers (q/k/v, gate/up)": RefitSettings(readers=True)},
    "depth_block": {"teacher target": RefitSettings(target="teacher")},
}


def speed(loaded, calib: torch.Tensor, student_of, repeats: int) -> dict:
    """Median seconds of the scoring pass and of the refit, alternated in one process; their ratio."""
    model = loaded.model
    score_s, refit_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compute_scores(model, calib, ScoreConfig())
        score_s.append(time.perf_counter() - t0)
        student, plan = student_of()
        t0 = time.perf_counter()
        refit(model, student, plan, calib)
        refit_s.append(time.perf_counter() - t0)
        del student
    s, r = statistics.median(score_s), statistics.median(refit_s)
    print(f"scoring pass {s:.1f} s, refit {r:.1f} s (median of {repeats}): ratio {r / s:.2f} [{machine_note()}]",
          flush=True)
    return {"scoring_s": score_s, "refit_s": refit_s, "ratio": r / s, "machine": machine_note()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only-speed", action="store_true")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes of the one-shot table")
    p.add_argument("--resume", action="store_true",
                   help="keep the speed and the rows already in --out, measure only the shapes not there")
    p.add_argument("--out", type=Path, default=OUT_DIR / "refit.json")
    args = p.parse_args()
    with compute_dtype("fp32"):  # as every quality row: evaluations do not autocast to bf16
        return run(args)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    loaded = load("default", dtype="fp32")
    teacher, tok = loaded.model, loaded.tokenizer
    spec = get_adapter(teacher).spec()
    by_name = {s.name: s for s in strategies(spec)}
    calib = blocks_from(tok, WIKITEXT, (0.0, 0.6), 32, 256)
    drop = spec.n_layers - (by_name["depth_block"].targets.layers or spec.n_layers)
    scores = scores_for(loaded, WIKITEXT, 32, 256, drop)
    mlp = replace(by_name["width_mlp"].targets, criterion="activation")

    def mlp_student():
        plan = make_plan(scores, mlp)
        return apply_plan(teacher, plan).eval(), plan

    old = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else None
    if old is not None and not args.only_speed:
        result = old
    else:
        result = {"speed": speed(loaded, calib, mlp_student, args.repeats), "rows": old["rows"] if old else []}
        write_json(args.out, result)
    if args.only_speed:
        return 0
    done = {(r["shape"], r["criterion"], r["refit"]) for r in result["rows"]}
    ev = blocks_from(tok, WIKITEXT, (0.6, 1.0), 32, 256)
    t_logits = teacher_logits(teacher, ev)
    lines = ["| shape | criterion | refit | one-shot ppl | one-shot KL | refit s |", "|---|---|---|---:|---:|---:|"]
    quality = {r["name"]: r for r in json.loads((OUT_DIR / "quality.json").read_text())["rows"]}
    for name in [x for x in args.shapes.split(",") if x]:
        for crit in CRITERIA if name != "depth_block" else ("activation",):
            targets = replace(by_name[name].targets, criterion=crit)
            plan = make_plan(scores, targets)
            off = quality.get(name if crit == "activation" else f"criterion_{crit}_{name}")
            if off is not None and (name, crit, "off") not in done:  # the same student, evaluation and dtype, measured by bench/quality.py
                lines.append(f"| {name} | {crit} | off | {off['ppl_oneshot']:.2f} | {off['kl_oneshot']:.3f} | |")
                result["rows"].append({"shape": name, "criterion": crit, "refit": "off", "ppl": off["ppl_oneshot"],
                                       "kl": off["kl_oneshot"], "from": "docs/quality/quality.json"})
            runs = {"on (default)": RefitSettings()}  # "off": the quality benchmark's one-shot row of this shape
            if crit == "activation":
                runs.update(VARIANTS.get(name, {}))
            for label, settings in runs.items():
                if (name, crit, label) in done:
                    continue
                student = apply_plan(teacher, plan).eval()
                seconds = None
                if settings is not None:
                    t0 = time.perf_counter()
                    refit(teacher, student, plan, calib, settings)
                    seconds = round(time.perf_counter() - t0, 1)
                r = evaluate_student(t_logits, student, ev)
                row = {"shape": name, "sizes": describe_targets(spec, targets), "criterion": crit, "refit": label,
                       "settings": settings.to_dict() if settings else None, "ppl": r["ppl"], "kl": r["kl"],
                       "refit_s": seconds}
                result["rows"].append(row)
                lines.append(f"| {name} | {crit} | {label} | {r['ppl']:.2f} | {r['kl']:.3f} | {seconds or ''} |")
                print(lines[-1], flush=True)
                write_json(args.out, result)
                del student
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
