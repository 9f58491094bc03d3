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
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from engine.device_lock import DeviceLock, device_key
from engine.errors import Cancelled, RunError, UserError
from engine.fileio import is_disk_full, read_json, remove_stale_temps
from engine.runs import CANCEL_FILE, HEARTBEAT_S, QuietRun, Run, init_distributed, world

log = logging.getLogger(__name__)

JOB_KINDS: dict[str, str] = {
    "pipeline": "engine.pipeline:run_pipeline",  # score -> plan -> prune -> distill -> export
    "distill": "engine.pipeline:run_pipeline",  # distill an already-pruned student
    "score": "engine.score_job:run_score_job",  # importance scores for the dashboard
    "compare": "engine.compare:run_compare_job",  # teacher vs student: speed and answers
    "search": "engine.search:run_search_job",
    "falloff": "engine.falloff_job:run_falloff_job",  # importance fall-off curves of one layer  # candidate shapes within a budget + tournament
    "preview": "engine.search:run_preview_job",  # one-shot KL / ppl of one set of targets
}


def work_function(kind: str) -> Callable:
    """The work function of a job kind (imported on use)."""
    if kind not in JOB_KINDS:
        raise RunError(f"unknown job kind {kind!r}; known kinds: {', '.join(sorted(JOB_KINDS))}")
    module, name = JOB_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------- the job process's life


def _wait_for_device(lock: DeviceLock, run: Run, stop: threading.Event, if_busy: str) -> None:
    """Take the device lock; queue (visibly: status message + waiting file) or refuse when busy."""
    if lock.try_acquire(run.path):
        return
    if if_busy != "queue":
        raise RunError(lock.busy_message())
    lock.wait_here(run.path)
    log.info("waiting for device %s: %s", lock.key, lock.busy_message())
    last = ""
    while not lock.try_acquire(run.path):
        if stop.is_set() or run.cancel_requested():
            raise Cancelled()
        msg = f"waiting for device {lock.key}: {lock.busy_message()}"
        if msg != last:  # the holder's stage and progress, refreshed
            run.update(state="queued", message=msg, waiting_for=lock.holder())
            last = msg
        time.sleep(1.0)
    run.update(waiting_for=None)


def failure_message(e: BaseException) -> str:
    """The one line a failed job shows: a user error's own message, a full disk in plain words."""
    if isinstance(e, UserError):
        return str(e)
    if is_disk_full(e):
        return f"no space left on the device holding the run folder ({type(e).__name__})"
    return f"{type(e).__name__}: {e}"


def run_worker(run: Run, work: Callable[[threading.Event], None], device: str = "auto",
               if_busy: str = "queue") -> str:
    """Everything a job process does around its work: pid + heartbeat, temporary files of dead
    writers removed, device lock (queue/refuse), SIGTERM/SIGINT -> stop event, final state
    (done / cancelled / failed + a one-line error).

    `work(stop)` must poll `stop.is_set() or run.cancel_requested()` and return early (after a
    final checkpoint) or raise `Cancelled`. Returns the final state; errors are re-raised."""
    stop, alive = threading.Event(), threading.Event()
    run.update(pid=os.getpid(), heartbeat=time.time(), error=None, host=os.uname().nodename)
    for p in remove_stale_temps(run.path):
        log.info("removed %s (left by a writer that died)", p)

    def beat() -> None:
        while not alive.wait(HEARTBEAT_S):
            run.update(heartbeat=time.time())

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda *_: stop.set())
    lock = DeviceLock(device_key(device))
    try:
        _wait_for_device(lock, run, stop, if_busy)
        run.update(state="running", started=run.status().get("started") or time.time(), message="running")
        work(stop)
        if stop.is_set() or run.cancel_requested():
            raise Cancelled()
        run.update(state="done", progress=1.0, message="done", finished=time.time())
    except Cancelled:
        run.update(state="cancelled", message="cancelled (checkpoint kept; resume continues from it)",
                   finished=time.time())
    except BaseException as e:
        (log.error if isinstance(e, UserError) else log.exception)("job failed: %s", e)
        run.update(state="failed", error=failure_message(e), message="failed", finished=time.time())
        raise
    finally:
        alive.set()
        lock.release()
        with contextlib.suppress(OSError):
            (run.path / CANCEL_FILE).unlink()
        for sig, h in old.items():
            signal.signal(sig, h)
    return run.status()["state"]


def execute(run_dir: str | Path, if_busy: str = "queue") -> str:
    """A job process's whole life: lock the device, heartbeat, run the kind's work, set the final state.

    Under torchrun (WORLD_SIZE > 1) rank 0 owns the status, the lock and the heartbeat; the other
    ranks run the same work on a read-only view of the folder (stop requests reach them by all-reduce)."""

    rank, n = world()
    run = Run.open(run_dir)
    cfg = run.config()
    work = work_function(cfg.get("kind", "pipeline"))
    if n > 1:
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


def run_or_detach(path: Path, detach: bool, if_busy: str = "queue") -> str:
    """What the CLI does with a new run folder: start it detached (its state is then "started") or
    run it here; one line says where it is and how to follow or stop it."""
    from engine.runs import start_job

    if detach:
        pid = start_job(path, if_busy=if_busy)
        kind = (read_json(path / "config.json") or {}).get("kind", "pipeline")
        print(f"started {kind} job in {path} (pid {pid}); follow it with `prunescope status {path}`, "
              f"stop it with `prunescope cancel {path}`")
        return "started"
    state = execute(path, if_busy=if_busy)
    print(f"{path}: {state}")
    return state


def exit_code(state: str) -> int:
    """0 when a job ended done, cancelled or was started in the background; 1 otherwise."""
    return 0 if state in ("done", "cancelled", "started") else 1


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
