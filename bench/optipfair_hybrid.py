"""OptiPFair's hybrid MLP pruning as a row of the quality benchmark's importance-criteria table.

OptiPFair (https://pypi.org/project/optipfair/) ranks a GLU neuron pair by its gate / up / down weight
ranges times the L2 norm of its activation on calibration data ("MAW" with a dataloader: its hybrid,
CFSP-style). This script prunes the built-in model's MLP to the width_mlp shape of bench/quality.py
(1536 -> 888 neurons on SmolLM2-135M) with it, on the same calibration blocks, evaluates it on the same
held-out blocks, distils it with the same budget (unless --no-distill), and adds the row to
docs/quality/quality[_quick].json (replacing an earlier OptiPFair row), then rewrites the report.

OptiPFair is never a dependency of prunescope: with --install it is pip-installed with --no-deps into a
temporary folder put first on sys.path for this process only (its own dependencies, torch,
transformers, tqdm, click and numpy, are already in the project's environment); without --install it
must already be importable.

    .venv/bin/python bench/optipfair_hybrid.py --install --quick     # one-shot + short distillation
    .venv/bin/python bench/optipfair_hybrid.py --install --tokens 98304
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import quality
from common import OUT_DIR, WIKITEXT, describe_targets

VERSION = "0.4.2"  # the release measured


def install(version: str, target: Path) -> None:
    """pip install optipfair==version --no-deps into `target`, put first on sys.path."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
           f"optipfair=={version}"]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(target))


def optipfair_prune(model, ffn: int, calib, batch_size: int = 4):
    """A pruned deep copy of `model` with `ffn` MLP neurons per layer chosen by OptiPFair's hybrid."""
    import copy

    from optipfair import prune_model

    source = int(model.config.intermediate_size)
    # OptiPFair prunes int(pct / 100 * source) pairs: aim half a neuron past the count so rounding lands on it
    pct = 100 * (source - ffn + 0.5) / source
    loader = [{"input_ids": calib[k:k + batch_size]} for k in range(0, calib.shape[0], batch_size)]
    pruned = prune_model(model=copy.deepcopy(model), pruning_type="MLP_GLU", neuron_selection_method="MAW",
                         pruning_percentage=pct, dataloader=loader, show_progress=False)
    got = int(pruned.config.intermediate_size)
    if got != ffn:
        raise SystemExit(f"OptiPFair kept {got} neurons per layer, not {ffn}")
    return pruned.float().eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--install", action="store_true",
                   help=f"pip install optipfair=={VERSION} --no-deps into a temporary folder for this run")
    p.add_argument("--version", default=VERSION, help="the OptiPFair release to install")
    p.add_argument("--quick", action="store_true", help="bench/quality.py's --quick sizes and file")
    p.add_argument("--tokens", type=int, default=None, help="distillation tokens (default: the quality JSON's)")
    p.add_argument("--no-distill", action="store_true", help="one-shot only")
    p.add_argument("--wikitext", type=Path, default=WIKITEXT)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="compute dtype (default fp32; must match the quality JSON's rows)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prunescope-optipfair-") as tmp:
        if args.install:
            install(args.version, Path(tmp))
        try:
            import optipfair  # noqa: F401
        except ImportError:
            raise SystemExit("OptiPFair is not importable: run with --install (it goes into a temporary "
                             "folder, never into the project's environment)") from None
        with quality.compute_dtype(args.dtype):
            return _run(args)


def _run(args: argparse.Namespace) -> int:
    settings = dict(quality.QUICK if args.quick else quality.FULL, dtype=args.dtype)
    stem = "quality_quick" if args.quick else "quality"
    old, pinned = quality.open_results(args.out, stem, args.tokens, args.dtype)
    qargs = argparse.Namespace(wikitext=args.wikitext, out=args.out, save_students=None)
    b = quality.Bench(qargs, settings)
    shape = b.strategies["width_mlp"]
    tokens = args.tokens or pinned or settings["tokens"]
    if not args.no_distill and not tokens:
        raise SystemExit(f"no token budget: give --tokens, or run bench/quality.py first ({args.out / stem}.json "
                         "has none)")
    b.tokens = tokens
    if not args.no_distill:
        b.train = quality.train_blocks(b.loaded.tokenizer, args.wikitext, b.tokens, settings["seq_len"])
    ffn = shape.targets.ffn
    label = f"OptiPFair {args.version} hybrid (MAW x activations)"
    e = quality.Experiment(f"optipfair_hybrid_{shape.name}", "criterion", label, shape.targets,
                           lambda: optipfair_prune(b.teacher, ffn, b.calib()), not args.no_distill)
    row = quality.run_one(b, e)
    row.update(shape_of=shape.name, optipfair_version=args.version, shape=describe_targets(b.spec, shape.targets))
    print(f"{label}: {row['params'] / 1e6:.2f}M ({100 * row['fraction']:.1f}%), one-shot ppl {row['ppl_oneshot']:.2f} "
          f"KL {row['kl_oneshot']:.3f}" + (f", distilled ppl {row['ppl_distilled']:.2f} KL {row['kl_distilled']:.3f}"
                                           if row["ppl_distilled"] is not None else ""), flush=True)
    quality.add_row(args.out, stem, old, row, "bench/optipfair_hybrid.py " + " ".join(sys.argv[1:]), settings, b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
