"""The command-line options that choose a text and cut it into token blocks, shared by `score` and
`eval`: one place for their names, defaults and help."""

from __future__ import annotations

import argparse

DATA_SOURCES = "a file (.txt/.raw/.jsonl/.parquet/.csv), hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] or generated[:N]"


def add_block_args(p: argparse.ArgumentParser, *, data_help: str, data_range: str, range_help: str,
                   role: str) -> None:
    """--data, --data-range, --text-column, --samples, --seq-len, --seed. `role` names what the blocks
    are for in the --samples help ("calibration", "evaluation")."""
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--data-range", default=data_range, metavar="START:END", help=range_help)
    p.add_argument("--text-column", default=None, help="text column for jsonl/parquet/csv/hf (default: text)")
    p.add_argument("--samples", type=int, default=32, help=f"{role} blocks (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--seed", type=int, default=0)
