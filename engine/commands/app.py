"""`prunescope app`: launch the Streamlit dashboard."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1"
STOP_GRACE_S = 10.0


def register(sub) -> None:
    p = sub.add_parser("app", help="launch the dashboard (Streamlit)")
    p.add_argument("--model", default="default", help="model to open: default, hub id, folder or .gguf")
    p.add_argument("--data", default=None,
                   help="calibration data: file, hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] or generated[:N] "
                        "(default: WikiText-2 when available)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default=DEFAULT_ADDRESS,
                   help="address to listen on (default 127.0.0.1: this machine only); 0.0.0.0 opens the "
                        "dashboard, its jobs and the local files it can read to anyone who reaches the port")
    p.add_argument("--runs-dir", default=None, help="where runs are kept (default: ./runs)")
    p.add_argument("--headless", action="store_true", help="do not open a browser")
    p.set_defaults(func=run)


def _local(spec: str) -> str:
    """Absolute path for a local folder / file spec (hub ids and 'default' unchanged)."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def app_script() -> Path:
    """dashboard/app.py, wherever the package is (an editable install may expose it as a namespace
    package, whose __file__ is None)."""
    import dashboard

    for folder in list(dashboard.__path__):
        if (Path(folder) / "app.py").is_file():
            return Path(folder) / "app.py"
    raise FileNotFoundError("the dashboard package has no app.py; reinstall prunescope")


def is_loopback(address: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(address: str) -> str | None:
    """The warning printed when the dashboard listens beyond this machine (None on loopback)."""
    if is_loopback(address):
        return None
    return (f"the dashboard listens on {address}: anyone who can reach this port can run jobs and read local "
            "files through it (no login); use --address 127.0.0.1 and an SSH tunnel unless this network is "
            "trusted")


def _die_with_parent(parent: int) -> None:
    """Run in the child before exec: SIGTERM it when the launcher dies, even by SIGKILL, which no
    handler can forward (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> int:
    """Send `sig` to the child's process group, wait up to `grace` seconds, then SIGKILL the group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def run(args) -> int:
    app = app_script()
    env = dict(os.environ, PRUNESCOPE_MODEL=_local(args.model))
    if args.data:
        env["PRUNESCOPE_DATA"] = _local(args.data)
    if args.runs_dir:
        env["PRUNESCOPE_RUNS"] = str(Path(args.runs_dir).resolve())
    address = args.address or DEFAULT_ADDRESS
    warning = exposure_warning(address)
    if warning:
        print(f"prunescope app: WARNING: {warning}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", address, "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
    if args.headless:
        cmd += ["--server.headless", "true"]
    # Streamlit runs in its own process group so that a SIGTERM / SIGINT / SIGHUP to this process stops
    # it and whatever it started, instead of leaving an orphaned server still listening on the port
    proc: subprocess.Popen | None = None

    def forward(_signum, _frame) -> None:
        raise KeyboardInterrupt

    def force(_signum, _frame) -> None:  # a second signal while stopping: no more grace
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {sig: signal.signal(sig, forward) for sig in sigs}
    try:
        me = os.getpid()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=lambda: _die_with_parent(me))
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in sigs:
            signal.signal(sig, force)
        if proc is not None and proc.poll() is None:
            stop_group(proc)  # Streamlit shuts down cleanly on SIGTERM
        for sig, h in old.items():
            signal.signal(sig, h)
