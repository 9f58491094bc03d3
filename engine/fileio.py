"""Safe file writing and tolerant reading for run folders, scores and checkpoints (torch-free).

Writers are atomic (temp file in the same folder + rename): a reader sees the old or the new file,
never half of one. Readers of run files tolerate damage: a missing, unreadable, non-UTF-8 or
wrongly shaped file reads as None (or skips the bad line), never as an exception.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.errors import ResourceError

TMP_PREFIX = ".tmp-"


def _disk_full_message(path: Path, needed: int | None = None) -> str:
    import shutil

    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = None
    need = f", {needed / 2**20:.0f} MB needed" if needed else ""
    have = f" ({free / 2**20:.0f} MB free)" if free is not None else ""
    return f"no space left on the device holding {path}{have}{need}; free some space and retry"


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when a library wraps it in its own message (safetensors, torch)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "os error 28" in text or "No space left on device" in text or "file write failed" in text


def atomic_write(path: Path, write: Callable, binary: bool = False, fsync: bool = False,
                 prefix: str | None = None, needed: int | None = None) -> None:
    """Call `write(file)` on a temp file in the same folder, then rename it over `path`: readers
    see the old or the new file, never half of one; a failed write leaves nothing behind. A full
    disk raises ResourceError with a one-line message (naming `needed` bytes when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise ResourceError(_disk_full_message(path, needed)) from e
        raise


def atomic_write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Text via `atomic_write`."""
    atomic_write(path, lambda f: f.write(text), fsync=fsync)


def write_json(path: Path, obj: dict, fsync: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str), fsync=fsync)


def read_json(path: Path) -> dict | None:
    """A JSON object from a file; None when the file is missing, unreadable, not UTF-8, not JSON,
    or not an object (a list or a number is damage, not a config)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row with a single O_APPEND write (flushed: no user-space buffer)."""
    data = (json.dumps(row, default=float) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """All complete rows that are JSON objects; a partial, corrupt or non-UTF-8 line is skipped."""
    rows = []
    try:
        data = Path(path).read_bytes()
    except OSError:
        return rows
    for raw in data.splitlines():
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_temps(folder: Path, recursive: bool = True) -> list[Path]:
    """Delete temporary files and folders (`.tmp-*`, `.NAME.tmp-*`) left in `folder` by writers that died.
    Only names this module's writers create are touched. Returns what was removed."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    found = set()
    for pattern in (f"{TMP_PREFIX}*", ".*.tmp-*"):  # atomic writes, and folders being exported
        found.update(folder.rglob(pattern) if recursive else folder.glob(pattern))
    for p in sorted(found, key=lambda q: len(q.parts), reverse=True):
        if not p.exists():
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed
