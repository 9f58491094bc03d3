"""The quality benchmark: pruning strategies at ~75% of the built-in model's parameters, one-shot
and after the same distillation budget, against baselines, plus ablations.

Data: WikiText-2 (`--wikitext`), first 60% of articles for calibration and distillation, last 40%
held out for perplexity and KL(teacher || student). Strategies (bench/common.py): depth by BI /
ppl increase / best contiguous block; width MLP / MLP + heads / MLP + heads + channels; depth +
width. Baselines per shape: random units, weight-magnitude units, and the pruned architecture
re-initialised (`_init_weights`) and trained on the same tokens with the same loss. Ablations on
the width strategies: score aggregation, head residual merge, iterative pruning T = 2, 4 (T = 1 is
the strategy itself), and the distillation loss. Every distillation uses KL + CE (ce_weight 1)
except the "loss_kl_only" ablation, the same token budget and a fresh temporary run folder.
Data mixes (group "data mix", engine.mix): the best depth shape and the MLP + heads + channels shape
distilled on WikiText only, teacher-generated text only and two mixes (70/30, 50/50) of the same
budget, each evaluated in-domain (held-out WikiText) and on breadth (teacher text from prompts never
trained on, cached in OUT/generated); their table is appended to the report.
Refit (group "refit", engine.refit): the width and depth + width shapes pruned by the activation and weighted
criteria and refitted by least squares on the calibration blocks, beside the same rows without refit.
Importance criteria (group "criterion"): the weight-aware criteria (weighted, product) on the three width
shapes, beside activation's rows (the strategies themselves); bench/optipfair_hybrid.py adds OptiPFair's hybrid
at the MLP shape. Their table is appended to the report too.

    .venv/bin/python bench/quality.py --quick          # reduced, ~10 min on a quiet 2-core CPU
    .venv/bin/python bench/quality.py [--resume]       # full: hours; budget measured (~15 min/run)

Writes docs/quality/quality[_quick].{json,md,html,png}; rows are saved after every experiment,
`--resume` skips the ones already in the JSON and keeps its token budget (another --tokens is
refused), and
`meta.runs` keeps every invocation (command, load notes, wall time, rows it added).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from common import (
    OUT_DIR,
    WIKITEXT,
    blocks_from,
    describe_targets,
    machine_note,
    magnitude_scores,
    prune,
    random_scores,
    reinit,
    scores_for,
    strategies,
    train_blocks,
    unique_by_shape,
    write_json,
    write_report,
)

from engine.arch import get_adapter
from engine.devices import compute_dtype
from engine.distill import DistillConfig, distill
from engine.evaluate import evaluate_student, teacher_logits, token_nll
from engine.export import export_model
from engine.importance import AGGREGATIONS
from engine.mix import BREADTH, DataMix, eval_sets, mix_blocks
from engine.models import count_parameters, load
from engine.prune import prune_iteratively
from engine.runs import read_jsonl
from engine.targets import Targets

QUICK = dict(calib=(8, 128), eval=(8, 256), batch=2, seq_len=128, tokens=2048, lr=5e-4, warmup=2)
FULL = dict(calib=(32, 256), eval=(32, 256), batch=4, seq_len=256, tokens=None, lr=3e-4, warmup=None)
QUICK_DISTILLED = {"depth_bi", "width_all", "depth_width", "random_init_width_all", "loss_kl_only"}


@dataclass
class Experiment:
    """One row: how to build the student, whether to distil it and with which loss."""

    name: str
    group: str
    label: str
    targets: Targets
    build: Callable[[], torch.nn.Module]
    distill: bool = True
    loss: str = "kl+ce"
    method: str = "kd"  # kd | cpt | lora (DistillConfig.method)
    corrected_teacher: bool = False  # distil from the teacher fine-tuned on the training data first
    teacher_share: float | None = None  # data-mix rows: share of teacher-generated text in the training tokens


class Bench:
    """The teacher, data and (lazily computed, cached) scores shared by every experiment."""

    def __init__(self, args: argparse.Namespace, settings: dict):
        self.args, self.s = args, settings
        self.loaded = load("default", dtype="fp32")
        self.teacher = self.loaded.model
        self.spec = get_adapter(self.teacher).spec()
        self.strategies = {s.name: s for s in strategies(self.spec)}
        self.drop = self.spec.n_layers - (self.strategies["depth_bi"].targets.layers or self.spec.n_layers)
        tok = self.loaded.tokenizer
        self.eval_blocks = blocks_from(tok, args.wikitext, (0.6, 1.0), *settings["eval"])
        self.t_logits = teacher_logits(self.teacher, self.eval_blocks)
        n = self.eval_blocks.shape[0] * (self.eval_blocks.shape[1] - 1)
        self.teacher_ppl = math.exp(token_nll(self.t_logits, self.eval_blocks).item() / n)
        self._scores: dict[str, object] = {}
        self._calib: torch.Tensor | None = None
        self.tokens = settings["tokens"]
        self.train = None
        self._corrected: torch.nn.Module | None = None
        self.correction: dict | None = None
        self._breadth: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self._mixed: dict[float, tuple[torch.Tensor, list[dict]]] = {}

    def scores(self, aggregation: str = "l2_mean"):
        if aggregation not in self._scores:
            depth = aggregation == "l2_mean"  # the ablations only need the width scores
            self._scores[aggregation] = scores_for(self.loaded, self.args.wikitext, *self.s["calib"], self.drop,
                                                   aggregation, depth=depth)
        return self._scores[aggregation]

    def calib(self) -> torch.Tensor:
        if self._calib is None:
            self._calib = blocks_from(self.loaded.tokenizer, self.args.wikitext, (0.0, 0.6), *self.s["calib"])
        return self._calib

    def config(self, loss: str, tokens: int | None = None, steps: int = 1, method: str = "kd") -> DistillConfig:
        tokens = tokens if tokens is not None else self.tokens
        total = -(-tokens // (self.s["batch"] * self.s["seq_len"])) if tokens else steps
        warmup = self.s["warmup"] or max(1, total // 20)
        return DistillConfig(steps=steps, tokens=tokens, batch_size=self.s["batch"], seq_len=self.s["seq_len"],
                             lr=self.s["lr"], warmup_steps=min(warmup, total), ce_weight=1.0 if loss == "kl+ce" else 0.0,
                             eval_every=10**9, checkpoint_every=10**9, keep_checkpoints=1, seed=0, method=method,
                             dtype=self.s["dtype"])

    def distill(self, student: torch.nn.Module, loss: str, method: str = "kd", corrected: bool = False,
                train: torch.Tensor | None = None) -> dict:
        cfg = self.config(loss, method=method)
        teacher = self.corrected_teacher() if corrected else self.teacher if cfg.needs_teacher else None
        with tempfile.TemporaryDirectory(prefix="prunescope-quality-") as run_dir:
            return distill(teacher, student, self.train if train is None else train, None, cfg, run_dir, resume=False)

    def breadth(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The breadth set: teacher text from the evaluation prompts (never trained on), as many blocks
        as the WikiText evaluation, with the teacher's logits and perplexity on it."""
        if self._breadth is None:
            sets = eval_sets(DataMix.of("teacher"), self.loaded.tokenizer, *self.s["eval"], seed=1, breadth=None,
                             model=self.teacher, cache_dir=self.args.out / "generated", model_name=self.loaded.name)
            blocks = sets[BREADTH]
            logits = teacher_logits(self.teacher, blocks)
            n = blocks.shape[0] * (blocks.shape[1] - 1)
            self._breadth = blocks, logits, math.exp(token_nll(logits, blocks).item() / n)
        return self._breadth

    def mixed_train(self, share: float) -> tuple[torch.Tensor, list[dict]]:
        """Training blocks for the same token budget with `share` of them teacher text (from the training
        prompts) and the rest WikiText's calibration split; share 0 is the WikiText blocks every row uses."""
        if share == 0:
            return self.train, [{"name": "wikitext", "tokens": int(self.train.numel())}]
        if share not in self._mixed:
            # the teacher first: its seed is then the same in every mix, so each mix takes the first
            # texts of the one cached generation (engine.prompts) instead of sampling its own
            specs = ["teacher", str(self.args.wikitext)] if share < 1 else ["teacher"]
            weights = [share, 1 - share] if share < 1 else [1.0]
            blocks, _, info = mix_blocks(DataMix.of(specs, weights), self.loaded.tokenizer, self.train.shape[0],
                                         self.s["seq_len"], seed=1, docs=(0.0, 0.6), model=self.teacher,
                                         cache_dir=self.args.out / "generated", model_name=self.loaded.name)
            self._mixed[share] = blocks, [{"name": i["name"], "tokens": i["tokens"]} for i in info]
        return self._mixed[share]

    def corrected_teacher(self) -> torch.nn.Module:
        """Teacher correction: a copy of the teacher fine-tuned (next-token cross-entropy, lr 1e-5) on the
        same training tokens and budget as the students; made once and reused."""
        if self._corrected is None:
            import copy

            model = copy.deepcopy(self.teacher)
            cfg = replace(self.config("kl+ce", method="cpt"), lr=1e-5)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="prunescope-quality-") as run_dir:
                r = distill(None, model, self.train, None, cfg, run_dir, resume=False)
            self._corrected = model.eval().requires_grad_(False)
            n = self.eval_blocks.shape[0] * (self.eval_blocks.shape[1] - 1)
            self.correction = {"tokens": r["tokens"], "seconds": round(time.perf_counter() - t0, 1),
                               "ppl_before": self.teacher_ppl,
                               "ppl_after": math.exp(token_nll(teacher_logits(model, self.eval_blocks),
                                                               self.eval_blocks).item() / n)}
        return self._corrected


def measure_budget(bench: Bench, minutes: float) -> int:
    """Tokens that fit `minutes` of distillation: median tokens/s of measured steps (the first, a
    warm-up, skipped) on the width_all student, times the time, rounded down to whole steps."""
    student = prune(bench.teacher, bench.scores(), bench.strategies["width_all"].targets)
    per_step = bench.s["batch"] * bench.s["seq_len"]
    bench.train = train_blocks(bench.loaded.tokenizer, bench.args.wikitext, 4 * per_step, bench.s["seq_len"])
    with tempfile.TemporaryDirectory(prefix="prunescope-quality-") as run_dir:
        distill(bench.teacher, student, bench.train, None, bench.config("kl+ce", tokens=0, steps=3),
                run_dir, resume=False)
        rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "tokens_per_s" in r]
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:] or rows)
    tokens = int(tps * minutes * 60) // per_step * per_step
    print(f"distillation: {tps:.1f} tokens/s measured ({machine_note()}) -> budget {tokens} tokens "
          f"({tokens // per_step} steps of {bench.s['batch']} x {bench.s['seq_len']}) for {minutes:g} min", flush=True)
    return max(per_step, tokens)


def experiments(b: Bench, quick: bool) -> list[Experiment]:
    """Strategies, baselines and ablations (a subset with --quick)."""
    S, t = b.strategies, b.teacher
    out = [Experiment(s.name, "strategy", s.label, s.targets,
                      lambda s=s: prune(t, b.scores(), s.targets), not quick or s.name in QUICK_DISTILLED)
           for s in S.values()]
    shapes = [S["width_all"]] if quick else unique_by_shape(S.values())
    for s in shapes:
        key = "depth" if s.family == "depth" else s.name
        out += [
            Experiment(f"random_{key}", "baseline", f"random units ({s.label} shape)", s.targets,
                       lambda s=s: prune(t, random_scores(b.scores()), s.targets), not quick),
            Experiment(f"magnitude_{key}", "baseline", f"weight magnitude ({s.label} shape)", s.targets,
                       lambda s=s: prune(t, magnitude_scores(t, b.scores()), s.targets), not quick),
            Experiment(f"random_init_{key}", "baseline", f"random init ({s.label} shape)", s.targets,
                       lambda s=s: reinit(prune(t, b.scores(), s.targets)), True),
        ]
    w, wh = S["width_all"], S["width_mlp_heads"]
    aggs = ["mean_mean"] if quick else [a for a in AGGREGATIONS if a != "l2_mean"]
    out += [Experiment(f"agg_{a}", "ablation: aggregation", f"{w.label}, aggregation {a} (ref: width_all, l2_mean)",
                       w.targets, lambda a=a: prune(t, b.scores(a), w.targets), not quick and a in ("mean_mean", "l2_l2"))
            for a in aggs]
    merged = replace(wh.targets, merge_heads=True)
    out.append(Experiment("merge_on", "ablation: head merge", f"{wh.label}, residual head merge (ref: width_mlp_heads)",
                          merged, lambda: prune(t, b.scores(), merged), not quick))
    out += [Experiment(f"iterative_T{n}", "ablation: iterative", f"{w.label}, T = {n} (ref: width_all, T = 1)",
                       w.targets, lambda n=n: prune_iteratively(t, b.calib(), w.targets, n)[0].float().eval(), not quick)
            for n in ((2,) if quick else (2, 4))]
    out.append(Experiment("loss_kl_only", "ablation: loss", f"{w.label}, KL only (ref: width_all, KL + CE)", w.targets,
                          lambda: prune(t, b.scores(), w.targets), True, loss="kl"))
    for s in ([w] if quick else [S["depth_block"], w]):  # retraining methods on the best depth and the Minitron shape
        for method, label, corrected in (("cpt", "continued pretraining (CE only, no teacher)", False),
                                         ("lora", "LoRA (rank 16, KD loss), merged", False),
                                         ("kd", "KD from the corrected teacher", True)):
            name = f"method_{method}{'_tc' if corrected else ''}_{s.name}"
            out.append(Experiment(name, "retraining method", f"{s.label}, {label} (ref: {s.name}, KD)", s.targets,
                                  lambda s=s: prune(t, b.scores(), s.targets), True, method=method,
                                  corrected_teacher=corrected))
    out += data_mix_experiments(b, quick)
    out += criterion_experiments(b, quick)
    out += refit_experiments(b, quick)
    return out


REFIT_SHAPES = ("width_mlp", "width_mlp_heads", "width_all", "depth_width")


def refit_experiments(b: Bench, quick: bool) -> list[Experiment]:
    """The least-squares refit (engine.refit) on the width and depth + width shapes, for the activation and
    weighted criteria: `refit_<criterion>_<shape>`; the same rows without refit are the strategy (activation) and
    criterion (weighted) rows."""
    S, t = b.strategies, b.teacher
    out = []
    for name in REFIT_SHAPES:
        for c in ("activation", "weighted"):
            targets = replace(S[name].targets, criterion=c, refit=True)
            out.append(Experiment(f"refit_{c}_{name}", "refit", f"{S[name].label}, criterion {c}, refit",
                                  targets, lambda targets=targets: prune(t, b.scores(), targets, b.calib()),
                                  not quick))
    return out


def refit_report(rows: list[dict]) -> str:
    """A Markdown table: each shape and criterion without and with the refit, one-shot and distilled."""
    by_name = {r["name"]: r for r in rows}
    lines = []
    for shape in REFIT_SHAPES:
        for c in ("activation", "weighted"):
            plain = by_name.get(shape if c == "activation" else f"criterion_{c}_{shape}")
            for label, r in (("no", plain), ("yes", by_name.get(f"refit_{c}_{shape}"))):
                if r is None:
                    continue
                dist = (f"{r['ppl_distilled']:.2f} | {r['kl_distilled']:.3f}" if r.get("ppl_distilled") is not None
                        else "- | -")
                lines.append(f"| {shape} | {c} | {label} | {r['ppl_oneshot']:.2f} | {r['kl_oneshot']:.3f} | {dist} |")
    if not lines:
        return ""
    head = ["| shape | criterion | refit | one-shot ppl | one-shot KL | distilled ppl | distilled KL |",
            "|---|---|---|---|---|---|---|"]
    return "\n## Refit: one-shot and after the same distillation\n\n" + "\n".join(head + lines) + "\n"


CRITERION_SHAPES = ("width_mlp", "width_mlp_heads", "width_all")
WEIGHTED_CRITERIA = ("weighted", "product")  # activation's rows are the width strategies themselves


def criterion_experiments(b: Bench, quick: bool) -> list[Experiment]:
    """The weight-aware importance criteria on the three width shapes, one-shot and (not --quick) after the
    same distillation; bench/optipfair_hybrid.py adds OptiPFair's hybrid at the MLP shape to the same table."""
    S, t = b.strategies, b.teacher
    out = []
    for name in CRITERION_SHAPES:
        s = S[name]
        for c in WEIGHTED_CRITERIA:
            targets = replace(s.targets, criterion=c)
            out.append(Experiment(f"criterion_{c}_{name}", "criterion", f"{s.label}, criterion {c} (ref: {name}, "
                                  "activation)", targets, lambda targets=targets: prune(t, b.scores(), targets),
                                  not quick))
    return out


def criterion_report(rows: list[dict]) -> str:
    """A Markdown table: each criterion on each width shape, one-shot and distilled (activation = the strategy
    rows; OptiPFair rows when bench/optipfair_hybrid.py added them)."""
    by_name = {r["name"]: r for r in rows}
    lines = []
    for shape in CRITERION_SHAPES:
        entries = [("activation (Minitron)", by_name.get(shape))]
        entries += [(c, by_name.get(f"criterion_{c}_{shape}")) for c in WEIGHTED_CRITERIA]
        entries += [(r["label"], r) for r in rows if r.get("group") == "criterion" and r.get("shape_of") == shape]
        for label, r in entries:
            if r is None:
                continue
            dist = (f"{r['ppl_distilled']:.2f} | {r['kl_distilled']:.3f}" if r.get("ppl_distilled") is not None
                    else "- | -")
            lines.append(f"| {shape} | {label} | {100 * r['fraction']:.1f}% | {r['ppl_oneshot']:.2f} | "
                         f"{r['kl_oneshot']:.3f} | {dist} |")
    if not lines:
        return ""
    head = ["| shape | criterion | params | one-shot ppl | one-shot KL | distilled ppl | distilled KL |",
            "|---|---|---|---|---|---|---|"]
    return "\n## Importance criteria: one-shot and after the same distillation\n\n" + "\n".join(head + lines) + "\n"


MIX_SHARES = {0.0: "WikiText only", 1.0: "teacher-generated only", 0.3: "70% WikiText + 30% teacher text",
              0.5: "50% WikiText + 50% teacher text"}


def data_mix_experiments(b: Bench, quick: bool) -> list[Experiment]:
    """The same budget on WikiText only, teacher text only and two mixes, for the best depth shape
    and the MLP + heads + channels shape (--quick: the latter); rows report in-domain and breadth."""
    S, t = b.strategies, b.teacher
    out = []
    for s in [S["width_all"]] if quick else [S["depth_block"], S["width_all"]]:
        for share, label in MIX_SHARES.items():
            out.append(Experiment(f"mix_{round(100 * share)}_{s.name}", "data mix", f"{s.label}, {label}", s.targets,
                                  lambda s=s: prune(t, b.scores(), s.targets), True, teacher_share=share))
    return out


def breadth_report(rows: list[dict]) -> str:
    """A Markdown table of the data-mix rows: in-domain and breadth perplexity / KL after distillation,
    each as a ratio to the teacher's."""
    mix = [r for r in rows if r.get("group") == "data mix" and r.get("ppl_distilled") is not None]
    if not mix:
        return ""
    lines = ["| row | teacher-text share | WikiText ppl (x teacher) | WikiText KL | breadth ppl (x teacher) | breadth KL |",
             "|---|---|---|---|---|---|"]
    for r in mix:
        lines.append(f"| {r['name']} | {r['teacher_share']:.0%} | {r['ppl_distilled']:.2f} "
                     f"({r['ppl_distilled'] / r['teacher_ppl_wikitext']:.2f}x) | {r['kl_distilled']:.3f} | "
                     f"{r['ppl_breadth_distilled']:.2f} ({r['ppl_breadth_distilled'] / r['teacher_ppl_breadth']:.2f}x) "
                     f"| {r['kl_breadth_distilled']:.3f} |")
    return "\n## Data mixes: in-domain (WikiText) and breadth (teacher text from unseen prompts)\n\n" + "\n".join(lines) + "\n"


def run_one(b: Bench, e: Experiment) -> dict:
    """Build, evaluate one-shot, distil, evaluate again; wall time of all of it."""
    t0 = time.perf_counter()
    student = e.build()
    t_build = time.perf_counter() - t0
    params = count_parameters(student)
    one = evaluate_student(b.t_logits, student, b.eval_blocks)
    row = {"name": e.name, "group": e.group, "label": e.label, "shape": describe_targets(b.spec, e.targets),
           "params": params, "fraction": params / count_parameters(b.teacher),
           "ppl_oneshot": one["ppl"], "kl_oneshot": one["kl"], "ppl_distilled": None, "kl_distilled": None,
           "loss": e.loss if e.distill else None, "build_s": round(t_build, 1)}
    train = None
    if e.teacher_share is not None:  # in-domain and breadth, one-shot; the tokens taken from each source
        br_blocks, br_logits, br_ppl = b.breadth()
        br = evaluate_student(br_logits, student, br_blocks)
        train, taken = b.mixed_train(e.teacher_share)
        row.update(teacher_share=e.teacher_share, train_sources=taken, teacher_ppl_wikitext=b.teacher_ppl,
                   teacher_ppl_breadth=br_ppl, ppl_breadth_oneshot=br["ppl"], kl_breadth_oneshot=br["kl"])
    if e.distill:
        r = b.distill(student, e.loss, e.method, e.corrected_teacher, train)
        after = evaluate_student(b.t_logits, student, b.eval_blocks)  # KL to the original teacher
        row.update(ppl_distilled=after["ppl"], kl_distilled=after["kl"], distill_tokens=r["tokens"],
                   distill_steps=r["steps"], distill_s=round(r["elapsed_s"], 1), method=e.method,
                   peak_memory_mib=round(r["peak_memory_bytes"] / 2**20, 1))
        if e.corrected_teacher:
            row["teacher_correction"] = b.correction
        if e.teacher_share is not None:
            br = evaluate_student(br_logits, student, br_blocks)
            row.update(ppl_breadth_distilled=br["ppl"], kl_breadth_distilled=br["kl"])
        save_to = getattr(b.args, "save_students", None)
        if save_to:  # a from_pretrained folder, for lm-eval or a look by hand
            row["saved_to"] = str(export_model(student, b.loaded.tokenizer, save_to / e.name,
                                               source_name=b.loaded.name, verify=False))
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["machine"] = machine_note()
    del student
    return row


def open_results(out: Path, stem: str, tokens: int | None, dtype: str) -> tuple[dict, int | None]:
    """The rows already in OUT/STEM.json and their pinned token budget, refusing another budget or dtype
    (rows are only comparable at the same budget and compute dtype)."""
    path = out / f"{stem}.json"
    old = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "rows": []}
    pinned = old["meta"].get("distill_tokens") if old["rows"] else None
    if pinned and tokens not in (None, pinned):
        raise SystemExit(f"{path} holds rows distilled on {pinned} tokens each, not --tokens {tokens}")
    pinned_dtype = old["meta"].get("settings", {}).get("dtype", "fp32") if old["rows"] else None
    if pinned_dtype and dtype != pinned_dtype:
        raise SystemExit(f"{path} holds rows computed in {pinned_dtype}, not --dtype {dtype}: use --dtype "
                         f"{pinned_dtype}, or another --out")
    return old, pinned


def add_row(out: Path, stem: str, old: dict, row: dict, command: str, settings: dict, bench: Bench) -> None:
    """Add `row` to OUT/STEM.json (replacing a row of the same name) and rewrite the report with the
    extra tables (the other bench scripts' way into the quality table)."""
    rows = [r for r in old["rows"] if r["name"] != row["name"]] + [row]
    meta = old["meta"] or {"settings": settings, "distill_tokens": bench.tokens, "teacher_ppl": bench.teacher_ppl,
                           "eval_tokens": int(bench.eval_blocks.numel())}
    meta.setdefault("runs", []).append({"command": command, "machine": [machine_note()], "rows": [row["name"]]})
    write_json(out / f"{stem}.json", {"meta": meta, "rows": rows})
    write_reports(out, stem, meta, rows)


def write_reports(out: Path, stem: str, meta: dict, rows: list[dict]) -> str:
    """The report (table, HTML, PNG) with the data-mix and criterion tables appended; its Markdown text."""
    text = write_report(out, stem, meta, rows)
    extra = breadth_report(rows) + criterion_report(rows) + refit_report(rows)
    if extra:
        with (out / f"{stem}.md").open("a") as f:
            f.write(extra)
    return text + extra


def _runs(meta: dict) -> list[dict]:
    """The invocations recorded in an earlier JSON (one entry made up from its meta if it predates
    the `runs` list)."""
    if not meta:
        return []
    return meta.get("runs") or [{"command": meta.get("command"), "machine": meta.get("machine", []),
                                 "wall_s": meta.get("wall_s"), "rows": None}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced run (~10 min on a quiet machine)")
    p.add_argument("--wikitext", type=Path, default=WIKITEXT, help="WikiText-2 raw file")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--only", default=None, help="comma-separated experiment names to run")
    p.add_argument("--resume", action="store_true", help="skip experiments already in the output JSON")
    p.add_argument("--minutes", type=float, default=15.0, help="full mode: distillation minutes per run")
    p.add_argument("--tokens", type=int, default=None, help="distillation token budget (skips the measurement)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="compute dtype of every evaluation and distillation (default fp32, as every recorded row; "
                        "--resume refuses another)")
    p.add_argument("--save-students", type=Path, default=None, metavar="DIR",
                   help="export every distilled student to DIR/NAME (a from_pretrained folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else FULL, dtype=args.dtype)
    stem = "quality_quick" if args.quick else "quality"
    path = args.out / f"{stem}.json"
    old, pinned = open_results(args.out, stem, args.tokens, args.dtype) if args.resume else ({"meta": {}, "rows": []}, None)
    with compute_dtype(args.dtype):
        return run_all(args, settings, stem, path, old, pinned, argv)


def run_all(args: argparse.Namespace, settings: dict, stem: str, path: Path, old: dict, pinned: int | None,
            argv: list[str] | None) -> int:
    """Every experiment asked for, each row written as soon as it is done; then the report."""
    t_start = time.perf_counter()
    notes = [f"start: {machine_note()}"]
    print(notes[0], flush=True)
    b = Bench(args, settings)
    b.scores()
    for s in b.strategies.values():
        print(f"{s.name:>16}: {describe_targets(b.spec, s.targets)}", flush=True)
    b.tokens = args.tokens or pinned or settings["tokens"] or measure_budget(b, args.minutes)
    b.train = train_blocks(b.loaded.tokenizer, args.wikitext, b.tokens, settings["seq_len"])
    todo = experiments(b, args.quick)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {e.name for e in todo}
        if unknown:
            sys.exit(f"unknown experiments {sorted(unknown)}; valid: {', '.join(e.name for e in todo)}")
        todo = [e for e in todo if e.name in names]
    rows, done = old["rows"], {r["name"] for r in old["rows"]}
    command = "bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    this = {"command": command, "machine": notes, "wall_s": 0.0, "rows": []}
    meta = {"command": old["meta"].get("command", command) if rows else command,
            "settings": settings, "distill_tokens": b.tokens, "teacher_params": count_parameters(b.teacher),
            "teacher_ppl": b.teacher_ppl, "eval_tokens": int(b.eval_blocks.numel()),
            "scores_timings": b.scores().meta.get("timings"), "machine": notes,
            "runs": [*_runs(old["meta"]), this]}
    for e in todo:
        if e.name in done:
            continue
        print(f"-- {e.name}: {e.label} [{machine_note()}]", flush=True)
        rows.append(run_one(b, e))
        this["rows"].append(e.name)
        r = rows[-1]
        print(f"   {r['params'] / 1e6:.2f}M ({100 * r['fraction']:.1f}%), one-shot ppl {r['ppl_oneshot']:.2f} "
              f"KL {r['kl_oneshot']:.3f}" + (f", distilled ppl {r['ppl_distilled']:.2f} KL {r['kl_distilled']:.3f}"
                                             if r["ppl_distilled"] is not None else "") + f", {r['wall_s']:.0f}s",
              flush=True)
        meta["wall_s"] = this["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(path, {"meta": meta, "rows": rows})
    notes.append(f"end: {machine_note()}")
    meta["wall_s"] = this["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json(path, {"meta": meta, "rows": rows})
    print(write_reports(args.out, stem, meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
