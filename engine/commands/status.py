"""`prunescope status DIR`: state, stage, progress and the last metrics of a run folder."""

from __future__ import annotations

import json
import time

from engine.run_files import read_status


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
