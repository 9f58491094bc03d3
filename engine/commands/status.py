"""`prunescope status DIR`: state, stage, progress and the last metrics of a run folder."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from engine.fileio import read_json

STATES = ("queued", "running", "done", "failed", "cancelled")
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
    from engine.runs import effective_state, pid_alive

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


def _safe(text: str) -> str:
    """Text that any terminal encoding can print (lone surrogates from damaged files escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def register(sub) -> None:
    p = sub.add_parser("status", help="show a run's state, stage, progress and last metrics")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print status.json (with `effective`) as JSON")
    p.set_defaults(func=run)


def _fmt(row: dict | None) -> str:
    if not row:
        return "-"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "eval")


def run(args) -> int:
    from engine.runs import Run

    r = Run.open(args.run_dir)
    st, problems = read_status(r.path)
    rows = r.metrics()
    last_train = next((x for x in reversed(rows) if not x.get("eval")), None)
    last_eval = next((x for x in reversed(rows) if x.get("eval")), None)
    if args.json:
        print(json.dumps({**st, "problems": problems, "last_train": last_train, "last_eval": last_eval},
                         indent=2, default=str))
        return 0
    state = st["effective"]
    if state == "stale":
        state = f"stale (was {st.get('state')}; process {st.get('pid')} is gone - `prunescope resume {args.run_dir}`)"
    lines = [f"run:      {r.path}", f"state:    {state}",
             f"stage:    {st.get('stage') or '-'} ({100 * (st.get('progress') or 0):.0f}%)  {st.get('message') or ''}"]
    done = [k for k, v in st["stages"].items() if v.get("state") == "done"]
    lines.append(f"done:     {', '.join(done) or '-'}")
    if st.get("pid"):
        hb = st.get("heartbeat")
        lines.append(f"pid:      {st['pid']}" + (f" (heartbeat {time.time() - hb:.0f}s ago)" if hb else ""))
    if st.get("error"):
        lines.append(f"error:    {st['error']}")
    lines += [f"damaged:  {p}" for p in problems]
    lines += [f"train:    {_fmt(last_train)}", f"eval:     {_fmt(last_eval)}"]
    for line in lines:
        print(_safe(line))
    return 0
