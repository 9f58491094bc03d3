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


def test_app_killed_by_sigkill_takes_streamlit_along(tmp_path):
    """SIGKILL cannot be forwarded; the server still stops (it asked the kernel to be told)."""
    port = _free_port()
    proc = _start_app(tmp_path, port)
    kids = _wait_listening(proc, port)
    proc.kill()
    proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs(kids, timeout=20)
    assert not alive, f"processes left after SIGKILL: {alive}"
    assert not _listeners(port)


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


# ---------------------------------------------------------------- damaged run files


def _good_run(root: Path, name: str = "good-run") -> Path:
    from engine.fileio import write_json
    from engine.runs import Run

    run = Run.create(root / name, {"kind": "pipeline", "model": "m", "data": "d.txt", "targets": {"ffn": 20},
                                   "distill": {"steps": 7}, "train_range": [0, 0.6], "eval_range": [0.6, 1]})
    run.update(state="done", progress=1.0, stage="export", message="done")
    run.log_metrics({"step": 1, "loss": 2.5, "elapsed_s": 0.1})
    write_json(run.path / "summary.json", {"params_student": 1000, "params_ratio": 0.8, "steps": 7})
    return run.path


DAMAGE = {
    "status-list": {"status.json": b"[1, 2, 3]"},
    "status-types": {"status.json": json.dumps({"state": "running", "pid": "abc", "heartbeat": "now",
                                                "created": "yesterday", "progress": "half", "stage": 3,
                                                "stages": ["score"]}).encode()},
    "status-binary": {"status.json": b"\xff\xfe\x00garbage"},
    "config-list": {"config.json": b'["not", "a", "config"]'},
    "config-types": {"config.json": json.dumps({"kind": "pipeline", "targets": "ffn=20", "distill": [7],
                                                "train_range": "0:0.6", "model": 5}).encode()},
}


def _damaged_run(root: Path, name: str) -> Path:
    path = _good_run(root, name)
    for file, data in DAMAGE[name].items():
        (path / file).write_bytes(data)
    return path


def test_status_command_reads_damaged_metrics(tmp_path, capsys):
    path = _good_run(tmp_path)
    with open(path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "loss": "\xff\xfe latin-1 \xe9"}\n')  # not UTF-8
        f.write(b'{"step": 3, "loss": 1.5, "note": "\\udcff lone surrogate"}\n')  # valid JSON, unprintable
        f.write(b'{"step": 4, "lo')  # torn last line
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "state:    done" in out and "step=3" in out and "loss=1.5" in out and "\\udcff" in out
    assert main(["status", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["last_train"]["step"] == 3


@pytest.mark.parametrize("name", [n for n in DAMAGE if n.startswith("status")])
def test_status_command_reports_a_damaged_status(tmp_path, capsys, name):
    path = _damaged_run(tmp_path, name)
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "damaged:  status.json" in out and "loss=2.5" in out
    if name == "status-types":  # "running" with an unreadable pid: no live worker can be found
        assert "state:    stale" in out
    assert main(["status", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"]


def test_clean_status_keeps_a_good_status_unchanged(tmp_path):
    from engine.run_files import read_status
    from engine.runs import Run

    path = _good_run(tmp_path)
    st, problems = read_status(path)
    assert problems == [] and st == Run.open(path).status()


@pytest.fixture
def dash(tmp_path, monkeypatch):
    """The dashboard's environment on a tiny model folder, with empty runs / cache folders."""
    from tiny_models import save_tiny

    monkeypatch.setenv("PRUNESCOPE_MODEL", str(save_tiny("llama", tmp_path / "tiny-llama")))
    (tmp_path / "corpus.txt").write_text(" = A = \n\nsome text\n")
    monkeypatch.setenv("PRUNESCOPE_DATA", str(tmp_path / "corpus.txt"))
    for var, sub in (("PRUNESCOPE_RUNS", "runs"), ("PRUNESCOPE_CACHE", "cache"), ("PRUNESCOPE_LOCKS", "locks")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("PRUNESCOPE_DEVICE", "cpu")
    return tmp_path


def _page(page: str, **query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
    at.run()
    for k, v in query.items():
        at.query_params[k] = v
    at.switch_page(f"screens/{page}.py").run()
    assert not at.exception, at.exception
    return at


def test_runs_page_lists_good_and_damaged_runs(dash):
    good = _good_run(dash / "runs")
    for name in DAMAGE:
        _damaged_run(dash / "runs", name)
    at = _page("runs", run="good-run")
    table = at.dataframe[0].value.set_index("run")
    assert set(table.index) == {good.name, *DAMAGE}
    assert table.loc[good.name, "state"] == "done" and table.loc[good.name, "error"] == ""
    assert table.loc[good.name, "steps"] == 7
    for name in DAMAGE:
        assert table.loc[name, "state"] == "damaged", name
        assert DAMAGE[name].keys() == {table.loc[name, "error"].split(":")[0].split(" ")[0]}, name
    assert not at.error and "prunescope run" in "\n".join(c.value for c in at.code)
    for name in DAMAGE:
        at = _page("runs", run=name)
        assert at.selectbox(key="runs_pick").value == name
        assert any("damaged" in e.value for e in at.error), name
        assert not [b for b in at.button if b.key in ("runs_resume", "runs_compare")]


def test_other_pages_open_damaged_runs(dash):
    """The Distill and Compare pages, asked for a damaged run, show the page instead of an exception."""
    _good_run(dash / "runs")
    for name in DAMAGE:
        _damaged_run(dash / "runs", name)
    for name in DAMAGE:
        for page in ("distill", "compare"):
            _page(page, run=name)  # asserts no exception


def test_upload_named_config_json_is_not_a_run(dash):
    from streamlit.testing.v1 import AppTest

    _good_run(dash / "runs")
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.radio(key="data_kind").set_value("Upload a file").run()
    at.file_uploader(key="data_upload").set_value(("config.json", b'{"kind": "pipeline"}', "application/json"))
    at.run()
    assert not at.exception, at.exception
    assert (dash / "cache" / "uploads" / "config.json").read_bytes() == b'{"kind": "pipeline"}'
    assert not (dash / "runs" / "uploads").exists()
    at.switch_page("screens/runs.py").run()
    assert list(at.dataframe[0].value["run"]) == ["good-run"]
