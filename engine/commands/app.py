"""`prunescope app`: launch the Streamlit dashboard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("app", help="launch the dashboard (Streamlit)")
    p.add_argument("--model", default="default", help="model to open: default, hub id, folder or .gguf")
    p.add_argument("--data", default=None,
                   help="calibration data: file, hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] or generated[:N] "
                        "(default: WikiText-2 when available)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default=None, help="address to listen on (default: Streamlit's)")
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


def run(args) -> int:
    app = app_script()
    env = dict(os.environ, PRUNESCOPE_MODEL=_local(args.model))
    if args.data:
        env["PRUNESCOPE_DATA"] = _local(args.data)
    if args.runs_dir:
        env["PRUNESCOPE_RUNS"] = str(Path(args.runs_dir).resolve())
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--client.toolbarMode", "minimal"]
    if args.address:
        cmd += ["--server.address", args.address]
    if args.headless:
        cmd += ["--server.headless", "true"]
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
