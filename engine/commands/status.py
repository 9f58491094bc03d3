"""`prunescope status DIR`: state, stage, progress and the last metrics of a run folder."""

from __future__ import annotations

import json
import time


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
    st = r.status()
    rows = r.metrics()
    last_train = next((x for x in reversed(rows) if not x.get("eval")), None)
    last_eval = next((x for x in reversed(rows) if x.get("eval")), None)
    if args.json:
        print(json.dumps({**st, "last_train": last_train, "last_eval": last_eval}, indent=2, default=str))
        return 0
    state = st.get("effective", "unknown")
    if state == "stale":
        state = f"stale (was {st.get('state')}; process {st.get('pid')} is gone - `prunescope resume {args.run_dir}`)"
    print(f"run:      {r.path}")
    print(f"state:    {state}")
    print(f"stage:    {st.get('stage') or '-'} ({100 * float(st.get('progress') or 0):.0f}%)  {st.get('message') or ''}")
    done = [k for k, v in (st.get('stages') or {}).items() if v.get("state") == "done"]
    print(f"done:     {', '.join(done) or '-'}")
    if st.get("pid"):
        hb = st.get("heartbeat")
        print(f"pid:      {st['pid']}" + (f" (heartbeat {time.time() - hb:.0f}s ago)" if hb else ""))
    if st.get("error"):
        print(f"error:    {st['error']}")
    print(f"train:    {_fmt(last_train)}")
    print(f"eval:     {_fmt(last_eval)}")
    return 0
