"""`prunescope` command line. Each subcommand lives in `engine/commands/<name>.py` and exposes
`register(subparsers)`; its handler returns an exit code. Errors the user can fix are printed as
one clear line (no stack trace); `--debug` shows the trace."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import engine
import engine.commands
from engine.errors import UserError

log = logging.getLogger("prunescope")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunescope", description="Minitron-style pruning and distillation of LLMs: score, plan, prune, distill, export.")
    parser.add_argument("--version", action="version", version=f"prunescope {engine.__version__}")
    parser.add_argument("--debug", action="store_true", help="show stack traces and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(engine.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"engine.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        print(f"prunescope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
