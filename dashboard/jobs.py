"""Background jobs the dashboard starts, and the files it reads to follow them.

The scoring job runs in a separate, detached Python process (`python -m dashboard.jobs score ...`)
that calls the engine's `score()` and writes `job.json` (state, progress, message, pid, error)
beside the scores it produces. This module never imports Streamlit: the child process imports it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from engine.runs import pid_alive, read_json, write_json  # noqa: F401  (also used by the pages)

JOB_FILE = "job.json"
LOG_FILE = "job.log"
STALE_S = 30.0  # a running job whose process is gone and whose file is this old has died


def score_command(model: str, data: str, out: Path, samples: int, seq_len: int, data_range: str = "",
                  depth_ppl: bool = False, block_size: int | None = None, column: str = "",
                  stream: str = "") -> list[str]:
    """The `prunescope score` command line equivalent to a dashboard scoring job (shown to users)."""
    cmd = ["prunescope", "score", "--model", model, "--data", data]
    if data_range and data_range != "0:1":
        cmd += ["--data-range", data_range]
    if column:
        cmd += ["--text-column", column]
    cmd += ["--samples", str(samples), "--seq-len", str(seq_len)]
    if depth_ppl:
        cmd.append("--depth-ppl")
    if block_size:
        cmd += ["--blocks", str(block_size)]
    if stream:
        cmd += ["--stream", stream]
    return cmd + ["--out", str(out)]


def start_score_job(out: Path, model: str, data: str, samples: int, seq_len: int, data_range: str = "",
                    depth_ppl: bool = False, block_size: int | None = None, column: str = "",
                    stream: str = "") -> Path:
    """Start a detached scoring process writing into `out`; returns `out` at once. `stream` ("", "cpu" or
    "disk") keeps the weights off the device and copies each layer in while it runs (engine.importance.stream)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "dashboard.jobs", "score", "--out", str(out), "--model", model, "--data", data,
            "--samples", str(samples), "--seq-len", str(seq_len), "--data-range", data_range or "0:1"]
    if depth_ppl:
        args.append("--depth-ppl")
    if block_size:
        args += ["--blocks", str(block_size)]
    if column:
        args += ["--text-column", column]
    if stream:
        args += ["--stream", stream]
    write_json(out / JOB_FILE, {"state": "queued", "progress": 0.0, "message": "starting", "pid": None,
                                "started": time.time(), "command": score_command(
                                    model, data, out, samples, seq_len, data_range, depth_ppl, block_size, column,
                                    stream)})
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with open(out / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
                                env=env, start_new_session=True)
    job = read_json(out / JOB_FILE) or {}
    if job.get("state") == "queued":  # the child may already have written "running"
        job["pid"] = proc.pid
        write_json(out / JOB_FILE, job)
    return out


def job_status(folder: Path) -> dict | None:
    """The job's state, with a dead process turned into `failed` (so the UI never waits forever)."""
    folder = Path(folder)
    job = read_json(folder / JOB_FILE)
    if job is None:
        return None
    if job.get("state") in ("queued", "running") and not pid_alive(job.get("pid")):
        age = time.time() - (folder / JOB_FILE).stat().st_mtime
        if job.get("pid") or age > STALE_S:
            job["state"] = "failed"
            job["error"] = job.get("error") or "the scoring process stopped unexpectedly; see " + str(folder / LOG_FILE)
    return job


def cancel_job(folder: Path) -> None:
    """Stop a running scoring process (its whole process group) and mark it cancelled."""
    import signal

    job = read_json(Path(folder) / JOB_FILE) or {}
    pid = job.get("pid")
    if pid and pid_alive(pid):
        try:
            os.killpg(int(pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    job.update(state="cancelled", message="cancelled")
    write_json(Path(folder) / JOB_FILE, job)


def log_tail(folder: Path, lines: int = 15) -> str:
    try:
        return "\n".join((Path(folder) / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- the child process


def _run_score(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    job = read_json(out / JOB_FILE) or {}
    job.update(state="running", pid=os.getpid(), progress=0.0, message="loading the model")
    write_json(out / JOB_FILE, job)
    last = [0.0]

    def progress(frac: float, message: str = "") -> None:
        now = time.time()
        if now - last[0] < 0.3 and frac < 1.0:
            return
        last[0] = now
        job.update(progress=float(max(0.0, min(1.0, frac))), message=message, heartbeat=now)
        write_json(out / JOB_FILE, job)

    try:
        from engine.data import DataSource, parse_doc_range
        from engine.errors import UserError
        from engine.importance import ScoreConfig, score
        from engine.models import load

        t0 = time.time()
        source = DataSource.parse(ns.data, column=ns.text_column or None, docs=parse_doc_range(ns.data_range))
        loaded = load(ns.model, stream=ns.stream or False)
        progress(0.02, f"model loaded in {time.time() - t0:.1f}s; reading {source.label}")
        config = ScoreConfig(depth_ppl=ns.depth_ppl, block_size=ns.blocks or None,
                             block_ppl=bool(ns.blocks and ns.depth_ppl))
        # The engine's own cache folder first (a pipeline run then reuses these scores), then a copy here.
        scores, cached = score(loaded, source, ns.samples, ns.seq_len, config=config, progress=progress)
        scores.meta.setdefault("model", ns.model)
        scores.save(out)
        job["engine_cache"] = str(cached)
    except Exception as e:  # noqa: BLE001 - recorded for the UI; user errors in plain words
        plain = isinstance(e, UserError)
        traceback.print_exc()
        job.update(state="failed", error=str(e) if plain else f"{type(e).__name__}: {e}", finished=time.time())
        write_json(out / JOB_FILE, job)
        return 2 if plain else 1
    job.update(state="done", progress=1.0, message="done", finished=time.time())
    write_json(out / JOB_FILE, job)
    return 0


def start_compare_job(out: Path, teacher: str, student: str, prompt: str, max_new_tokens: int = 64) -> Path:
    """Start a detached process that measures both models' tokens/s and answers `prompt` with each."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt.txt").write_text(prompt)
    args = [sys.executable, "-m", "dashboard.jobs", "compare", "--out", str(out), "--teacher", teacher,
            "--student", student, "--max-new-tokens", str(max_new_tokens)]
    write_json(out / JOB_FILE, {"state": "queued", "progress": 0.0, "message": "starting", "pid": None,
                                "started": time.time()})
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(out / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
                                env=env, start_new_session=True)
    job = read_json(out / JOB_FILE) or {}
    if job.get("state") == "queued":
        job["pid"] = proc.pid
        write_json(out / JOB_FILE, job)
    return out


def _answer(loaded, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to a prompt (through the chat template when the tokenizer has one)."""
    import torch

    tok = loaded.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=not getattr(tok, "chat_template", None))
    device = next(loaded.model.parameters()).device
    with torch.inference_mode():
        out = loaded.model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _run_compare(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    job = read_json(out / JOB_FILE) or {}
    job.update(state="running", pid=os.getpid(), progress=0.0, message="loading the teacher")
    write_json(out / JOB_FILE, job)
    prompt = (out / "prompt.txt").read_text()
    result: dict = {"prompt": prompt}
    try:
        from engine.models import count_parameters, load
        from engine.speed import measure_throughput

        for i, (name, spec) in enumerate((("teacher", ns.teacher), ("student", ns.student))):
            job.update(progress=i / 2, message=f"loading the {name}")
            write_json(out / JOB_FILE, job)
            loaded = load(spec)
            job.update(progress=i / 2 + 0.1, message=f"measuring the {name}'s speed")
            write_json(out / JOB_FILE, job)
            tp = measure_throughput(loaded.model, batch_size=1, prompt_len=64, new_tokens=16, repeats=2)
            job.update(progress=i / 2 + 0.3, message=f"the {name} answers the prompt")
            write_json(out / JOB_FILE, job)
            result[name] = {"answer": _answer(loaded, prompt, ns.max_new_tokens), "params": count_parameters(loaded.model),
                            "throughput": tp.to_dict(), "dtype": str(next(loaded.model.parameters()).dtype)}
            del loaded
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        job.update(state="failed", error=f"{type(e).__name__}: {e}", finished=time.time())
        write_json(out / JOB_FILE, job)
        return 1
    write_json(out / "result.json", result)
    job.update(state="done", progress=1.0, message="done", finished=time.time())
    write_json(out / JOB_FILE, job)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboard.jobs")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("score")
    s.add_argument("--out", required=True)
    s.add_argument("--model", default="default")
    s.add_argument("--data", required=True)
    s.add_argument("--data-range", default="0:1")
    s.add_argument("--text-column", default="")
    s.add_argument("--samples", type=int, default=32)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--depth-ppl", action="store_true")
    s.add_argument("--blocks", type=int, default=0)
    s.add_argument("--stream", default="", choices=["", "cpu", "disk"])
    c = sub.add_parser("compare")
    c.add_argument("--out", required=True)
    c.add_argument("--teacher", required=True)
    c.add_argument("--student", required=True)
    c.add_argument("--max-new-tokens", type=int, default=64)
    ns = p.parse_args(argv)
    return _run_score(ns) if ns.what == "score" else _run_compare(ns)


if __name__ == "__main__":
    sys.exit(main())
