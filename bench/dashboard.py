"""Dashboard latency in a real browser (Debian's Chromium via Playwright) on the built-in model.

    .venv/bin/python bench/dashboard.py [--model default] [--slider-moves 10] [--json out.json]

Measures
1. cold: `prunescope app` started -> Importance page -> "Compute importance scores" clicked -> the
   heads heatmap drawn, with a fresh PRUNESCOPE_CACHE (the converted built-in model is linked in,
   so the one-time GGUF conversion is not counted; scores are computed from nothing);
2. warm: the app started again on the same cache -> Importance page -> heads heatmap drawn;
3. slider: on Prune targets, one key press on the MLP-size slider -> the parameter readout changes
   (median and worst of N moves).
Targets: cold <= 60 s, warm <= 5 s, slider <= 300 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HEATMAP = ".js-plotly-plot:has-text('Attention heads')"
READOUT_CHANGED = """(before) => {
    for (const m of document.querySelectorAll('[data-testid=stMetric]')) {
        if (m.textContent.includes('Parameters')) {
            const v = m.querySelector('[data-testid=stMetricValue]');
            return v && v.textContent !== before;
        }
    }
    return false;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, runs: Path, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).parent / "prunescope"  # the installed console script, as a user runs it
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "engine.cli"]
    cmd += ["app", "--headless", "--port", str(port), "--address", "127.0.0.1", "--model", model,
            "--runs-dir", str(runs)]
    log = open(runs / f"app-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the app did not start")


def stop_app(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def idle(page, timeout: float = 120_000) -> None:
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=timeout)


def to_heatmap(browser, url: str, compute: bool) -> dict:
    """Open Importance, optionally click compute, wait for the heads heatmap; times in seconds."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    t0 = time.perf_counter()
    page.goto(url + "/importance")
    idle(page)
    t_page = time.perf_counter() - t0
    if compute:
        page.get_by_role("button", name="Compute importance scores").click()
    page.wait_for_selector(HEATMAP + " .hm, " + HEATMAP + " image", state="attached", timeout=600_000)
    out = {"page_s": t_page, "heatmap_s": time.perf_counter() - t0}
    page.close()
    return out


def slider_moves(browser, url: str, n: int) -> list[float]:
    """Milliseconds from one ArrowLeft on the MLP slider to a changed parameter readout."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(url + "/targets")
    idle(page)
    readout = "[data-testid=stMetric]:has-text('Parameters') [data-testid=stMetricValue]"
    page.wait_for_selector(readout)
    thumb = page.locator("[data-testid=stSlider]").filter(has_text="MLP size").get_by_role("slider")
    times = []
    for _ in range(n + 1):  # the first move is a warm-up
        before = page.inner_text(readout)
        thumb.focus()
        t0 = time.perf_counter()
        thumb.press("ArrowLeft")
        page.wait_for_function(READOUT_CHANGED, arg=before, polling="raf", timeout=30_000)
        times.append((time.perf_counter() - t0) * 1000)
        idle(page)
    page.close()
    return times[1:]


def screenshots(browser, url: str, out: Path) -> list[Path]:
    """The score pages on this model, for the README: each Importance tab, and Prune targets with the
    "Width 75%" preset applied (red = what it would cut)."""
    out.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1440, "height": 1100})
    saved = []

    def shot(name: str) -> None:
        idle(page)
        page.wait_for_timeout(1500)  # plotly draws after the script run ends
        saved.append(out / f"{name}.png")
        page.screenshot(path=str(saved[-1]), full_page=True)

    page.goto(url + "/importance")
    idle(page)
    for tab, name in (("Attention heads", "importance-heads"), ("MLP neurons", "importance-neurons"),
                      ("Embedding channels", "importance-channels"), ("Layers", "importance-layers")):
        page.get_by_role("tab", name=tab).click()
        shot(name)
    page.goto(url + "/targets")
    idle(page)
    page.get_by_role("button", name="Width 75%").click()
    shot("targets-width75")
    page.get_by_role("tab", name="MLP neurons").click()
    shot("targets-width75-neurons")
    page.close()
    return saved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--slider-moves", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--screenshots", type=Path, default=None,
                   help="after the timings, save screenshots of the score pages into this folder")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    from engine.models import builtin_model_dir, cache_dir

    if args.model == "default":
        builtin_model_dir()  # converted once, outside the timing
    tmp = Path(tempfile.mkdtemp(prefix="prunescope-bench-"))
    cache = tmp / "cache"
    cache.mkdir()
    if (cache_dir() / "models").is_dir():
        (cache / "models").symlink_to(cache_dir() / "models")
    runs = tmp / "runs"
    runs.mkdir()
    env = dict(os.environ, PRUNESCOPE_CACHE=str(cache), PRUNESCOPE_LOCKS=str(tmp / "locks"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result: dict = {"model": args.model, "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                         args=CHROMIUM_ARGS)
            for name, compute in (("cold", True), ("warm", False)):
                t0 = time.perf_counter()
                proc, url = start_app(args.model, runs, env)
                t_app = time.perf_counter() - t0
                try:
                    r = to_heatmap(browser, url, compute)
                    result[name] = {"app_ready_s": round(t_app, 2), "page_s": round(r["page_s"], 2),
                                    "total_s": round(t_app + r["heatmap_s"], 2)}
                    print(name, result[name], flush=True)
                    if name == "warm":
                        ms = slider_moves(browser, url, args.slider_moves)
                        result["slider_ms"] = {"median": round(statistics.median(ms), 1), "max": round(max(ms), 1),
                                               "all": [round(x, 1) for x in ms]}
                        if args.screenshots:
                            for f in screenshots(browser, url, args.screenshots):
                                print("saved", f, flush=True)
                finally:
                    stop_app(proc)
            browser.close()
    finally:
        result["load_after"] = os.getloadavg()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(f"\ncold: {result['cold']['total_s']:.1f} s (target 60) · warm: {result['warm']['total_s']:.1f} s (target 5)"
          f" · slider: median {result['slider_ms']['median']:.0f} ms, max {result['slider_ms']['max']:.0f} ms (target 300)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
