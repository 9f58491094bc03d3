"""`prunescope resume DIR`: continue a cancelled, failed or killed job from its last checkpoint."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("resume", help="continue a cancelled / failed / killed run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--detach", action="store_true", help="resume as a background job")
    p.add_argument("--if-busy", choices=["queue", "refuse"], default="queue")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.jobs import execute
    from engine.runs import RunError, prepare_resume, resume, world

    if args.detach and world()[1] > 1:
        raise RunError("--detach cannot be combined with torchrun / accelerate launch: resume in the "
                       "foreground under the same launcher (every rank loads the last checkpoint)")
    if args.detach:
        pid = resume(args.run_dir, if_busy=args.if_busy)
        print(f"resumed {args.run_dir} in the background (pid {pid})")
        return 0
    run_ = prepare_resume(args.run_dir)
    state = execute(run_.path, if_busy=args.if_busy)
    print(f"{run_.path}: {state}")
    return 0 if state in ("done", "cancelled") else 1
