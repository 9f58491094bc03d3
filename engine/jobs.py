"""The one job system: every background task is a run folder of some kind, started the same way.

A job is a run folder (see engine.runs) whose config.json names its `kind`. `start_job(run_dir)`
(engine.runs) launches `python -m engine.jobs RUN_DIR` detached; that worker takes the device lock,
beats the heartbeat, runs the kind's work function and records the final state. Cancel, resume,
status and the device lock are the same for every kind.

A kind's work function has the signature `work(run: Run, should_stop: Callable[[], bool]) -> dict | None`;
it reports progress through `run.set_stage` / `run.progress_cb`, polls `should_stop()` and raises
`engine.errors.Cancelled` after a clean stop (or returns early). Kinds are listed here as
"module:function" strings so that reading a run folder never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from engine.errors import Cancelled, RunError
from engine.fileio import read_json

log = logging.getLogger(__name__)

JOB_KINDS: dict[str, str] = {
    "pipeline": "engine.pipeline:run_pipeline",  # score -> plan -> prune -> distill -> export
    "distill": "engine.pipeline:run_pipeline",  # distill an already-pruned student
    "score": "engine.score_job:run_score_job",  # importance scores for the dashboard
    "compare": "engine.compare:run_compare_job",  # teacher vs student: speed and answers
    "search": "engine.search:run_search_job",  # candidate shapes within a budget + tournament
}


def work_function(kind: str) -> Callable:
    """The work function of a job kind (imported on use)."""
    if kind not in JOB_KINDS:
        raise RunError(f"unknown job kind {kind!r}; known kinds: {', '.join(sorted(JOB_KINDS))}")
    module, name = JOB_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def execute(run_dir: str | Path, if_busy: str = "queue") -> str:
    """A job process's whole life: lock the device, heartbeat, run the kind's work, set the final state.

    Under torchrun (WORLD_SIZE > 1) rank 0 owns the status, the lock and the heartbeat; the other
    ranks run the same work on a read-only view of the folder (stop requests reach them by all-reduce)."""
    from engine.runs import QuietRun, Run, run_worker, world

    rank, n = world()
    run = Run.open(run_dir)
    cfg = run.config()
    work = work_function(cfg.get("kind", "pipeline"))
    if n > 1:
        from engine.runs import init_distributed

        init_distributed()
        if rank != 0:
            try:
                work(QuietRun(Path(run_dir)), lambda: False)
            except Cancelled:
                return "cancelled"
            return "done"

    def body(stop: threading.Event) -> None:
        work(run, lambda: stop.is_set() or run.cancel_requested())

    return run_worker(run, body, device=cfg.get("device", "auto"), if_busy=if_busy)


def main(argv: list[str] | None = None) -> int:
    """Entry of the detached worker: `python -m engine.jobs RUN_DIR [--if-busy queue|refuse]`."""
    p = argparse.ArgumentParser(prog="python -m engine.jobs")
    p.add_argument("run_dir")
    p.add_argument("--if-busy", default="queue", choices=["queue", "refuse"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log.info("job %s, config: %s", args.run_dir, json.dumps(read_json(Path(args.run_dir) / "config.json")))
    try:
        state = execute(args.run_dir, args.if_busy)
    except Exception:  # noqa: BLE001 - already recorded in status.json and the log
        return 1
    return 0 if state in ("done", "cancelled") else 1


if __name__ == "__main__":
    from engine.jobs import main as _main  # the package module, not this __main__ copy

    sys.exit(_main())
