"""One job per device: an advisory lock that every job kind takes, and that anyone can see.

The lock is a `flock` on `<lock_dir>/<device>.lock` (released by the kernel even on SIGKILL); the
file names its holder (pid, absolute run folder). A job waiting for the device registers itself in
`<lock_dir>/<device>.waiting/<pid>.json`, so `device_jobs()` lists every job on this machine that
holds or waits for a device, whichever runs folder it lives in. Torch-free for listing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from engine.errors import RunError
from engine.fileio import read_json, write_json
from engine.paths import cache_dir
from engine.procs import pid_alive


def lock_dir() -> Path:
    """Where device locks live: $PRUNESCOPE_LOCKS, else <cache>/locks (shared by every runs folder)."""
    if os.environ.get("PRUNESCOPE_LOCKS"):
        return Path(os.environ["PRUNESCOPE_LOCKS"])
    return cache_dir() / "locks"


def device_key(device: str = "auto") -> str:
    """A file-name-safe key for the device a job will use."""
    from engine.devices import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev.type
    import torch

    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(",", "_")
    return f"cuda{idx}" + (f"-vis{vis}" if vis else "")


class DeviceLock:
    """An advisory `flock` on `<lock_dir>/<device>.lock`; the file also names the holder."""

    def __init__(self, key: str):
        self.key = key
        self.path = lock_dir() / f"{key}.lock"
        self.waiting_dir = lock_dir() / f"{key}.waiting"
        self._fd: int | None = None

    def holder(self) -> dict:
        """{pid, run, since} of the live holder, or {}."""
        h = read_json(self.path) or {}
        return h if pid_alive(h.get("pid")) else {}

    def try_acquire(self, run_dir: Path | None = None) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        run = str(Path(run_dir).resolve()) if run_dir else ""
        os.write(fd, json.dumps({"pid": os.getpid(), "run": run, "since": time.time()}).encode())
        self._fd = fd
        self.stop_waiting()
        return True

    def busy(self) -> bool:
        """True when another process holds the lock (checked without keeping it)."""
        if self.try_acquire():
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        self.stop_waiting()

    def wait_here(self, run_dir: Path) -> None:
        """Register this process as waiting for the device (seen by `device_jobs`)."""
        write_json(self.waiting_dir / f"{os.getpid()}.json",
                   {"pid": os.getpid(), "run": str(Path(run_dir).resolve()), "since": time.time()})

    def stop_waiting(self) -> None:
        with contextlib.suppress(OSError):
            (self.waiting_dir / f"{os.getpid()}.json").unlink()

    def busy_message(self) -> str:
        """Who holds the device (absolute folder, stage, progress) and how to stop it."""
        h = self.holder()
        if not h.get("run"):
            return f"device {self.key} is busy (pid {h.get('pid', '?')})"
        return (f"device {self.key} is busy with {describe_job(h['run'])} (pid {h.get('pid')}); wait for it, "
                f"cancel it with `prunescope cancel {h['run']}`, or queue this job (--if-busy queue)")


def describe_job(run_dir: str | Path) -> str:
    """'run /abs/folder (stage 42%)' from the folder's status.json."""
    st = read_json(Path(run_dir) / "status.json") or {}
    stage, prog = st.get("stage"), st.get("progress")
    where = f"{stage} {float(prog):.0%}" if stage and isinstance(prog, int | float) else st.get("state", "?")
    return f"run {run_dir} ({where})"


def ensure_device_free(device: str = "auto") -> None:
    """RunError naming the holder when another job holds the device (for --if-busy refuse)."""
    lock = DeviceLock(device_key(device))
    if lock.busy():
        raise RunError(lock.busy_message())


def device_jobs() -> list[dict]:
    """Every job on this machine that holds or waits for a device: {device, role ("holds" or
    "waits"), pid, run (absolute folder), since}. Dead waiters are cleaned up on the way."""
    d = lock_dir()
    out: list[dict] = []
    if not d.is_dir():
        return out
    for f in sorted(d.glob("*.lock")):
        h = read_json(f) or {}
        if h.get("pid") and pid_alive(h["pid"]):
            out.append({"device": f.stem, "role": "holds", **h})
    for w in sorted(d.glob("*.waiting/*.json")):
        h = read_json(w) or {}
        if h.get("pid") and pid_alive(h["pid"]):
            out.append({"device": w.parent.name[: -len(".waiting")], "role": "waits", **h})
        else:
            with contextlib.suppress(OSError):
                w.unlink()
    return out
