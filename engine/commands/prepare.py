"""`prunescope prepare`: convert the built-in model once into the cache."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("prepare", help="convert the built-in model (GGUF) into the cache, once")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.models import builtin_model_dir

    path = builtin_model_dir()
    print(f"built-in model ready: {path}")
    return 0
