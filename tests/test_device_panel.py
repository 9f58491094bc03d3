"""The device lock on the pages: a queued job names the holder (folder, stage, progress) and can
cancel it; the Runs page lists every job holding or waiting for a device, from any runs folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.device_lock import DeviceLock
from engine.runs import Run


@pytest.fixture
def holder(tmp_path, monkeypatch):
    """A real process (pid) running a job in a runs folder the dashboard does not know, holding the CPU lock."""
    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("PRUNESCOPE_RUNS", str(tmp_path / "runs"))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    run = Run.create(tmp_path / "elsewhere" / "long-job", {"kind": "pipeline"})
    run.update(state="running", pid=proc.pid, heartbeat=time.time())
    run.set_stage("distill", 0.42)
    lock = DeviceLock("cpu")
    assert lock.try_acquire(run.path)
    yield run, proc
    lock.release()
    proc.kill()
    proc.wait()


def _notice_app(status: dict):
    def app(status):
        from dashboard.device_panel import device_wait_notice

        device_wait_notice(status, "t")

    return AppTest.from_function(app, kwargs={"status": status}, default_timeout=30)


def test_queued_job_names_the_holder_and_cancels_it(holder):
    run, proc = holder
    waiting = {"state": "queued", "waiting_for": DeviceLock("cpu").holder()}
    at = _notice_app(waiting).run()
    assert not at.exception
    text = at.warning[0].value
    assert str(run.path.resolve()) in text and "distill 42%" in text and f"pid {os.getpid()}" in text
    at.button(key="t_cancel_holder").click().run()
    assert (run.path / "cancel.request").exists()
    assert proc.wait(timeout=10) != 0  # SIGTERM reached the holder's process


def test_nothing_shown_for_a_running_job(holder):
    at = _notice_app({"state": "running"}).run()
    assert not at.warning and not at.button


def test_device_jobs_table_lists_the_holder(holder):
    run, proc = holder

    def app():
        from dashboard.device_panel import device_jobs_table

        device_jobs_table()

    at = AppTest.from_function(app, default_timeout=30).run()
    assert not at.exception
    text = "\n".join(m.value for m in at.markdown)
    assert "holds it" in text and str(run.path.resolve()) in text and f"pid {os.getpid()}" in text


def test_runs_page_lists_jobs_holding_a_device_in_other_runs_folders(holder):
    """The Runs page shows the holder although it lives outside this dashboard's runs folder (and this one is empty)."""
    run, _ = holder
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("screens/runs.py").run()
    assert not at.exception
    assert any("holds it" in m.value and str(run.path.resolve()) in m.value for m in at.markdown)
