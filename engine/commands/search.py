"""`prunescope search`: every valid shape within a parameter budget, previewed one-shot, then a
tournament of the best K distilled side by side. Writes candidates.csv and the tournament's metrics
in a run folder that `prunescope status / cancel / resume` handle like any other job.

Every valid shape within --params ± --tolerance is pruned one-shot in memory and scored by
KL(teacher || pruned) on held-out text; the best --top are then distilled on the same batches and
ranked again. Mixtures of experts add the experts axis (experts per layer, --experts N fixes it)."""

from __future__ import annotations

import argparse

from engine.importance.scores import CRITERIA, DEFAULT_CRITERION
from engine.search.shapes import SEARCH_AXES
from engine.targets import DEFAULT_REFIT, REFIT_HELP

AXIS_NAMES = {"hidden": "hidden", "ffn": "ffn", "mlp": "ffn", "heads": "heads", "layers": "layers", "depth": "layers",
              "experts": "experts"}
HELP = "search the shapes within a parameter budget (one-shot KL + tournament)"


def register(sub) -> None:
    p = sub.add_parser("search", help=HELP, description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default, hub id, folder or .gguf")
    p.add_argument("--data", default="generated", help="file, hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] or generated[:N]")
    p.add_argument("--text-column", default=None)
    p.add_argument("--train-range", default="0:0.6", help="documents for scoring and the tournament (START:END)")
    p.add_argument("--eval-range", default="0.6:1", help="held-out documents for the KL / perplexity (START:END)")
    p.add_argument("--scores", default=None, metavar="DIR", help="scores of this model (default: score it)")
    p.add_argument("--params", type=float, required=True,
                   help="parameter budget: a fraction of the source (0.75) or a count (100e6)")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance of the budget (default 0.02)")
    p.add_argument("--axes", default=",".join(SEARCH_AXES),
                   help="axes that may change: hidden,ffn,heads,layers,experts (experts: mixtures of experts only)")
    for axis in SEARCH_AXES:
        p.add_argument(f"--{axis}-range", default=None, metavar="MIN:MAX", help=f"bounds of the {axis} axis")
    p.add_argument("--experts", type=int, default=None, metavar="N",
                   help="mixtures of experts: keep N experts per layer in every candidate (the router's top-k is "
                        "clamped to N); the other axes are searched around it")
    p.add_argument("--round", type=int, default=0, choices=[0, 1, 8, 32, 64, 128],
                   help="hidden / MLP widths in multiples of this (default: 64 where the source width is a "
                        "multiple of 64)")
    p.add_argument("--depth-by", default="bi", choices=["bi", "ppl", "taylor"], help="how layers are chosen")
    p.add_argument("--criterion", default=DEFAULT_CRITERION, choices=list(CRITERIA),
                   help="how heads, neurons and channels are ranked (see `prunescope prune --help`)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=DEFAULT_REFIT,
                   help="every candidate refitted before its preview and the tournament (one refit per candidate): "
                        + REFIT_HELP)
    p.add_argument("--max-candidates", type=int, default=None, help="refuse a search with more shapes than this")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out blocks (default 8)")
    p.add_argument("--eval-seq-len", type=int, default=256, help="tokens per held-out block (default 256)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    t = p.add_argument_group("tournament")
    t.add_argument("--top", type=int, default=4, help="candidates distilled in the tournament (default 4)")
    t.add_argument("--tokens", type=int, default=None, help="distillation tokens per candidate (default 8 steps)")
    t.add_argument("--batch", type=int, default=2)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--eval-every", type=int, default=4, help="steps between held-out evaluations")
    t.add_argument("--halving", action="store_true", help="successive halving: the worse half stops at each round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--detach", action="store_true", help="run as a background job and return at once")
    p.add_argument("--if-busy", choices=["queue", "refuse"], default="queue")
    p.add_argument("--force", action="store_true", help="replace a run already in --out")
    p.set_defaults(func=run)


def _bounds(args) -> dict[str, tuple[int, int]]:
    from engine.errors import PlanError

    out = {}
    for axis in SEARCH_AXES:
        text = getattr(args, f"{axis}_range")
        if text:
            lo, _, hi = text.partition(":")
            try:
                out[axis] = (int(lo or 1), int(hi or 10**12))
            except ValueError:
                raise PlanError(f"--{axis}-range takes MIN:MAX whole numbers, e.g. 256:512; got {text!r}") from None
    if args.experts is not None:
        if args.experts_range:
            raise PlanError("give --experts N (a fixed count) or --experts-range MIN:MAX, not both")
        if args.experts < 1:
            raise PlanError(f"--experts takes the experts kept per layer, a whole number >= 1; got {args.experts}")
        out["experts"] = (args.experts, args.experts)
    return out


def config_from_args(args: argparse.Namespace):
    """The SearchConfig these arguments describe."""
    from dataclasses import replace

    from engine.data import parse_doc_range
    from engine.errors import PlanError
    from engine.search.job import SearchConfig, cpu_distill

    axes = []
    for a in args.axes.split(","):
        if a.strip() and a.strip() not in AXIS_NAMES:
            raise PlanError(f"unknown axis {a.strip()!r} in --axes; valid: {', '.join(SEARCH_AXES)}")
        if a.strip():
            axes.append(AXIS_NAMES[a.strip()])
    if args.experts is not None:
        axes.append("experts")
    space = {"budget": args.params, "tolerance": args.tolerance, "axes": sorted(set(axes), key=SEARCH_AXES.index),
             "bounds": _bounds(args), "rounding": args.round, "depth_by": args.depth_by,
             "criterion": args.criterion, "refit": args.refit}
    d = replace(cpu_distill(), tokens=args.tokens, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                eval_every=args.eval_every, checkpoint_every=args.eval_every, seed=args.seed, dtype=args.dtype)
    return SearchConfig(model=args.model, data=args.data, text_column=args.text_column,
                        train_range=parse_doc_range(args.train_range, "--train-range"),
                        eval_range=parse_doc_range(args.eval_range, "--eval-range"), space=space,
                        scores=args.scores, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                        eval_samples=args.eval_samples, eval_seq_len=args.eval_seq_len, top=args.top,
                        halving=args.halving, distill=d, max_candidates=args.max_candidates, seed=args.seed,
                        dtype=args.dtype, device=args.device)


def run(args) -> int:
    from engine.fileio import read_json
    from engine.jobs import exit_code, run_or_detach
    from engine.search.job import create_search

    cfg = config_from_args(args)
    if args.experts is not None:  # checked on the saved architecture before a run folder exists
        from engine.target_args import validate_for_model
        from engine.targets import Targets

        validate_for_model(Targets(experts=args.experts), args.model)
    if args.if_busy == "refuse":  # refused before a run folder exists: nothing is left behind
        from engine.device_lock import ensure_device_free

        ensure_device_free(args.device)
    run_ = create_search(args.out, cfg, force=args.force)
    state = run_or_detach(run_.path, args.detach, args.if_busy)
    if state == "done":
        s = read_json(run_.path / "summary.json") or {}
        print(f"candidates: {run_.path / 'candidates.csv'}; {s.get('n_candidates')} shapes; winner {s.get('winner')}; "
              f"ranking {', '.join(s.get('final_ranking', []))}")
    return exit_code(state)
