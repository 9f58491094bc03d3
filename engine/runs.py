"""Run folders and detached jobs.

A run folder holds everything about one job:

    config.json     what to do (written once; `kind` is "pipeline" or "distill")
    status.json     state (queued / running / done / failed / cancelled), stage, progress, pid,
                    heartbeat, error; rewritten atomically (temp file + rename)
    metrics.jsonl   one JSON row per training step / evaluation, appended and flushed
    job.log         stdout / stderr of a detached worker
    scores/, plan.json, checkpoints/, model/, summary.json   (written by the pipeline)

A job runs as its own process (`start_job`), in a new session, so a dashboard rerun or restart does
not stop it. One job per device at a time: the worker holds an advisory lock (`flock`, released by
the kernel even on SIGKILL) under `$PRUNESCOPE_LOCKS` (default `<cache>/locks`); a second job waits
in state "queued" or is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.device_lock import ensure_device_free
from engine.errors import Cancelled, RunError, UserError  # noqa: F401  (re-exported)
from engine.fileio import (  # noqa: F401  (re-exported for readers of run folders)
    append_jsonl,
    atomic_write,
    atomic_write_text,
    read_json,
    read_jsonl,
    write_json,
)
from engine.procs import pid_alive  # noqa: F401  (re-exported)
from engine.run_files import ACTIVE, STALE_AFTER_S, STATES, clean_status, effective_state  # noqa: F401

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
CANCEL_FILE = "cancel.request"


def runs_root() -> Path:
    """Default root of run folders (absolute): $PRUNESCOPE_RUNS, else ./runs."""
    return Path(os.environ.get("PRUNESCOPE_RUNS") or "runs").expanduser().resolve()


# ---------------------------------------------------------------- the run folder


class Run:
    """One run folder. Status updates are merged in memory and written atomically (thread-safe)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._status: dict = read_json(self.status_file) or {}
        self._last_write = 0.0

    status_file = property(lambda self: self.path / "status.json")
    config_file = property(lambda self: self.path / "config.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    log_file = property(lambda self: self.path / "job.log")

    @classmethod
    def create(cls, path: str | Path, config: dict, force: bool = False) -> Run:
        """A new run folder holding `config`. An existing run is replaced only with `force` (and
        never while its job is live); a folder that is not a run is never written into or deleted."""
        path = Path(path)
        if path.exists():
            refuse_foreign_folder(path)
            if is_run_folder(path):
                st = read_json(path / "status.json") or {}
                if not force:
                    raise RunError(f"{path} already holds a run; resume it with `prunescope resume {path}`, "
                                   "replace it with --force, or choose another --run-dir")
                if is_live(st):
                    raise RunError(f"{path} has a live job (pid {st.get('pid')}); cancel it first")
                shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "config.json", config)
        run = cls(path)
        run.update(state="queued", stage=None, progress=0.0, message="created", error=None,
                   created=time.time(), stages={}, force=True)
        return run

    @classmethod
    def open(cls, path: str | Path) -> Run:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise RunError(f"{path} is not a run folder (no config.json)")
        return cls(path)

    def config(self) -> dict:
        cfg = read_json(self.config_file)
        if cfg is None:
            raise RunError(f"{self.config_file} is missing or unreadable")
        return cfg

    # -- status -------------------------------------------------------------
    def status(self) -> dict:
        """The status as on disk, cleaned (a damaged field reads as missing, listed in `problems`), with
        `effective` = state, or "stale" for a dead running job."""
        st, problems = clean_status(read_json(self.status_file) or {})
        if problems and read_json(self.status_file) is not None:
            st["problems"] = problems
        return st

    def update(self, force: bool = True, **fields) -> None:
        """Merge fields into status.json and write it atomically (throttled when force=False)."""
        with self._lock:
            self._status.update(fields)
            now = time.time()
            self._status["updated"] = now
            if force or now - self._last_write > 0.5:
                write_json(self.status_file, self._status)
                self._last_write = now

    def set_stage(self, stage: str, progress: float = 0.0, message: str = "", force: bool = True) -> None:
        stages = dict(self._status.get("stages") or {})
        entry = dict(stages.get(stage) or {"state": "running", "started": time.time()})
        entry.update(progress=round(float(progress), 4))
        stages[stage] = entry
        self.update(force=force, stage=stage, progress=round(float(progress), 4), message=message,
                    stages=stages)

    def finish_stage(self, stage: str, **info) -> None:
        stages = dict(self._status.get("stages") or {})
        entry = dict(stages.get(stage) or {"started": time.time()})
        entry.update(state="done", progress=1.0, seconds=round(time.time() - entry["started"], 2), **info)
        stages[stage] = entry
        self.update(stage=stage, progress=1.0, stages=stages)

    def stage_done(self, stage: str) -> bool:
        return (self._status.get("stages") or {}).get(stage, {}).get("state") == "done"

    def progress_cb(self, stage: str):
        """A `(fraction, message)` callback that reports into this stage (throttled writes)."""
        return lambda frac, msg="": self.set_stage(stage, frac, msg, force=False)

    # -- metrics ------------------------------------------------------------
    def log_metrics(self, row: dict) -> None:
        append_jsonl(self.metrics_file, row)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    # -- cancel -------------------------------------------------------------
    def cancel_requested(self) -> bool:
        return (self.path / CANCEL_FILE).exists()


RUN_MARKERS = ("config.json", "status.json")


def is_run_folder(path: str | Path) -> bool:
    """A folder prunescope recognises as its own run: config.json (an object with a job `kind`)
    and status.json (an object with a `state`)."""
    path = Path(path)
    cfg, st = read_json(path / "config.json"), read_json(path / "status.json")
    return cfg is not None and st is not None and isinstance(cfg.get("kind", "pipeline"), str) \
        and st.get("state") in STATES


def refuse_foreign_folder(path: Path) -> None:
    """RunError when `path` holds files but is not a run folder: prunescope writes into and deletes
    only its own folders. The message lists what is in it."""
    if not path.is_dir():
        raise RunError(f"{path} exists and is not a folder; choose another --run-dir")
    entries = sorted(p.name for p in path.iterdir())
    if entries and not is_run_folder(path):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise RunError(f"{path} is not a prunescope run folder (it holds {shown}); it is left untouched: "
                       "choose an empty or new --run-dir")


def is_live(status: dict) -> bool:
    """A worker process exists for this run (queued behind the lock, or running)."""
    return effective_state(status) in ACTIVE and pid_alive(status.get("pid"))


def job_status(run_dir: str | Path) -> dict | None:
    """A job's status as a page shows it, or None when there is no job there: `state` is the
    effective state, and a job whose process died reads as failed with a pointer to its log."""
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        return None
    st = Run(path).status()
    st["state"] = st["effective"]
    if st["state"] == "stale":
        st.update(state="failed", error=st.get("error") or
                  f"the job's process stopped unexpectedly; see {path / 'job.log'}")
    return st


def log_tail(run_dir: str | Path, lines: int = 15) -> str:
    """The last lines of a job's log (job.log), or ''."""
    try:
        text = (Path(run_dir) / "job.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def list_runs(root: str | Path | None = None) -> list[dict]:
    """Run folders under root (newest first): name, path, status (with `effective`), config, summary."""
    root = Path(root) if root else runs_root()
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        if d.is_dir() and (d / "config.json").is_file():
            run = Run(d)
            out.append({"name": d.name, "path": str(d), "status": run.status(),
                        "config": read_json(d / "config.json") or {},
                        "summary": read_json(d / "summary.json")})
    out.sort(key=lambda r: r["status"].get("created") or 0, reverse=True)
    return out


class QuietRun(Run):
    """A non-zero rank's view of the run folder: reads it, never writes status or metrics."""

    def update(self, force: bool = True, **fields) -> None:
        self._status.update(fields)

    def log_metrics(self, row: dict) -> None:
        pass


# ---------------------------------------------------------------- several processes (torchrun)


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless started by torchrun / accelerate launch."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Set up the process group and this rank's device (accelerate: NCCL on GPUs, gloo on CPU)."""
    import torch
    from accelerate import Accelerator

    Accelerator(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- controller side


def start_job(run_dir: str | Path, if_busy: str = "queue", device: str | None = None) -> int:
    """Launch the run folder's job as a detached process (own session, output to job.log); its pid.

    if_busy: "queue" (wait for the device) or "refuse" (raise RunError now if the device is busy)."""
    run = Run.open(run_dir)
    st = run.status()
    if is_live(st):
        raise RunError(f"{run.path} is already {st['effective']} (pid {st.get('pid')})")
    if if_busy not in ("queue", "refuse"):
        raise RunError(f"if_busy must be 'queue' or 'refuse', got {if_busy!r}")
    if if_busy == "refuse":
        try:
            ensure_device_free(device or run.config().get("device", "auto"))
        except RunError as e:  # nothing was started: the run says so instead of "queued" forever
            run.update(state="cancelled", message=f"not started: {e}", pid=None)
            raise
    with contextlib.suppress(OSError):
        (run.path / CANCEL_FILE).unlink()
    run.update(state="queued", message="starting", error=None, heartbeat=time.time())
    cmd = [sys.executable, "-m", "engine.jobs", str(run.path.resolve()), "--if-busy", if_busy]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(run.log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, close_fds=True)
    run.update(pid=proc.pid, heartbeat=time.time())
    log.info("started job %s (pid %d)", run.path, proc.pid)
    return proc.pid


def cancel(run_dir: str | Path, wait: float = 0.0) -> str:
    """Ask a job to stop cleanly (final checkpoint, state "cancelled"); returns the state after.

    Writes a cancel request and sends SIGTERM to the worker; a queued job stops waiting; a dead
    ("stale") job is marked cancelled directly. wait: seconds to wait for the worker to exit."""
    run = Run.open(run_dir)
    st = run.status()
    if st["effective"] not in ACTIVE + ("stale",):
        return st.get("state", "unknown")
    (run.path / CANCEL_FILE).write_text(str(time.time()))
    pid = st.get("pid")
    if st["effective"] == "stale" or not pid_alive(pid):
        run.update(state="cancelled", message="cancelled (the worker was no longer running)")
        return "cancelled"
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid), signal.SIGTERM)
    deadline = time.time() + wait
    while time.time() < deadline and pid_alive(pid):
        time.sleep(0.2)
    return run.status()["effective"]


def _resumable(run_dir: str | Path) -> Run:
    """The run at `run_dir`, or RunError if it is still active or already done."""
    run = Run.open(run_dir)
    st = run.status()
    if is_live(st):
        raise RunError(f"{run.path} is still {st['effective']} (pid {st.get('pid')}); nothing to resume")
    if st["effective"] == "done":
        raise RunError(f"{run.path} is already done")
    return run


def resume(run_dir: str | Path, if_busy: str = "queue") -> int:
    """Relaunch a cancelled / failed / stale job detached; it continues from its last checkpoint."""
    return start_job(_resumable(run_dir).path, if_busy=if_busy)


def prepare_resume(run_dir: str | Path) -> Run:
    """Checks for a foreground resume: the run exists and is not active or done."""
    run = _resumable(run_dir)
    with contextlib.suppress(OSError):
        (run.path / CANCEL_FILE).unlink()
    return run


# ---------------------------------------------------------------- checkpoints


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop rows past `step` (and any partial line): a resumed run rewrites them identically."""
    path = Path(path)
    if not path.exists():
        return
    rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in rows))
