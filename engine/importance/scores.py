"""The scores file: every importance tensor of one model on one calibration set.

On disk a scores folder holds `scores.safetensors` (float32 tensors) and `scores.json` (metadata).
Tensor names and shapes (L layers, H query heads, F intermediate, D hidden, B = L - n + 1 blocks):

    heads               (L, H)   attention output before o_proj, L2 over each head's channels
    neurons             (L, F)   input of down_proj
    channels            (D,)     embedding channels: per-layer norm outputs summed over layers
    channels_per_layer  (L, D)   the per-layer matrix behind `channels` (for the heatmap)
    bi                  (L,)     block importance 1 - cos(layer input, layer output)
    ppl_increase        (L,)     ppl(without layer i) - base ppl            [optional, --depth-ppl]
    block_bi            (B,)     BI of contiguous blocks of n layers        [optional, --blocks n]
    block_ppl_increase  (B,)     ppl increase with the block removed        [optional]
    taylor              (L,)     Shortened LLaMA's Taylor+ per layer        [optional, --taylor]
    heads:weighted, neurons:weighted, neurons:product, channels:weighted, channels_per_layer:weighted
                                 the weight-aware criteria (engine.importance.criteria); same shapes

Metadata keys: fingerprint, model, model_type, n_layers, n_heads, n_kv_heads, head_dim,
hidden_size, intermediate_size, arch (ArchSpec.to_dict()), data (source label), data_source (dict), n_samples, seq_len, seed,
aggregation, engine_version, timings (seconds per stage), base_ppl, block_size, spearman_bi_ppl.
Also written: cache_key, algorithm_version, dtype, device, config (ScoreConfig as a dict, the parts
present), tensors_file (size and sha256 of scores.safetensors, verified on load). block_bi[b] / block_ppl_increase[b] are for the block of layers b..b+n-1 (n = block_size).
base_ppl / spearman_bi_ppl are null when no perplexity was computed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ScoreError  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # torch is imported where tensors are made: reading scores as numpy needs no torch
    import numpy as np
    import torch

TENSORS_FILE = "scores.safetensors"
META_FILE = "scores.json"
CHECK_KEY = "tensors_file"  # meta[CHECK_KEY] = {"bytes": size, "sha256": hex digest} of TENSORS_FILE

# How units are ranked: Minitron's activation statistic, or it times the norms of the unit's weights
CRITERIA = ("activation", "weighted", "product")
DEFAULT_CRITERION = "weighted"  # won after distillation on all three width shapes (docs/BENCHMARKS.md, Quality)
UNRECORDED_CRITERION = "activation"  # what a plan, targets or search file without the field was made with
CRITERION_HELP = {
    "activation": "Minitron: the activation statistic alone",
    "weighted": "activation x the norm of the weights the unit writes through (down_proj column, o_proj "
                "block) or, for channels, of the weights that read it",
    "product": "neurons: activation x gate row x up row x down column norms; heads and channels as weighted",
}


def criterion_tensor(axis: str, criterion: str) -> str:
    """The scores tensor an axis (heads | neurons | expert_neurons | channels | channels_per_layer) is ranked
    by under a criterion; ScoreError listing the criteria for an unknown one."""
    if criterion not in CRITERIA:
        raise ScoreError(f"unknown importance criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    if criterion == "activation":
        return axis
    if criterion == "product" and axis in ("neurons", "expert_neurons"):
        return f"{axis}:product"
    return f"{axis}:weighted"




@dataclass
class Scores:
    """Importance tensors (float32, CPU) plus their metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ScoreError(f"scores have no {name!r}; available: {', '.join(sorted(self.tensors))}")
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def save(self, folder: str | Path) -> Path:
        """Write atomically (temp files + rename) so a reader never sees half a file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save

        from engine.fileio import atomic_write, atomic_write_text

        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()}
        data = save(tensors)
        atomic_write(folder / TENSORS_FILE, lambda f: f.write(data), binary=True)
        self.meta[CHECK_KEY] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_text(folder / META_FILE, json.dumps(self.meta, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Scores:
        """Read and verify a scores folder; ScoreError (one line) when it is missing or damaged."""
        from safetensors.torch import load

        folder, meta = _folder_and_meta(folder)
        return cls(_parse(load, _verified_bytes(folder, meta), folder), meta)

    @staticmethod
    def load_numpy(folder: str | Path) -> tuple[dict[str, np.ndarray], dict]:
        """(tensors as float32 numpy arrays, meta) without importing torch (for the dashboard)."""
        from safetensors.numpy import load

        folder, meta = _folder_and_meta(folder)
        tensors = _parse(load, _verified_bytes(folder, meta), folder)
        return {k: v.astype("float32", copy=False) for k, v in tensors.items()}, meta

    @staticmethod
    def exists(folder: str | Path) -> bool:
        folder = Path(folder)
        return (folder / TENSORS_FILE).is_file() and (folder / META_FILE).is_file()


def _folder_and_meta(folder: str | Path) -> tuple[Path, dict]:
    """The scores folder (a path to one of its files is accepted) and its metadata; a clear error
    when there is no scores file."""
    folder = Path(folder)
    if folder.is_file() and folder.name in (TENSORS_FILE, META_FILE):
        folder = folder.parent
    if not (folder / TENSORS_FILE).is_file():
        raise ScoreError(f"no scores in {folder}: expected {TENSORS_FILE} and {META_FILE} "
                         "(make them with `prunescope score`)")
    meta = {}
    if (folder / META_FILE).is_file():
        from engine.fileio import read_json

        meta = read_json(folder / META_FILE)
        if meta is None:
            raise ScoreError(f"{folder / META_FILE} is damaged (not a JSON object); recompute the scores with "
                             "`prunescope score --force`")
    return folder, meta


def _verified_bytes(folder: Path, meta: dict) -> bytes:
    """The tensors file's bytes, checked against the size and sha256 recorded when it was saved (files
    written before checksums were recorded are only parsed)."""
    data = (folder / TENSORS_FILE).read_bytes()
    check = meta.get(CHECK_KEY)
    if isinstance(check, dict) and (len(data) != check.get("bytes")
                                    or hashlib.sha256(data).hexdigest() != check.get("sha256")):
        what = f"{len(data):,} bytes, {check.get('bytes'):,} recorded" if len(data) != check.get("bytes") \
            else "its checksum differs from the one recorded"
        raise ScoreError(f"{folder / TENSORS_FILE} is damaged ({what}); recompute the scores with "
                         "`prunescope score --force`")
    return data


def _parse(load, data: bytes, folder: Path) -> dict:
    """safetensors bytes -> tensors; a damaged file is a one-line ScoreError, not a SafetensorError trace."""
    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - SafetensorError has no public base; the message is what matters
        raise ScoreError(f"{folder / TENSORS_FILE} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                         "recompute the scores with `prunescope score --force`") from None
