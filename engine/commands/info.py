"""`prunescope info MODEL`: architecture summary of a model."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show a model's architecture (layers, heads, widths, parameters)")
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.models import describe, load

    info = describe(load(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>20}: {v}")
    return 0
