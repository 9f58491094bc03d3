"""Safety and robustness: the dashboard listens on loopback and dies with its launcher, damaged run
files show as that run's error instead of crashing a reader, outputs are not overwritten silently,
and uploads cannot pose as runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- `prunescope app`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners(port: int) -> list[str]:
    """Local addresses listening on TCP `port`, as `ss -ltn` prints them."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()]


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _start_app(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PRUNESCOPE_CACHE=str(tmp_path / "cache"), PRUNESCOPE_LOCKS=str(tmp_path / "locks"))
    cmd = [sys.executable, "-m", "engine.cli", "app", "--headless", "--port", str(port),
           "--runs-dir", str(tmp_path / "runs"), "--model", str(tmp_path / "no-model-needed"), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = 90.0) -> list[psutil.Process]:
    """Wait until something listens on `port`; the launcher's descendants (the Streamlit server)."""
    t0 = time.time()
    while not _listeners(port):
        assert proc.poll() is None, f"prunescope app exited: {proc.communicate()}"
        assert time.time() - t0 < timeout, "the dashboard did not start listening"
        time.sleep(0.5)
    kids = psutil.Process(proc.pid).children(recursive=True)
    assert kids, "no Streamlit process under prunescope app"
    return kids


def _stop_and_check(proc: subprocess.Popen, kids: list[psutil.Process], port: int, sig: int) -> str:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        for k in kids:
            k.kill()
        proc.kill()
        raise
    gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, f"processes left after {signal.Signals(sig).name}: {alive}"
    assert not _listeners(port) and not _connects("127.0.0.1", port), "the port is still open"
    return err


def _other_address() -> str | None:
    """A non-loopback IPv4 address of this machine (None when it has none)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_app_listens_on_loopback_only_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    proc = _start_app(tmp_path, port)
    kids = _wait_listening(proc, port)
    assert _listeners(port) == ["127.0.0.1"], _listeners(port)
    assert _connects("127.0.0.1", port)
    other = _other_address()
    if other:
        assert not _connects(other, port), f"reachable on {other}"
    err = _stop_and_check(proc, kids, port, signal.SIGTERM)
    assert "WARNING" not in err


def test_app_on_all_interfaces_warns_and_stops_on_sigint(tmp_path):
    port = _free_port()
    proc = _start_app(tmp_path, port, "--address", "0.0.0.0")
    kids = _wait_listening(proc, port)
    assert _listeners(port) in (["0.0.0.0"], ["*"]), _listeners(port)
    err = _stop_and_check(proc, kids, port, signal.SIGINT)
    assert "WARNING: the dashboard listens on 0.0.0.0: anyone who can reach this port can run jobs and read " \
           "local files" in err


@pytest.mark.parametrize("address,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                              ("localhost", True), ("0.0.0.0", False), ("::", False),
                                              ("192.0.2.7", False), ("myhost.example", False)])
def test_exposure_warning(address, loopback):
    from engine.commands.app import exposure_warning

    assert (exposure_warning(address) is None) is loopback


# ---------------------------------------------------------------- eval --json


def test_eval_json_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "result.json"
    out.write_text('{"keep": true}\n')
    assert main(["eval", str(tmp_path / "no-such-model"), "--data", "x.txt", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"prunescope eval: error: {out} already exists; pass --force to overwrite it, or choose " \
                  "another --json file"
    assert json.loads(out.read_text()) == {"keep": True}


def test_eval_json_force_overwrites(tmp_path, tiny_llama_pair, capsys):
    from tiny_models import _CORPUS

    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f" = Article {i} = \n\n{_CORPUS * 3}" for i in range(10)))
    out = tmp_path / "result.json"
    out.write_text('{"keep": true}\n')
    assert main(["eval", str(tiny_llama_pair[0]), "--data", str(data), "--data-range", "0:1", "--samples", "2",
                 "--seq-len", "16", "--batch-sizes", "none", "--json", str(out), "--force"]) == 0
    result = json.loads(out.read_text())
    assert "keep" not in result and result["seq_len"] == 16 and result["model"]["ppl"] > 1
    assert not list(tmp_path.glob(".tmp-*"))
