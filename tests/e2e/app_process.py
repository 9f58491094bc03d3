"""A real `prunescope app` process for browser tests and the dashboard benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def start_app(model: str, runs: Path, env: dict, data: str | None = None) -> tuple[subprocess.Popen, str]:
    """`prunescope app --headless --port P` as a real process; returns (process, base url)."""
    port = free_port()
    exe = Path(sys.executable).parent / "prunescope"  # the installed console script, as a user runs it
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "engine.cli"]
    cmd += ["app", "--headless", "--port", str(port), "--address", "127.0.0.1", "--model", model,
            "--runs-dir", str(runs)]
    if data:
        cmd += ["--data", data]
    log = open(runs.parent / f"app-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/_stcore/health")
    except TimeoutError:
        stop_app(proc)
        raise
    return proc, url


def stop_app(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
