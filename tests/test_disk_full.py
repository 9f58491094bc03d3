"""A full disk, for real (a tiny tmpfs): writers raise one plain line naming the free and needed
space, leave no temporary file, and keep what was written before."""

from __future__ import annotations

import subprocess

import pytest
import torch

from engine.checkpoint import checkpoint_files, load_checkpoint, save_checkpoint
from engine.errors import ResourceError
from engine.fileio import atomic_write, atomic_write_text


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs mounted for the test (skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_one_line_and_the_old_file_survives(small_disk):
    target = small_disk / "status.json"
    atomic_write_text(target, '{"state": "running"}')
    with pytest.raises(ResourceError, match=r"no space left on the device holding .* MB free\), 1 MB needed"):
        atomic_write(target, lambda f: f.write(b"x" * 2**20), binary=True, needed=2**20)
    assert target.read_text() == '{"state": "running"}'
    assert sorted(p.name for p in small_disk.iterdir()) == ["status.json"]  # no temporary file left


def test_a_checkpoint_that_does_not_fit_keeps_the_last_good_one(small_disk):
    save_checkpoint(small_disk, 1, {"step": 1, "w": torch.ones(1000)})
    with pytest.raises(ResourceError, match="no space left") as e:
        save_checkpoint(small_disk, 2, {"step": 2, "w": torch.ones(200_000)})
    assert "\n" not in str(e.value)
    assert [p.name for p in checkpoint_files(small_disk)] == ["step-000001.json"]
    assert load_checkpoint(small_disk / "step-000001.json")["step"] == 1
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".tmp-")]
