"""The store of one-shot previews of a model (torch-free: the dashboard reads it).

`<cache>/previews/<model fingerprint>.jsonl`: one row per preview, appended (one O_APPEND write),
keyed by (model, scores, targets, data, evaluation size). Rows: key, model, scores, targets,
data, eval ([N, T]), kl, ppl, teacher_ppl, params, fraction, source_params, sizes, kind,
seconds, source ("preview" or "search"), run (the job's folder), time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from engine.fileio import append_jsonl, read_jsonl
from engine.paths import cache_dir

STORE_DIR = "previews"


def digest(obj) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


def arrays_digest(arrays: dict) -> str:
    """A short hash of named float32 arrays (numpy), by name and content."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def scores_key(folder: str | Path) -> tuple[str, str]:
    """(model fingerprint, scores content hash) of a scores folder, read with numpy only."""
    from engine.importance.scores import Scores

    tensors, meta = Scores.load_numpy(folder)
    return str(meta.get("fingerprint", "")), arrays_digest(tensors)


def store_path(model_fp: str, root: str | Path | None = None) -> Path:
    return (Path(root) if root is not None else cache_dir() / STORE_DIR) / f"{model_fp}.jsonl"


def preview_key(model_fp: str, scores: str, targets: dict, data: dict, n: int, seq_len: int) -> str:
    """The identity of a preview: model, scores, targets, data and evaluation size."""
    return digest({"model": model_fp, "scores": scores, "targets": targets, "data": data, "n": n, "T": seq_len})


def stored(path: Path, key: str) -> dict | None:
    """The stored preview with this key (the last one), or None."""
    rows = [r for r in read_jsonl(path) if r.get("key") == key]
    return rows[-1] if rows else None


def previews(path: Path) -> list[dict]:
    """Every stored preview of a model, one per key (the newest), in the order first tried."""
    by_key: dict[str, dict] = {}
    for r in read_jsonl(path):
        if "key" in r and "kl" in r:
            by_key[r["key"]] = r
    return list(by_key.values())


def record(path: Path, row: dict) -> None:
    """Append a preview row to the model's store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, row)


def eval_data(data: str, column: str | None, eval_range, n: int, seq_len: int, seed: int) -> dict:
    """What identifies the evaluation set in a preview key."""
    from engine.data import DataSource

    src = DataSource.parse(data, column=column, docs=tuple(eval_range))
    return json.loads(json.dumps({"source": src.to_dict(), "seed": seed + 1}))  # as read back from JSON


@dataclass(frozen=True)
class PreviewConfig:
    """What a preview job does (config.json, kind "preview")."""

    model: str
    scores: str  # scores folder of this model
    targets: dict  # engine.plan.Targets fields
    data: str = "generated"
    text_column: str | None = None
    eval_range: tuple[float, float] = (0.6, 1.0)
    eval_samples: int = 8
    eval_seq_len: int = 256
    eval_batch_size: int = 4
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": "preview", "eval_range": list(self.eval_range)}

    @classmethod
    def from_dict(cls, d: dict) -> PreviewConfig:
        kw = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        if "eval_range" in kw:
            kw["eval_range"] = tuple(float(x) for x in kw["eval_range"])
        return cls(**kw)

    def key(self) -> tuple[str, str, str]:
        """(model fingerprint, store key, scores hash), from the scores folder alone (no model, no torch)."""
        fp, skey = scores_key(self.scores)
        data = eval_data(self.data, self.text_column, self.eval_range, self.eval_samples, self.eval_seq_len, self.seed)
        return fp, preview_key(fp, skey, self.targets, data, self.eval_samples, self.eval_seq_len), skey
