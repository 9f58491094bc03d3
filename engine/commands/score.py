"""`prunescope score`: importance scores of every prunable axis, saved (and cached) in a folder."""

from __future__ import annotations

from engine.data_args import DATA_SOURCES, add_block_args
from engine.importance.scores import CRITERIA, DEFAULT_CRITERION


def register(sub) -> None:
    p = sub.add_parser("score", help="compute importance scores (heads, neurons, channels, layers)",
                       description="Activation-based importance of heads, MLP neurons, embedding channels and "
                                   "layers (BI, optional perplexity sweep, blocks, Taylor+), written to a folder "
                                   "as scores.safetensors + scores.json and reused when asked again.")
    p.add_argument("--model", default="default", help="default, hub id, HF folder or .gguf")
    add_block_args(p, data_help=f"(required unless --add-to) calibration text: {DATA_SOURCES}",
                   data_range="0:1", role="calibration",
                   range_help="fraction of the documents to use (WikiText convention: 0:0.6 for calibration)")
    p.add_argument("--aggregation", default="l2_mean",
                   help="<batch>_<seq>, each of l2|mean|var (default l2_mean, as Minitron)")
    p.add_argument("--depth-ppl", action="store_true", help="perplexity increase with each layer removed")
    p.add_argument("--depth-samples", type=int, default=None, metavar="K",
                   help="calibration samples the perplexity sweeps use, the first K (default: all on a GPU, "
                        "8 on a CPU: the sweep costs about (layers - 1) / 2 forward passes per sample)")
    p.add_argument("--add-to", default=None, metavar="DIR",
                   help="add the perplexity sweep (--block-ppl: also the block sweep) to the scores in DIR, on "
                        "their model, data and dtype, without recomputing the width scores")
    p.add_argument("--blocks", type=int, default=None, metavar="N", help="also score contiguous blocks of N layers")
    p.add_argument("--block-ppl", action="store_true", help="perplexity with each block removed (needs --blocks)")
    p.add_argument("--taylor", action="store_true", help="Taylor+ per layer (needs a backward pass)")
    p.add_argument("--criterion", default=DEFAULT_CRITERION, choices=list(CRITERIA),
                   help="the unit ranking the summary describes (every criterion is stored in the scores; "
                        "prune/run/search choose theirs with --criterion)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16, fp16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--stream", nargs="?", const="cpu", default=None, choices=["cpu", "disk"],
                   help="for models larger than the device: keep the weights off it and copy each module's "
                        "weights there only while it runs; cpu (the default) keeps them in RAM, disk reads them from "
                        "the checkpoint at each forward (larger than RAM too). Same scores, slower; not with "
                        "--taylor")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="with --stream disk: where weights that must be converted on load are re-saved "
                        "(default: a temporary folder)")
    p.add_argument("--out", default=None, metavar="DIR", help="scores folder (default: in the prunescope cache)")
    p.add_argument("--force", action="store_true", help="recompute and overwrite scores already in --out")
    p.set_defaults(func=run)


def _layers(values, k: int = 3, largest: bool = True) -> str:
    idx = sorted(range(len(values)), key=lambda i: values[i], reverse=largest)[:k]
    return ", ".join(f"{i} ({values[i]:.4g})" for i in idx)


def criterion_lines(scores, criterion: str) -> list[str]:
    """How the criterion ranks the width units: the lowest-ranked channels, and how far its neuron and head
    rankings are from Minitron's activation ranking (Spearman per layer, averaged)."""
    from engine.importance.aggregate import spearman
    from engine.importance.scores import criterion_tensor

    names = {axis: criterion_tensor(axis, criterion) for axis in ("heads", "neurons", "channels")}
    missing = [n for n in names.values() if not scores.has(n)]
    if missing:
        return [f"criterion {criterion}: not in these scores (made before the weight-aware criteria); rescore "
                "with --force"]
    lines = [f"criterion {criterion}: least important channels {_layers(scores[names['channels']].tolist(), 5, False)}"]
    if criterion != "activation":
        rho = {axis: [spearman(scores[axis][i], scores[names[axis]][i]) for i in range(scores[axis].shape[0])]
               for axis in ("heads", "neurons")}
        mean = {k: sum(r or 0.0 for r in v) / len(v) for k, v in rho.items()}
        lines.append(f"criterion {criterion} vs activation, Spearman per layer (mean): neurons "
                     f"{mean['neurons']:.3f}, heads {mean['heads']:.3f}, channels "
                     f"{spearman(scores['channels'], scores[names['channels']]) or float('nan'):.3f}")
    return lines


def summary(scores, folder, reused: str, criterion: str = DEFAULT_CRITERION) -> list[str]:
    """Short human summary of a scores file."""
    m = scores.meta
    lines = [
        f"scores: {folder}",
        f"cache: {'reused' if reused == 'all' else 'partly reused' if reused == 'partial' else 'computed'}",
        f"model: {m.get('model')} ({m.get('model_type')}, {m.get('n_layers')} layers); data: {m.get('data')}; "
        f"{m.get('n_samples')} x {m.get('seq_len')} tokens; aggregation {m.get('aggregation')}",
    ]
    if m.get("stream", "off") != "off":
        lines.append(f"computed streamed: weights kept on {m['stream']}, layers run on {m.get('device')}")
    bi = scores["bi"].tolist()
    lines.append(f"BI most important layers: {_layers(bi)}; least: {_layers(bi, largest=False)}")
    if scores.has("ppl_increase"):
        ppl = scores["ppl_increase"].tolist()
        lines.append(f"base perplexity {m.get('base_ppl'):.4g}; ppl increase most: {_layers(ppl)}; "
                     f"least: {_layers(ppl, largest=False)}")
        rho = m.get("spearman_bi_ppl")
        lines.append(f"Spearman(BI, ppl increase) = {'n/a' if rho is None else f'{rho:.3f}'}; perplexity sweep on "
                     f"{m.get('depth_samples') or m.get('n_samples')} of the {m.get('n_samples')} samples")
    n = m.get("block_size")
    if scores.has("block_bi"):
        lines.append(f"blocks of {n}: lowest BI start at layers {_layers(scores['block_bi'].tolist(), largest=False)}")
    if scores.has("block_ppl_increase"):
        lines.append(f"blocks of {n}: lowest ppl increase start at "
                     f"{_layers(scores['block_ppl_increase'].tolist(), largest=False)}")
    if scores.has("taylor"):
        lines.append(f"Taylor+ least important layers: {_layers(scores['taylor'].tolist(), largest=False)}")
    lines += criterion_lines(scores, criterion)
    t = m.get("timings", {})
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return lines


def _bar():
    from tqdm import tqdm

    bar = tqdm(total=1000, desc="scoring", bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def progress(frac: float, message: str) -> None:
        bar.update(max(0, int(frac * 1000) - bar.n))
        bar.set_description_str(message, refresh=False)

    return bar, progress


def _estimate(loaded, arch: dict, seq_len: int, depth_samples: int, block_size, block_ppl: bool,
              depth_ppl: bool = True, batch_size: int = 8) -> str:
    """The sweep's estimated time, from one timed forward of this model (at the sweep's batch) and the
    sweep's cost formula."""
    from engine.importance.sweep import estimate_sweep_seconds, format_seconds, measure_layer_seconds

    per_layer = measure_layer_seconds(loaded.model, seq_len, batch_size=min(batch_size, depth_samples))
    secs = estimate_sweep_seconds(per_layer, arch, depth_samples, depth_ppl, block_size, block_ppl)
    return (f"perplexity sweep on {depth_samples} x {seq_len} tokens: about {format_seconds(secs)} (one layer pass "
            f"measured at {1000 * per_layer:.2f} ms per sample)")


def _add_to(args) -> int:
    from engine.importance import ScoreError, Scores, add_depth_scores
    from engine.importance.scoring import model_spec_of
    from engine.importance.stream import execution_device
    from engine.importance.sweep import default_depth_samples
    from engine.models import load

    if args.data or args.taylor or args.force:
        raise ScoreError("--add-to uses the data, samples and seed recorded in the scores; drop --data, "
                         "--taylor and --force")
    meta = Scores.load(args.add_to).meta
    loaded = load(args.model if args.model != "default" else model_spec_of(meta), dtype=meta.get("dtype") or "auto",
                  device=args.device)
    n = int(meta.get("n_samples") or 1)
    k = min(args.depth_samples or default_depth_samples(n, execution_device(loaded.model).type), n)
    block_size = args.blocks or meta.get("block_size")
    batch = int((meta.get("config") or {}).get("batch_size") or args.batch_size)
    print(_estimate(loaded, meta["arch"], int(meta.get("seq_len") or 2), k, block_size, args.block_ppl,
                    batch_size=batch), flush=True)
    bar, progress = _bar()
    try:
        scores = add_depth_scores(args.add_to, loaded, depth_samples=k, block_size=args.blocks,
                                  block_ppl=args.block_ppl, progress=progress)
    finally:
        bar.close()
    for line in summary(scores, args.add_to, scores.meta.get("reused", "none")):
        print(line)
    return 0


def run(args) -> int:
    from engine.data import DataSource, parse_doc_range
    from engine.importance import ScoreConfig, ScoreError, score
    from engine.importance.stream import execution_device
    from engine.importance.sweep import default_depth_samples
    from engine.models import load
    from engine.resources import preflight

    if args.add_to:
        return _add_to(args)
    if not args.data:
        raise ScoreError("give --data (calibration text), or --add-to DIR to add the perplexity sweep to scores")
    # sizes first (seq-len within the model's positions, peak memory; a smaller batch gives the same scores)
    batch = preflight(args.model, kind="score", batch=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                      device=args.device, adjust_batch=True, depth_ppl=args.depth_ppl or args.block_ppl,
                      taylor=args.taylor, weights=not args.stream, batch_flag="--batch-size")
    source = DataSource.parse(args.data, column=args.text_column, docs=parse_doc_range(args.data_range))
    config = ScoreConfig(aggregation=args.aggregation, depth_ppl=args.depth_ppl, block_size=args.blocks,
                         block_ppl=args.block_ppl, taylor=args.taylor, batch_size=batch,
                         depth_samples=args.depth_samples)
    if args.stream and args.taylor:  # refused before loading (score() would refuse it too)
        raise ScoreError("--taylor needs every layer's gradients at once, which --stream cannot keep on the "
                         "device; drop one of them")
    if args.offload_dir and args.stream != "disk":
        raise ScoreError("--offload-dir is for --stream disk")
    loaded = load(args.model, dtype=args.dtype, device=args.device, stream=args.stream or False,
                  offload_dir=args.offload_dir)
    if config.depth_ppl or config.block_ppl:
        import dataclasses

        from engine.arch import get_adapter

        k = min(args.depth_samples or default_depth_samples(args.samples, execution_device(loaded.model).type),
                args.samples)
        config = dataclasses.replace(config, depth_samples=k)
        print(_estimate(loaded, get_adapter(loaded.model).spec().to_dict(), args.seq_len, k, args.blocks,
                        args.block_ppl, args.depth_ppl, batch_size=config.batch_size), flush=True)
    bar, progress = _bar()
    try:
        scores, folder = score(loaded, source, args.samples, args.seq_len, seed=args.seed, config=config,
                               out_dir=args.out, progress=progress, force=args.force)
    finally:
        bar.close()
    for line in summary(scores, folder, scores.meta.get("reused", "none"), args.criterion):
        print(line)
    return 0
