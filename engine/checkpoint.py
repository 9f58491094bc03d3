"""Training checkpoints as safetensors + a JSON sidecar: nothing is unpickled when loading.

A checkpoint of step N is two files in the checkpoints folder:

    step-NNNNNN.safetensors   every tensor of the state (weights, AdamW moments, RNG states)
    step-NNNNNN.json          everything else (step, schedule, config, Python RNG state) as JSON,
                              with the tensor file's size and sha256; written last, so its presence
                              marks a complete checkpoint

A nested state (dicts, lists, tensors, numbers, strings) is split into the two: each tensor is stored
under its path ("optimizer/state/3/exp_avg") and replaced by {"__tensor__": path} in the JSON. Loading
verifies the size and checksum and falls back to the newest checkpoint that verifies, saying which
it skipped and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from engine.errors import CheckpointError
from engine.fileio import atomic_write, read_json, sha256_file

log = logging.getLogger(__name__)

FORMAT = 2
_NAME = re.compile(r"^step-(\d{6,})\.json$")


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON skeleton of `obj`; its tensors go into `tensors` by path."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()  # clone: no shared storage (tied weights)
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, "", {}) if not isinstance(k, str | int) else k,
                              _split(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {path or '/'} in a checkpoint")


def _join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_split`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(_join(v, tensors) for v in skeleton["__tuple__"])
        return {k: _join(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [_join(v, tensors) for v in skeleton]
    return skeleton


def checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """The JSON sidecars of complete-looking checkpoints, oldest first (verification is separate)."""
    d = Path(ckpt_dir)
    return sorted(p for p in d.glob("step-*.json") if _NAME.match(p.name)) if d.is_dir() else []


def tensor_file(sidecar: Path) -> Path:
    return sidecar.with_suffix(".safetensors")


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write the state of `step` (tensors first, then the sidecar), keep the newest `keep`; the sidecar's path."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    sidecar = d / f"step-{step:06d}.json"
    blob = save_safetensors(tensors)
    atomic_write(tensor_file(sidecar), lambda f: f.write(blob), binary=True, fsync=True, needed=len(blob))
    meta = {"format": FORMAT, "step": step, "tensor_bytes": len(blob),
            "sha256": sha256_file(tensor_file(sidecar)), "state": skeleton}
    atomic_write(sidecar, lambda f: f.write(json.dumps(meta)), fsync=True)
    for old in checkpoint_files(d)[:-max(1, keep)]:
        remove_checkpoint(old)
    return sidecar


def remove_checkpoint(sidecar: Path) -> None:
    """Delete one checkpoint (sidecar first, so a half-deleted one never looks complete)."""
    for p in (sidecar, tensor_file(sidecar)):
        with contextlib.suppress(OSError):
            p.unlink()


def load_checkpoint(sidecar: str | Path) -> dict:
    """The verified state of one checkpoint; CheckpointError saying what is wrong otherwise."""
    sidecar = Path(sidecar)
    meta = read_json(sidecar)
    if meta is None or meta.get("format") != FORMAT or "state" not in meta:
        raise CheckpointError(f"{sidecar.name} is not a readable checkpoint sidecar (format {FORMAT} JSON)")
    tf = tensor_file(sidecar)
    if not tf.is_file():
        raise CheckpointError(f"{tf.name} is missing")
    size = tf.stat().st_size
    if size != meta.get("tensor_bytes"):
        raise CheckpointError(f"{tf.name} has {size} bytes, {meta.get('tensor_bytes')} were written (truncated?)")
    if sha256_file(tf) != meta.get("sha256"):
        raise CheckpointError(f"{tf.name} does not match its checksum (damaged)")
    try:
        tensors = load_safetensors(tf.read_bytes())
        return _join(meta["state"], tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{sidecar.name} cannot be read: {e}") from e


def load_latest_valid(ckpt_dir: str | Path) -> tuple[Path, dict] | None:
    """(sidecar, state) of the newest checkpoint that verifies, or None; skipped ones are logged."""
    for sidecar in reversed(checkpoint_files(ckpt_dir)):
        try:
            return sidecar, load_checkpoint(sidecar)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", sidecar.name, e)
    return None


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest checkpoint sidecar (unverified), or None."""
    files = checkpoint_files(ckpt_dir)
    return files[-1] if files else None
