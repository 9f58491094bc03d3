"""`prunescope cancel DIR`: stop a job cleanly (final checkpoint; `prunescope resume DIR` continues)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("cancel", help="stop a running or queued job cleanly (keeps a checkpoint)")
    p.add_argument("run_dir")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the job to stop (default 60)")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.runs import cancel

    state = cancel(args.run_dir, wait=args.wait)
    print(f"{args.run_dir}: {state}")
    return 0
