"""`prunescope distill`: distill an already-pruned student from its teacher (a run folder job).

Also holds the training / job options shared with `prunescope run`."""

from __future__ import annotations

import argparse


class _MixArg(argparse.Action):
    """Repeated --data and --mix collect into args.data: one spec stays a string, several become
    {"specs": [...], "weights": [...] | None}, which PipelineConfig checks (engine.mix.DataMix)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        specs = list(getattr(namespace, "_data_specs", []))
        weights = getattr(namespace, "_mix_weights", None)
        if option_string == "--mix":
            weights = values
        else:
            specs.append(values)
        namespace._data_specs, namespace._mix_weights = specs, weights
        namespace.data = specs[0] if len(specs) == 1 and weights is None else {"specs": specs, "weights": weights}
        namespace.mix = weights


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Distillation and job options shared by `run` and `distill`."""
    g = p.add_argument_group("distillation")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    g.add_argument("--tokens", type=int, default=None, help="token budget instead of --steps")
    g.add_argument("--batch", type=int, default=4, help="sequences per micro-batch and process")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=10, help="warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--kl-weight", type=float, default=1.0)
    g.add_argument("--ce-weight", type=float, default=0.0)
    g.add_argument("--hidden-weight", type=float, default=0.0)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-samples", type=int, default=16, help="held-out blocks for evaluation")
    g.add_argument("--checkpoint-every", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("retraining method")
    m.add_argument("--method", choices=["kd", "cpt", "lora"], default="kd",
                   help="kd: distillation from the teacher (Minitron); cpt: continued pretraining, next-token "
                        "cross-entropy only, no teacher; lora: LoRA adapters on the student, merged at export")
    m.add_argument("--lora-rank", type=int, default=16)
    m.add_argument("--lora-alpha", type=float, default=32.0)
    m.add_argument("--lora-dropout", type=float, default=0.0)
    m.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated module names (default: every linear layer of the decoder blocks)")
    m.add_argument("--lora-loss", choices=["kd", "ce"], default="kd", help="what LoRA trains on")
    m.add_argument("--correct-teacher-tokens", type=int, default=0, metavar="N",
                   help="teacher correction: first fine-tune the teacher on N tokens of the training data "
                        "(cross-entropy) and distil from it (0: off)")
    m.add_argument("--correct-teacher-lr", type=float, default=1e-5)
    j = p.add_argument_group("data and job")
    j.add_argument("--data", default="generated", action=_MixArg,
                   help="file, hf:NAME[:CONFIG[:SPLIT[:COLUMN]]], generated[:N], teacher[:N[:TEMP[:PROMPTS]]] "
                        "(text the teacher writes from everyday prompts) or mix:FILE (lines `WEIGHT SPEC`); "
                        "repeat it for a mix")
    j.add_argument("--mix", default=None, action=_MixArg, metavar="W1,W2,...",
                   help="weights of the repeated --data sources, e.g. 0.7,0.3 (default: equal shares)")
    j.add_argument("--text-column", default=None)
    j.add_argument("--train-range", default="0:0.6", help="fraction of documents for training (START:END)")
    j.add_argument("--eval-range", default="0.6:1", help="held-out fraction of documents (START:END)")
    j.add_argument("--dtype", default="auto", help="teacher weights / autocast: auto, bf16, fp32")
    j.add_argument("--device", default="auto")
    j.add_argument("--run-dir", required=True, help="run folder (config, status, metrics, checkpoints, model)")
    j.add_argument("--detach", action="store_true", help="run as a background job and return at once")
    j.add_argument("--if-busy", choices=["queue", "refuse"], default="queue",
                   help="when the device runs another job: wait in the queue (default) or refuse")
    j.add_argument("--force", action="store_true", help="replace an existing run folder")


def distill_config(args, layer_map=None):
    from engine.distill import DistillConfig
    from engine.runs import RunError

    try:
        return DistillConfig(
            steps=args.steps, tokens=args.tokens, batch_size=args.batch, grad_accum=args.grad_accum,
            seq_len=args.seq_len, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
            weight_decay=args.weight_decay, clip=args.clip, temperature=args.temperature,
            kl_weight=args.kl_weight, ce_weight=args.ce_weight, hidden_weight=args.hidden_weight,
            layer_map=layer_map, eval_every=args.eval_every, eval_samples=args.eval_samples,
            checkpoint_every=args.checkpoint_every, seed=args.seed, dtype=args.dtype, method=args.method,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            lora_targets=tuple(n for n in args.lora_targets.split(",") if n) if args.lora_targets else None,
            lora_loss=args.lora_loss)
    except ValueError as e:
        raise RunError(str(e)) from None


def launch(args, config) -> int:
    """Create the run folder, then run in the foreground or start a detached job."""
    from engine.jobs import execute, exit_code, run_or_detach
    from engine.pipeline import create_run
    from engine.runs import RunError, barrier, init_distributed, world

    rank, n = world()
    if n > 1:  # torchrun / accelerate launch: rank 0 creates the folder, every rank runs the job
        if args.detach:
            raise RunError("--detach cannot be combined with torchrun / accelerate launch")
        init_distributed()
        if rank == 0:
            create_run(args.run_dir, config, force=args.force)
        barrier()
        state = execute(args.run_dir, if_busy=args.if_busy)
        return 0 if state in ("done", "cancelled") else 1
    if args.if_busy == "refuse":  # refused before a run folder exists: nothing is left behind
        from engine.device_lock import ensure_device_free

        ensure_device_free(config.device)
    run = create_run(args.run_dir, config, force=args.force)
    return exit_code(run_or_detach(run.path, args.detach, args.if_busy))


def register(sub) -> None:
    p = sub.add_parser("distill", help="distill an already-pruned student from its teacher")
    p.add_argument("--teacher", default="default", help="teacher model: default, hub id, folder or .gguf")
    p.add_argument("--student", required=True, help="the pruned student (Hugging Face folder)")
    p.add_argument("--layer-map", default=None,
                   help="teacher layer of each student layer, e.g. 0,1,2,5 (for --hidden-weight)")
    add_training_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.data import parse_doc_range
    from engine.pipeline import PipelineConfig

    layer_map = tuple(int(x) for x in args.layer_map.split(",")) if args.layer_map else None
    cfg = PipelineConfig(model=args.teacher, student=args.student, data=args.data, text_column=args.text_column,
                         train_range=parse_doc_range(args.train_range, "--train-range"),
                         eval_range=parse_doc_range(args.eval_range, "--eval-range"),
                         distill=distill_config(args, layer_map), eval_samples=args.eval_samples,
                         seed=args.seed, dtype=args.dtype, device=args.device,
                         teacher_correction_tokens=args.correct_teacher_tokens,
                         teacher_correction_lr=args.correct_teacher_lr)
    return launch(args, cfg)
