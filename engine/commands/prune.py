"""`prunescope prune`: plan from a scores file, prune the model, export a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from engine.target_args import add_target_args, targets_from_args


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to target widths/depth and export it",
                       description="Make a plan (kept heads, neurons, channels, layers) from a scores file, "
                                   "trim the weights into a smaller model of the same architecture and export "
                                   "it as a Hugging Face folder. Sizes left out keep the source size.")
    p.add_argument("--scores", default=None, metavar="DIR", help="scores folder from `prunescope score`")
    p.add_argument("--model", default=None,
                   help="model the scores were computed on (default: the one named in the scores)")
    add_target_args(p, preset=True)
    p.add_argument("--iterations", type=int, default=1, help="prune in T steps, rescoring between steps")
    p.add_argument("--data", default=None, help="calibration data for rescoring (default: the scores' data)")
    p.add_argument("--samples", type=int, default=None, help="calibration blocks for rescoring")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration block")
    p.add_argument("--plan", default=None, metavar="PLAN.json", help="apply this (edited) plan exactly")
    p.add_argument("--plan-only", action="store_true", help="write OUT/plan.json and stop")
    p.add_argument("--dtype", default=None,
                   help="auto, fp32, bf16, fp16: the dtype to load, prune and export in (default: the dtype the "
                        "source checkpoint stores, which the export keeps)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite a different model or plan in --out")
    p.set_defaults(func=run)


def _targets(args, spec):
    from engine.presets import preset_targets

    return targets_from_args(args, preset_targets(spec, args.preset) if args.preset else None)


def _write_plan(plan, out: Path, force: bool, dry_run: bool = False) -> Path:
    """Write OUT/plan.json, refusing to replace a different plan there without --force."""
    from engine.errors import PlanError
    from engine.plan import Plan

    path = out / "plan.json"
    if path.exists() and not force:
        try:
            applied = lambda p: {k: v for k, v in p.to_dict().items() if k != "info"}  # noqa: E731 - info is not applied
            same = applied(Plan.load(path)) == applied(plan)
        except PlanError:
            same = False
        if not same:
            raise PlanError(f"{path} already holds a different plan; use --force to overwrite it, or --plan "
                            f"{path} to apply it")
    return path if dry_run else plan.save(path)


def _model_spec(args, meta: dict) -> str:
    from engine.models import BUILTIN_NAME

    if args.model:
        return args.model
    name = meta.get("model") or "default"
    return "default" if name == BUILTIN_NAME else name


def _blocks(args, loaded, meta: dict):
    """Calibration blocks for rescoring and refit: the scores' own unless --data / --samples / --seq-len say
    otherwise."""
    from engine.data import DataSource, get_blocks
    from engine.errors import PlanError
    from engine.importance.scoring import calibration_of

    if args.data:
        source, n, t, seed = DataSource.parse(args.data), 32, 256, int(meta.get("seed", 0) or 0)
    elif isinstance(meta.get("data_source"), dict):
        source, n, t, seed = calibration_of(meta)
    else:
        raise PlanError("--iterations and --refit need calibration data (the scores do not record theirs): give --data")
    n, t = args.samples or meta.get("n_samples") or n, args.seq_len or meta.get("seq_len") or t
    return get_blocks(source, loaded.tokenizer, int(n), int(t), seed, model=loaded.model)


def run(args) -> int:
    from engine.errors import PlanError
    from engine.importance import Scores
    from engine.plan import Plan, make_plan

    out = Path(args.out).expanduser()
    scores = Scores.load(args.scores) if args.scores else None
    if args.plan:
        plan = Plan.load(args.plan)
        if any(getattr(args, k) is not None for k in ("hidden", "ffn", "heads", "layers", "preset", "drop_layers")):
            raise PlanError("--plan is applied exactly as written; drop --hidden/--ffn/--heads/--layers/--preset")
        if args.iterations > 1:
            raise PlanError("--plan and --iterations do not combine: a plan is one step")
    elif scores is None:
        raise PlanError("give --scores DIR (from `prunescope score`) or --plan PLAN.json")
    else:
        from engine.arch.base import ArchSpec

        if "arch" not in scores.meta:
            raise PlanError(f"{args.scores} has no 'arch' metadata; rescore with this version of prunescope")
        plan = make_plan(scores, _targets(args, ArchSpec.from_dict(scores.meta["arch"])))
    est = plan.estimate()
    if args.plan_only:
        path = _write_plan(plan, out, args.force)
        print(f"plan: {path}")
        print(f"estimate: {est.params:,} parameters ({100 * est.fraction_of_source:.1f}% of {est.source_params:,}), "
              f"{est.memory_bytes_bf16 / 2**20:.1f} MiB in bf16")
        if plan.spec.is_moe:
            print(_active_line(plan.spec, plan))
        return 0
    return _prune(args, plan, scores, out)


def _prune(args, plan, scores, out: Path) -> int:
    from tqdm import tqdm

    from engine.errors import PlanError
    from engine.export import export_model
    from engine.models import count_parameters, fingerprint, load
    from engine.prune import apply_plan, prune_iteratively

    meta = scores.meta if scores is not None else {}
    own_plan = args.plan is not None and Path(args.plan).resolve() == (out / "plan.json").resolve()
    if args.iterations <= 1 and not own_plan:
        _write_plan(plan, out, args.force, dry_run=True)  # fail before the slow part
    spec = _model_spec(args, meta or {"model": plan.model})
    loaded = load(spec, dtype=args.dtype or "source", device=args.device)  # the identity check ignores dtype
    want = meta.get("fingerprint") or plan.fingerprint
    if want and fingerprint(loaded.model) != want:
        raise PlanError(f"the {'scores' if scores is not None else 'plan'} came from another model than {spec!r} "
                        f"(fingerprint {want}, this model {fingerprint(loaded.model)}); give the right --model or "
                        "rescore this one")
    source_params = count_parameters(loaded.model)
    if args.iterations > 1:
        blocks = _blocks(args, loaded, meta)
        bar = tqdm(total=1000, desc="pruning")

        def progress(frac: float, message: str) -> None:
            bar.update(max(0, int(frac * 1000) - bar.n))
            bar.set_description_str(message, refresh=False)

        try:
            pruned, plans = prune_iteratively(loaded.model, blocks, plan.targets, args.iterations, progress=progress)
        finally:
            bar.close()
        final = plans[-1] if plans else plan
    else:
        pruned = apply_plan(loaded.model, plan, check_fingerprint=False)
        if plan.targets.refit:
            plan = _refit(loaded.model, pruned, plan, _blocks(args, loaded, meta))
        plans, final = [plan], plan
    path = export_model(pruned, loaded.tokenizer, out, plan=final, scores_meta=meta, source_name=loaded.name,
                        force=args.force, params_source=source_params)
    if args.iterations > 1:
        for k, p in enumerate(plans, 1):  # each step's plan, in the numbering of the model it pruned
            p.save(out / f"plan-step{k}.json")
    elif not own_plan:
        _write_plan(plan, out, force=True)
    n = count_parameters(pruned)
    print(f"pruned model: {path}")
    print(f"parameters: {source_params:,} -> {n:,} ({100 * n / source_params:.1f}%)")
    if plan.spec.is_moe:
        print(_active_line(plan.spec, final))
    return 0


def _refit(teacher, student, plan, blocks):
    """Refit `student` in place (with a progress bar); the plan with what the refit measured."""
    from tqdm import tqdm

    from engine.refit import refit, refit_summary

    with tqdm(total=1000, desc="refit") as bar:
        def progress(frac: float, message: str) -> None:
            bar.update(max(0, int(frac * 1000) - bar.n))
            bar.set_description_str(message, refresh=False)

        summary = refit_summary(refit(teacher, student, plan, blocks, progress=progress))
    if summary["modules"]:
        print(f"refit: {', '.join(summary['modules'])} of {summary['layers']} layers, relative reconstruction error "
              f"{summary['error_before']:.4f} -> {summary['error_after']:.4f} ({summary['seconds']:.0f} s)")
    else:
        print("refit: no layer lost input units (depth pruning alone): nothing to refit")
    return plan.with_info(refit=summary)


def _active_line(spec, plan) -> str:
    """A mixture of experts' parameters per token (all but the experts the router skips)."""
    from engine.estimate import estimate
    from engine.targets import Targets

    a, b = estimate(spec, Targets()).active_params, plan.estimate().active_params
    return f"active parameters per token: {a:,} -> {b:,} ({100 * b / a:.1f}%)"
