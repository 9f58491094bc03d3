"""Fault injection: SIGKILL a detached prune + distill job at random moments, resume it until it is
done, and compare its files with an uninterrupted run of the same config.

    python bench/faults.py --runs 5 [--kills 2] [--steps 60] [--seed 0] [--json out.json] [--keep DIR]

Each run folder is a tiny random Llama (saved with save_pretrained) pruned and distilled from itself
on a small corpus, launched with `engine.runs.start_job` as the dashboard and `prunescope run
--detach` do. The worker's process is SIGKILLed after a random delay (up to --kills times per run),
then `engine.runs.resume` relaunches it. Reported per run and in total:

- kills and resumes;
- metric rows that differ from the uninterrupted run: a row missing, extra or repeated, or a
  number other than the measurements (`*_s`, `*seconds*`, `*memory*`) not equal within 1e-6 relative (the count
  of bit-identical rows is reported too) - must be 0;
- summary.json numbers that differ (measurements excluded) - must be 0;
- torn lines in metrics.jsonl (a line that is not a JSON object, or a last line without its
  newline) - must be 0;
- leftover temporary files (`.tmp-*` anywhere in the run folder) - must be 0;
- the final state (must be "done").

Whatever checkpoint format the engine writes is fine: only the run folder's files are inspected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WORDS = ("the quick brown fox jumps over lazy dog pruning removes heads neurons and layers distillation "
         "teaches small model from large one Paris is capital of France water boils at hundred degrees").split()
TIMING = ("elapsed_s", "tokens_per_s", "seconds", "eval_s")
REL_TOL = 1e-6


def corpus(path: Path, seed: int = 0) -> Path:
    """40 WikiText-style articles of random sentences."""
    rng = random.Random(seed)
    arts = []
    for a in range(40):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                 for _ in range(30)]
        arts.append(f" = Article {a} = \n\n {' '.join(sents)} \n")
    path.write_text("\n".join(arts))
    return path


def make_config(model: Path, data: Path, steps: int):
    from engine.distill import DistillConfig
    from engine.pipeline import PipelineConfig

    return PipelineConfig(model=str(model), data=str(data), calib_samples=8, calib_seq_len=32,
                          targets={"ffn": 24, "layers": 3}, eval_samples=4,
                          distill=DistillConfig(steps=steps, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2,
                                                eval_every=max(1, steps // 3), checkpoint_every=max(1, steps // 6),
                                                eval_samples=4, eval_batch_size=4))


def status(run_dir: Path) -> dict:
    from engine.runs import Run

    return Run(run_dir).status()


def wait_exit(pid: int, timeout: float = 30.0) -> None:
    from engine.runs import pid_alive

    deadline = time.time() + timeout
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)


def wait_done(run_dir: Path, timeout: float) -> dict:
    """Poll until the job is no longer active; its status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = status(run_dir)
        if st["effective"] not in ("queued", "running"):
            return st
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} still {status(run_dir)['effective']} after {timeout:.0f}s")


def run_to_end(run_dir: Path, rng: random.Random | None, kills: int, window: float, timeout: float) -> dict:
    """Start the job; SIGKILL it after a random delay up to `kills` times, resuming after each kill,
    then let it finish. Returns {"kills", "resumes", "kill_at" (seconds after each start), "state"}."""
    from engine.runs import pid_alive, resume, start_job

    start_job(run_dir)
    out = {"kills": 0, "resumes": 0, "kill_at": [], "stages_at_kill": []}
    while True:
        if rng is not None and out["kills"] < kills:
            delay = rng.uniform(0.5, window)
            t0 = time.time()
            while time.time() - t0 < delay and status(run_dir)["effective"] in ("queued", "running"):
                time.sleep(0.05)
            st = status(run_dir)
            pid = st.get("pid")
            if st["effective"] in ("queued", "running") and pid and pid_alive(pid):
                os.kill(int(pid), signal.SIGKILL)
                wait_exit(int(pid))
                out["kills"] += 1
                out["kill_at"].append(round(delay, 2))
                out["stages_at_kill"].append(f"{st.get('stage')}@{st.get('progress')}")
                resume(run_dir)
                out["resumes"] += 1
                continue
        st = wait_done(run_dir, timeout)
        if st["effective"] == "stale":  # died on its own (not by us): a failure of the engine
            out["state"] = "stale"
            return out
        out["state"] = st["effective"]
        return out


# ---------------------------------------------------------------- comparing files


def torn_lines(path: Path) -> int:
    """Lines of a JSONL file that are not JSON objects, plus a last line without its newline."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    bad = 0 if not data or data.endswith(b"\n") else 1
    for raw in data.splitlines():
        try:
            ok = isinstance(json.loads(raw.decode("utf-8")), dict)
        except ValueError:
            ok = False
        bad += not ok
    return bad


def _rows(path: Path) -> dict[tuple, list[dict]]:
    from engine.fileio import read_jsonl

    out: dict[tuple, list[dict]] = {}
    for r in read_jsonl(path):
        out.setdefault((bool(r.get("eval")), r.get("step")), []).append(r)
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        if math.isnan(a) and math.isnan(b):
            return True
        return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b))
    return a == b


def _timing(key: str) -> bool:
    """Measurements of the machine, not results: timings and peak memory."""
    return key in TIMING or key.endswith("_s") or "seconds" in key or "memory" in key


def _values(row: dict) -> dict:
    return {k: v for k, v in row.items() if not _timing(k)}


def compare_metrics(ref: Path, got: Path) -> dict:
    """Rows that differ (missing, extra, repeated or with other numbers) and rows bit-identical."""
    a, b = _rows(ref), _rows(got)
    differ, identical, examples = 0, 0, []
    for key in sorted(set(a) | set(b), key=lambda k: (k[0], k[1] if isinstance(k[1], int) else -1)):
        ra, rb = a.get(key, []), b.get(key, [])
        if len(ra) != 1 or len(rb) != 1:
            differ += max(len(ra), len(rb), 1)
            examples.append(f"{'eval' if key[0] else 'train'} step {key[1]}: {len(ra)} row(s) vs {len(rb)}")
            continue
        va, vb = _values(ra[0]), _values(rb[0])
        if va.keys() != vb.keys() or not all(_same(va[k], vb[k]) for k in va):
            differ += 1
            diffs = {k: (va.get(k), vb.get(k)) for k in va.keys() | vb.keys() if not _same(va.get(k), vb.get(k))}
            examples.append(f"{'eval' if key[0] else 'train'} step {key[1]}: {diffs}")
        elif va == vb:
            identical += 1
    return {"rows": sum(len(v) for v in a.values()), "differ": differ, "identical": identical,
            "examples": examples[:5]}


def compare_summary(ref: Path, got: Path) -> list[str]:
    from engine.fileio import read_json

    a, b = read_json(ref) or {}, read_json(got) or {}
    keys = {k for k in a.keys() | b.keys() if not _timing(k) and "dir" not in k
            and "path" not in k and k not in ("run", "created", "finished", "started")}
    return sorted(k for k in keys if not _same(a.get(k), b.get(k)))


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".tmp-*"))


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="interrupted runs (default 5)")
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs per run at most (default 2)")
    p.add_argument("--steps", type=int, default=60, help="distillation steps of each run (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take after its last kill")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the run folders here (default: a temp folder)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: thread sync costs more than it saves
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="prunescope-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    os.environ["PRUNESCOPE_LOCKS"] = str(base / "locks")
    from tiny_models import save_tiny

    from engine.pipeline import create_run

    model = save_tiny("llama", base / "tiny-llama")
    cfg = make_config(model, corpus(base / "corpus.txt"), args.steps)

    def fresh(name: str) -> Path:
        os.environ["PRUNESCOPE_CACHE"] = str(base / f"cache-{name}")  # no scores reused between runs
        return create_run(base / name, cfg).path

    t0 = time.time()
    ref = fresh("reference")
    ref_out = run_to_end(ref, None, 0, 0.0, args.timeout)
    ref_s = time.time() - t0
    print(f"uninterrupted run: {ref_out['state']} in {ref_s:.1f}s", flush=True)
    if ref_out["state"] != "done":
        print((ref / "job.log").read_text()[-3000:])
        return 1
    rng = random.Random(args.seed)
    report = {"command": "python bench/faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "reference_s": round(ref_s, 1), "runs": []}
    for i in range(args.runs):
        run_dir = fresh(f"run-{i}")
        out = run_to_end(run_dir, rng, args.kills, ref_s, args.timeout)
        m = compare_metrics(ref / "metrics.jsonl", run_dir / "metrics.jsonl")
        row = {**out, "metric_rows": m["rows"], "rows_differ": m["differ"], "rows_identical": m["identical"],
               "summary_differ": compare_summary(ref / "summary.json", run_dir / "summary.json"),
               "torn_lines": torn_lines(run_dir / "metrics.jsonl"), "leftover_tmp": leftovers(run_dir),
               "examples": m["examples"]}
        report["runs"].append(row)
        print(f"run {i}: {row['state']}, {row['kills']} kill(s) at {row['kill_at']}s ({row['stages_at_kill']}), "
              f"{row['resumes']} resume(s); rows {row['metric_rows']}: {row['rows_differ']} differ, "
              f"{row['rows_identical']} bit-identical; summary differs in {row['summary_differ'] or 'nothing'}; "
              f"torn lines {row['torn_lines']}; leftover temp files {len(row['leftover_tmp'])}", flush=True)
        for e in row["examples"]:
            print(f"    {e}")
    runs = report["runs"]
    total = {k: sum(r[k] for r in runs) for k in ("kills", "resumes", "rows_differ", "rows_identical", "torn_lines",
                                                 "metric_rows")}
    total.update(summary_differ=sum(len(r["summary_differ"]) for r in runs),
                 leftover_tmp=sum(len(r["leftover_tmp"]) for r in runs),
                 not_done=sum(r["state"] != "done" for r in runs), wall_s=round(time.time() - t0, 1))
    report["total"] = total
    print("total: " + ", ".join(f"{k} {v}" for k, v in total.items()))
    if args.json:
        from engine.fileio import write_json

        write_json(Path(args.json), report)
    bad = total["rows_differ"] + total["torn_lines"] + total["leftover_tmp"] + total["not_done"] \
        + total["summary_differ"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
