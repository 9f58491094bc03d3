"""`prunescope run`: the whole pipeline (score -> plan -> prune -> evaluate -> distill -> evaluate ->
export) in a run folder, in the foreground or as a detached background job (--detach)."""

from __future__ import annotations

from engine.commands.distill import add_training_args, distill_config, launch
from engine.data import parse_doc_range


def register(sub) -> None:
    p = sub.add_parser("run", help="prune + distill + export in a run folder (optionally in the background)")
    p.add_argument("--model", default="default", help="default, hub id, folder or .gguf")
    t = p.add_argument_group("pruning targets (omitted: keep that axis)")
    t.add_argument("--hidden", type=int, default=None, help="embedding channels")
    t.add_argument("--ffn", type=int, default=None, help="MLP intermediate size")
    t.add_argument("--heads", type=int, default=None, help="query heads")
    t.add_argument("--layers", type=int, default=None, help="layers to keep")
    t.add_argument("--depth-by", default="bi", help="how layers are chosen: bi, ppl, block, taylor, list")
    t.add_argument("--drop-layers", default=None, help="comma-separated layers to drop (implies --depth-by list)")
    t.add_argument("--merge-heads", action="store_true", help="merge pruned query heads into kept ones (Minitron); hurt SmolLM2-135M, see docs/BENCHMARKS.md")
    t.add_argument("--calib-samples", type=int, default=32, help="calibration blocks for scoring")
    t.add_argument("--calib-seq-len", type=int, default=256)
    add_training_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.pipeline import PipelineConfig
    from engine.runs import RunError

    targets = {k: getattr(args, k) for k in ("hidden", "ffn", "heads", "layers") if getattr(args, k) is not None}
    if args.drop_layers:
        try:
            drop = sorted({int(x) for x in args.drop_layers.split(",") if x.strip()})
        except ValueError as e:
            raise RunError(f"--drop-layers takes comma-separated layer numbers, e.g. 3,4,5; got {args.drop_layers!r}") from e
        targets.update(drop_layers=drop, depth_by="list")
    if not targets:
        raise RunError("give at least one target: --hidden, --ffn, --heads, --layers or --drop-layers")
    targets.setdefault("depth_by", args.depth_by)
    targets["merge_heads"] = bool(args.merge_heads)
    cfg = PipelineConfig(model=args.model, data=args.data, text_column=args.text_column,
                         train_range=parse_doc_range(args.train_range, "--train-range"),
                         eval_range=parse_doc_range(args.eval_range, "--eval-range"),
                         calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, targets=targets,
                         distill=distill_config(args), eval_samples=args.eval_samples, seed=args.seed,
                         dtype=args.dtype, device=args.device)
    return launch(args, cfg)
