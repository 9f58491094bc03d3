"""Run folders: atomic status, metrics JSONL, stale detection, device lock (queue / refuse), cancel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import runs
from engine.device_lock import DeviceLock, device_jobs
from engine.jobs import run_worker
from engine.runs import (
    Run,
    RunError,
    append_jsonl,
    cancel,
    effective_state,
    list_runs,
    prepare_resume,
    read_jsonl,
    resume,
    start_job,
    truncate_metrics,
)


@pytest.fixture(autouse=True)
def own_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESCOPE_LOCKS", str(tmp_path / "locks"))


def _wait(pred, timeout=20.0, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def test_create_open_and_refuse_existing(tmp_path):
    run = Run.create(tmp_path / "r", {"kind": "pipeline", "x": 1})
    assert run.status()["state"] == "queued" and run.config() == {"kind": "pipeline", "x": 1}
    with pytest.raises(RunError, match="already holds a run"):
        Run.create(tmp_path / "r", {})
    Run.create(tmp_path / "r", {"x": 2}, force=True)
    assert Run.open(tmp_path / "r").config() == {"x": 2}
    with pytest.raises(RunError, match="not a run folder"):
        Run.open(tmp_path / "nothing")


def test_status_writes_are_atomic_under_concurrent_reads(tmp_path):
    run = Run.create(tmp_path / "r", {})
    stop = threading.Event()
    bad: list[str] = []

    def reader():
        while not stop.is_set():
            text = run.status_file.read_text()
            try:
                json.loads(text)
            except json.JSONDecodeError:
                bad.append(text)

    th = threading.Thread(target=reader)
    th.start()
    for i in range(300):
        run.set_stage("distill", i / 300, "x" * (i * 7 % 900))
    stop.set()
    th.join()
    assert not bad
    assert not [p for p in run.path.iterdir() if p.name.startswith(".status.json")]  # no temp files left
    assert run.status()["stages"]["distill"]["progress"] == pytest.approx(299 / 300, abs=1e-4)


def test_metrics_jsonl_tolerates_partial_last_line_and_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for s in range(1, 6):
        append_jsonl(path, {"step": s, "loss": 1.0 / s})
    append_jsonl(path, {"eval": True, "step": 5, "ppl": 3.0})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a writer killed mid-line
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5]
    truncate_metrics(path, 3)
    lines = path.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]  # every line valid JSON again


def test_stale_detection(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    assert effective_state({"state": "running", "pid": dead.pid, "heartbeat": now}) == "stale"
    assert effective_state({"state": "running", "pid": os.getpid(), "heartbeat": now - 600}) == "stale"
    assert effective_state({"state": "running", "pid": os.getpid(), "heartbeat": now}) == "running"
    assert effective_state({"state": "done", "pid": dead.pid}) == "done"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited but not reaped
    assert _wait(lambda: not runs.pid_alive(zombie.pid))
    zombie.wait()
    run = Run.create(tmp_path / "r", {})
    run.update(state="running", pid=dead.pid, heartbeat=now)
    assert list_runs(tmp_path)[0]["status"]["effective"] == "stale"
    assert cancel(run.path) == "cancelled"  # a dead job is marked cancelled directly
    assert Run.open(run.path).status()["state"] == "cancelled"


def test_resume_refuses_a_live_or_finished_run(tmp_path):
    run = Run.create(tmp_path / "r", {})
    run.update(state="running", pid=os.getpid(), heartbeat=time.time())
    for fn in (resume, prepare_resume):  # detached and foreground resume share the check
        with pytest.raises(RunError, match=rf"still running \(pid {os.getpid()}\); nothing to resume"):
            fn(run.path)
    run.update(state="done")
    for fn in (resume, prepare_resume):
        with pytest.raises(RunError, match="already done"):
            fn(run.path)
    run.update(state="cancelled")
    (run.path / runs.CANCEL_FILE).write_text("")
    assert prepare_resume(run.path).path == run.path
    assert not (run.path / runs.CANCEL_FILE).exists()  # a foreground resume clears the cancel request


def test_worker_queues_behind_the_lock_then_runs(tmp_path):
    run = Run.create(tmp_path / "r", {})
    holder = DeviceLock("cpu")
    assert holder.try_acquire(tmp_path / "other")
    seen = {}

    def work(stop):
        seen["state"] = Run.open(run.path).status()["state"]

    th = threading.Thread(target=lambda: seen.setdefault("final", run_worker(run, work, "cpu", "queue")))
    th.start()
    assert _wait(lambda: "waiting for device cpu" in (Run.open(run.path).status().get("message") or ""))
    assert Run.open(run.path).status()["state"] == "queued"
    holder.release()
    th.join(timeout=20)
    assert seen == {"state": "running", "final": "done"}
    assert Run.open(run.path).status()["pid"] == os.getpid()


def test_device_jobs_lists_holder_and_waiter_from_any_runs_folder(tmp_path):
    """The lock is visible: the holder (a run in another runs folder) and the queued job are both
    listed with absolute folders, and the queued job's status names the holder's stage."""
    other = Run.create(tmp_path / "elsewhere" / "big", {})
    other.set_stage("distill", 0.42)
    holder = DeviceLock("cpu")
    assert holder.try_acquire(other.path)
    run = Run.create(tmp_path / "runs" / "mine", {})
    th = threading.Thread(target=lambda: run_worker(run, lambda stop: None, "cpu", "queue"))
    th.start()
    try:
        assert _wait(lambda: any(j["role"] == "waits" for j in device_jobs()))
        jobs = {j["role"]: j for j in device_jobs()}
        assert jobs["holds"]["run"] == str(other.path.resolve()) and jobs["holds"]["device"] == "cpu"
        assert jobs["waits"]["run"] == str(run.path.resolve())
        assert _wait(lambda: "distill 42%" in (Run.open(run.path).status().get("message") or ""))
        assert str(other.path.resolve()) in Run.open(run.path).status()["message"]
    finally:
        holder.release()
        th.join(timeout=20)
    assert device_jobs() == []  # the waiter took the lock, finished and released it


def test_force_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    thesis = tmp_path / "work" / "docs" / "thesis.txt"
    thesis.parent.mkdir(parents=True)
    thesis.write_text("years of work")
    for force in (False, True):
        with pytest.raises(RunError, match="is not a prunescope run folder .*docs"):
            Run.create(tmp_path / "work", {"kind": "pipeline"}, force=force)
    assert thesis.read_text() == "years of work"
    run = Run.create(tmp_path / "run", {"kind": "pipeline"})
    (run.path / "scores").mkdir()
    with pytest.raises(RunError, match="already holds a run"):
        Run.create(run.path, {"kind": "pipeline"})
    Run.create(run.path, {"kind": "distill"}, force=True)  # a run folder is replaced with --force
    assert not (run.path / "scores").exists() and Run.open(run.path).config()["kind"] == "distill"


def test_a_started_job_removes_temporary_files_of_dead_writers(tmp_path):
    run = Run.create(tmp_path / "r", {})
    (run.path / ".model.tmp-x1y2").mkdir()
    (run.path / ".model.tmp-x1y2" / "model.safetensors").write_bytes(b"0" * 100)
    (run.path / "checkpoints").mkdir()
    (run.path / "checkpoints" / ".tmp-step-000004.safetensors.abc").write_bytes(b"half")
    (run.path / "notes.txt").write_text("mine")
    run_worker(run, lambda stop: None, "cpu")
    left = sorted(p.relative_to(run.path).as_posix() for p in run.path.rglob("*"))
    assert not [p for p in left if "tmp-" in p] and "notes.txt" in left


def test_worker_refuses_when_busy_and_queued_job_can_be_cancelled(tmp_path):
    holder = DeviceLock("cpu")
    assert holder.try_acquire(tmp_path / "other")
    try:
        refused = Run.create(tmp_path / "a", {})
        with pytest.raises(RunError, match="device cpu is busy with run .*other"):
            run_worker(refused, lambda stop: None, "cpu", "refuse")
        st = Run.open(refused.path).status()
        assert st["state"] == "failed" and "busy" in st["error"]

        queued = Run.create(tmp_path / "b", {})
        th = threading.Thread(target=lambda: run_worker(queued, lambda stop: None, "cpu", "queue"))
        th.start()
        assert _wait(lambda: "waiting" in (Run.open(queued.path).status().get("message") or ""))
        (queued.path / runs.CANCEL_FILE).write_text("now")
        th.join(timeout=20)
        assert Run.open(queued.path).status()["state"] == "cancelled"

        started = Run.create(tmp_path / "c", {"device": "cpu"})
        with pytest.raises(RunError, match="busy"):
            start_job(started.path, if_busy="refuse")
        st = Run.open(started.path).status()  # not "queued" forever: it says it was not started
        assert st["effective"] == "cancelled" and "not started" in st["message"]
    finally:
        holder.release()


def test_worker_records_failure(tmp_path):
    run = Run.create(tmp_path / "r", {})

    def work(stop):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        run_worker(run, work, "cpu")
    st = Run.open(run.path).status()
    assert st["state"] == "failed" and st["error"] == "ValueError: boom"
    assert not DeviceLock("cpu").busy()  # released


def test_user_errors_and_full_disks_fail_with_one_plain_line(tmp_path):
    run = Run.create(tmp_path / "r", {})

    def work(stop):
        raise RunError("--layers must be below 4")

    with pytest.raises(RunError):
        run_worker(run, work, "cpu")
    assert Run.open(run.path).status()["error"] == "--layers must be below 4"

    def full(stop):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    with pytest.raises(RuntimeError):
        run_worker(run, full, "cpu")
    assert Run.open(run.path).status()["error"].startswith("no space left on the device")
    assert not DeviceLock("cpu").busy()  # released


def test_runs_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNESCOPE_RUNS", str(tmp_path))
    assert runs.runs_root() == Path(tmp_path)
    Run.create(tmp_path / "one", {"kind": "pipeline"})
    time.sleep(0.01)
    Run.create(tmp_path / "two", {"kind": "distill"})
    assert [r["name"] for r in list_runs()] == ["two", "one"]


def test_damaged_status_types_never_crash_the_readers(tmp_path):
    """A text pid or a text creation time (hand-edited or damaged files) reads as that run's problem."""
    good = Run.create(tmp_path / "good", {"kind": "pipeline"})
    bad = Run.create(tmp_path / "bad", {"kind": "pipeline"})
    (bad.path / "status.json").write_text(json.dumps({"state": "running", "pid": "12a", "created": "yesterday",
                                                      "heartbeat": "now", "stages": []}))
    st = Run.open(bad.path).status()
    assert st["effective"] == "stale" and st["pid"] is None and st["problems"]
    names = [r["name"] for r in list_runs(tmp_path)]
    assert sorted(names) == ["bad", "good"] and Run.open(good.path).status().get("problems") is None
    assert cancel(bad.path) == "cancelled"  # a damaged stale run can still be stopped for good
