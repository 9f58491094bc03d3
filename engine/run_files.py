"""Tolerant reading of a run folder's status.json: every known field of the right type, and a list
of what was wrong, so that a damaged run reads as that run's error and never as an exception in a
page or a command. Torch-free."""

from __future__ import annotations

import math
import time
from pathlib import Path

from engine.fileio import read_json
from engine.procs import pid_alive

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
STALE_AFTER_S = 60.0
_TIMES = ("heartbeat", "updated", "created", "started", "finished")
_TEXTS = ("stage", "message", "error", "host")


def number(v) -> float | None:
    """A finite int/float (not a bool) as float, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def clean_status(raw) -> tuple[dict, list[str]]:
    """status.json content with every known field of the right type, and what was wrong with it.

    A reader of run folders calls this instead of trusting the file: a list, a string pid or a
    text heartbeat reads as a damaged run (problems listed), never as an exception. Unknown fields
    pass through unchanged; `effective` is computed from the cleaned fields."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        return {"state": "unknown", "stages": {}, "effective": "unknown"}, \
            ["status.json is missing, unreadable or not a JSON object"]
    st = dict(raw)
    if st.get("state") not in STATES:
        problems.append(f"status.json: state {st.get('state')!r} is not one of {', '.join(STATES)}")
        st["state"] = "unknown"
    pid = st.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
        problems.append(f"status.json: pid {pid!r} is not a process id")
        st["pid"] = None
    for key in _TIMES + ("progress",):
        if st.get(key) is not None and number(st[key]) is None:
            problems.append(f"status.json: {key} {st[key]!r} is not a number")
            st[key] = None
    if st.get("progress") is not None:
        st["progress"] = min(1.0, max(0.0, st["progress"]))
    for key in _TEXTS:
        if st.get(key) is not None and not isinstance(st[key], str):
            problems.append(f"status.json: {key} {st[key]!r} is not text")
            st[key] = str(st[key])
    stages = st.get("stages")
    if stages is not None and not isinstance(stages, dict):
        problems.append("status.json: stages is not an object")
        stages = {}
    st["stages"] = {str(k): v for k, v in (stages or {}).items() if isinstance(v, dict)}
    st["effective"] = effective_state(st)
    if problems and st["effective"] in ("queued", "running") and not pid_alive(st.get("pid")):
        st["effective"] = "stale"  # a damaged status whose worker cannot be found is not live
    return st, problems


def read_status(run_dir: str | Path) -> tuple[dict, list[str]]:
    """`clean_status` of a run folder's status.json."""
    return clean_status(read_json(Path(run_dir) / "status.json"))




def effective_state(status: dict) -> str:
    """status["state"], except "stale" for a queued/running job whose process is gone or silent."""
    state = status.get("state", "unknown")
    if state in ACTIVE:
        hb = number(status.get("heartbeat")) or number(status.get("updated")) or 0.0
        pid = status.get("pid") if isinstance(status.get("pid"), int) else None
        if not pid and time.time() - hb > STALE_AFTER_S:  # created, never started
            return "stale"
        if pid and not pid_alive(pid):
            return "stale"
        if pid and time.time() - hb > STALE_AFTER_S:
            return "stale"
    return state
