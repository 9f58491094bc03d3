"""The pruning-target options of the command line, shared by `prune`, `run` and `search`: one
parser, one conversion to `Targets`, validated before anything slow starts."""

from __future__ import annotations

import argparse

from engine.errors import PlanError
from engine.importance.scores import CRITERIA, CRITERION_HELP, DEFAULT_CRITERION
from engine.targets import DEFAULT_REFIT, DEPTH_METHODS, REFIT_HELP, Targets

DEPTH_HELP = ("which layers go: lowest block importance (bi), lowest perplexity increase (ppl), the best "
              "contiguous block (block), lowest Taylor+ (taylor), or the listed ones (list, with --drop-layers)")


def add_target_args(p: argparse.ArgumentParser, preset: bool = False) -> None:
    """--hidden/--ffn/--heads/--layers/--experts, --depth-by, --drop-layers, --criterion, --refit, --merge-heads
    (and --preset)."""
    t = p.add_argument_group("pruning targets (omitted: keep that axis)")
    t.add_argument("--hidden", type=int, default=None, help="target hidden size (embedding channels)")
    t.add_argument("--ffn", type=int, default=None, help="target MLP intermediate size")
    t.add_argument("--heads", type=int, default=None, help="target query heads (a multiple of the KV heads)")
    t.add_argument("--layers", type=int, default=None, help="target number of layers")
    t.add_argument("--experts", type=int, default=None,
                   help="mixtures of experts: experts kept per layer, the same in every layer (the router's "
                        "top-k is clamped to it); --ffn then sets each expert's width")
    if preset:
        t.add_argument("--preset", default=None, metavar="AXIS-PCT",
                       help="targets near PCT%% of the parameters, e.g. width-75, depth-75, mlp-75, all-50")
    t.add_argument("--depth-by", default="bi", choices=[m for m in DEPTH_METHODS], help=DEPTH_HELP)
    t.add_argument("--drop-layers", default=None, metavar="I,J,...",
                   help="source layer indices to drop (implies --depth-by list)")
    t.add_argument("--criterion", default=DEFAULT_CRITERION, choices=list(CRITERIA),
                   help="how heads, neurons and channels are ranked: " + "; ".join(
                       f"{k}: {v}" for k, v in CRITERION_HELP.items()) + f" (default {DEFAULT_CRITERION})")
    t.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help=REFIT_HELP + f" (default {'on' if DEFAULT_REFIT else 'off'})")
    t.add_argument("--merge-heads", action="store_true",
                   help="residual merge of pruned query heads (Minitron); hurt SmolLM2-135M, see docs/BENCHMARKS.md")


def parse_layer_list(text: str) -> tuple[int, ...]:
    """'3,4,5' -> (3, 4, 5); PlanError naming the expected form otherwise."""
    try:
        return tuple(sorted({int(x) for x in text.replace(" ", "").split(",") if x}))
    except ValueError:
        raise PlanError(f"--drop-layers takes comma-separated layer indices, e.g. 3,4,5; got {text!r}") from None


def targets_from_args(args: argparse.Namespace, base: Targets | None = None) -> Targets:
    """The Targets the options ask for (axes not given come from `base`, e.g. a preset)."""
    base = base or Targets()
    drop = parse_layer_list(args.drop_layers) if args.drop_layers is not None else None

    def pick(name: str):
        value = getattr(args, name, None)
        return value if value is not None else getattr(base, name)

    return Targets(hidden=pick("hidden"), ffn=pick("ffn"), heads=pick("heads"), layers=pick("layers"),
                   experts=pick("experts"),
                   depth_by="list" if drop is not None else args.depth_by, drop_layers=drop,
                   merge_heads=bool(args.merge_heads), refit=_refit(args, base),
                   criterion=getattr(args, "criterion", None) or base.criterion)


def _refit(args: argparse.Namespace, base: Targets) -> bool:
    """--refit / --no-refit when given, else a preset's choice, else the default."""
    given = getattr(args, "refit", None)
    return given if given is not None else (base.refit or DEFAULT_REFIT)


def validate_for_model(targets: Targets, model: str) -> None:
    """Check targets against the model's architecture (read without weights) before a job starts."""
    from engine.models import read_arch_spec
    from engine.targets import validate_targets

    validate_targets(read_arch_spec(model), targets)
