"""`prunescope run`: the whole pipeline (score -> plan -> prune -> evaluate -> distill -> evaluate ->
export) in a run folder, in the foreground or as a detached background job (--detach)."""

from __future__ import annotations

from engine.commands.distill import add_training_args, distill_config, launch
from engine.data import parse_doc_range
from engine.errors import PlanError
from engine.target_args import add_target_args, targets_from_args, validate_for_model


def register(sub) -> None:
    p = sub.add_parser("run", help="prune + distill + export in a run folder (optionally in the background)")
    p.add_argument("--model", default="default", help="default, hub id, folder or .gguf")
    add_target_args(p)
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-samples", type=int, default=32, help="calibration blocks for scoring")
    c.add_argument("--calib-seq-len", type=int, default=256)
    c.add_argument("--calib-data", default=None,
                   help="calibration source when it is not the training data (a file, hf:..., generated[:N], "
                        "mix:FILE; default: --data), e.g. your data while --data mixes in teacher text")
    add_training_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.pipeline import PipelineConfig

    targets = targets_from_args(args)
    if all(getattr(targets, axis) is None for axis in ("hidden", "ffn", "heads", "layers", "experts", "drop_layers")):
        raise PlanError("give at least one target: --hidden, --ffn, --heads, --layers or --drop-layers")
    validate_for_model(targets, args.model)  # before a job folder exists
    cfg = PipelineConfig(model=args.model, data=args.data, calib_data=args.calib_data, text_column=args.text_column,
                         train_range=parse_doc_range(args.train_range, "--train-range"),
                         eval_range=parse_doc_range(args.eval_range, "--eval-range"),
                         calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                         targets=targets, distill=distill_config(args), eval_samples=args.eval_samples,
                         seed=args.seed, dtype=args.dtype, device=args.device,
                         teacher_correction_tokens=args.correct_teacher_tokens,
                         teacher_correction_lr=args.correct_teacher_lr)
    return launch(args, cfg)
