"""`prunescope eval MODEL`: held-out perplexity, KL to a teacher, throughput, parameters and size."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.data_args import DATA_SOURCES, add_block_args

log = logging.getLogger(__name__)


def _batch_sizes(text: str) -> list[int]:
    from engine.errors import UserError

    if text.strip().lower() in ("", "none", "0"):
        return []
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated whole numbers, e.g. 1,16 (or 'none'), "
                        f"got {text!r}") from None
    if any(b < 1 for b in sizes):
        raise UserError(f"--batch-sizes must be >= 1, got {text!r}")
    return sizes


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: held-out perplexity, KL to a teacher, speed, size",
                       description="Perplexity on held-out text, mean per-token KL(teacher || model) when a "
                                   "teacher is given, prefill and decode tokens/s at each batch size, parameters "
                                   "and size on disk. Prints a table; --json writes the full result.")
    p.add_argument("model", nargs="?", default="default", help="default, hub id, HF folder or .gguf")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="reference model for KL (same tokenizer); also evaluated as its own row")
    add_block_args(p, data_help=f"text: {DATA_SOURCES} (required, except with --tasks of lm-eval's own registry)",
                   data_range="0.6:1", role="evaluation",
                   range_help="fraction of the documents to evaluate on (default 0.6:1, the WikiText held-out split)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass for perplexity / KL")
    p.add_argument("--batch-sizes", default="1,16", help="throughput batch sizes, comma-separated, or 'none'")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for the throughput test")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens for the throughput test")
    p.add_argument("--repeats", type=int, default=3, help="timed throughput repeats (median)")
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16, fp16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON to this file")
    p.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="run lm-evaluation-harness (its Hugging Face backend) instead: local tasks built from --data "
                        "(prunescope_ppl: word perplexity; prunescope_lastword: last-word accuracy) or any lm-eval "
                        "task; the model and --teacher side by side")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: at most this many documents per task")
    p.add_argument("--max-length", type=int, default=None,
                   help="with --tasks: context lm-eval gives the model (default: the model's own); word perplexity "
                        "scores documents in disjoint windows of this many tokens")
    p.set_defaults(func=run)


def _folder(loaded) -> Path | None:
    path = Path(loaded.source)
    return path if path.is_dir() else None


def run(args) -> int:
    from engine.devices import compute_dtype

    with compute_dtype(args.dtype):  # --dtype X computes in X: no bf16 autocast over an fp32 request
        return _run(args)


def _run(args) -> int:
    from engine.data import DataSource, get_blocks, parse_doc_range
    from engine.errors import UserError
    from engine.evaluate import evaluate_model, format_table, model_device, summary_row
    from engine.fileio import atomic_write_text
    from engine.models import load
    from engine.resources import check_speed_test, preflight

    if args.json and Path(args.json).exists() and not getattr(args, "force", False):
        raise UserError(f"{args.json} already exists; pass --force to overwrite it, or choose another --json file")
    if args.tasks:
        from engine.lm_eval_tasks import run_tasks

        return run_tasks(args, out=print)
    if not args.data:
        raise UserError("--data is required: a text file, hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] or generated[:N]")
    docs = parse_doc_range(args.data_range)
    sizes = _batch_sizes(args.batch_sizes)
    for name in ("samples", "seq_len", "batch_size", "prompt_len", "repeats"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be at least {2 if name == 'seq_len' else 1}, "
                            f"got {getattr(args, name)}")
    if args.new_tokens < 0:
        raise UserError(f"--new-tokens must be >= 0, got {args.new_tokens}")
    # sizes first (seq-len within the model's positions, peak memory; a smaller batch gives the same results)
    args.batch_size = preflight(args.model, kind="eval", batch=args.batch_size, seq_len=args.seq_len,
                                dtype=args.dtype, device=args.device, teacher=args.teacher, adjust_batch=True,
                                batch_flag="--batch-size")
    source = DataSource.parse(args.data, column=args.text_column, docs=docs)
    loaded = load(args.model, dtype=args.dtype, device=args.device)
    check_speed_test(loaded.model.config, sizes, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     device=model_device(loaded.model), weights=False)
    teacher = load(args.teacher, dtype=args.dtype, device=args.device) if args.teacher else None
    if teacher is not None:
        v_s, v_t = loaded.model.config.vocab_size, teacher.model.config.vocab_size
        if v_s != v_t:
            raise UserError(f"the teacher's vocabulary ({v_t}) differs from the model's ({v_s}); KL needs the "
                            "same tokenizer")
    blocks = get_blocks(source, loaded.tokenizer, args.samples, args.seq_len, args.seed, model=loaded.model)
    log.info("evaluating on %d x %d tokens of %s", *blocks.shape, source.label)
    kw = dict(batch_sizes=sizes, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
              batch_size=args.batch_size)
    results = {}
    if teacher is not None:
        results["teacher"] = {"name": teacher.name, **evaluate_model(teacher.model, blocks, folder=_folder(teacher),
                                                                     **kw)}
    results["model"] = {"name": loaded.name,
                        **evaluate_model(loaded.model, blocks, teacher.model if teacher else None,
                                         folder=_folder(loaded), **kw)}
    rows = [summary_row(f"{r['name']} ({role})" if teacher else r["name"], r) for role, r in results.items()]
    print(format_table(rows))
    if teacher is not None and results["teacher"]["params"]:
        m, t = results["model"], results["teacher"]
        print(f"parameters: {100 * m['params'] / t['params']:.1f}% of the teacher; "
              f"perplexity x{m['ppl'] / t['ppl']:.3f}")
    if args.json:
        out = Path(args.json)
        data = {"data": source.label, "samples": args.samples, "seq_len": args.seq_len, **results}
        atomic_write_text(out, json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
