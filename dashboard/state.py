"""Shared dashboard state: settings from the environment, machine-dependent defaults, and the
few `st.session_state` keys every page reads (model, data, scores folder, targets, run id).

Only `init()` and the small getters touch Streamlit; everything else is plain Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from engine.paths import SHARED_WIKITEXT

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Defaults:
    """Knob defaults that suit the machine: a ~5 minute demo on a CPU, the real thing on a GPU."""

    device: str
    samples: int  # calibration samples
    seq_len: int  # calibration sequence length
    depth_ppl: bool  # per-layer perplexity increase (costs one forward pass per layer)
    steps: int  # distillation steps
    batch: int
    train_seq_len: int
    lr: float
    eval_every: int
    eval_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


# CPU: a demo that finishes in about 5 minutes on 2 cores with the built-in model and still shows the loss
# falling (fp32; see docs/BENCHMARKS.md "Dashboard"). GPU: the real thing.
CPU_DEFAULTS = Defaults(device="cpu", samples=32, seq_len=256, depth_ppl=False, steps=60, batch=2,
                        train_seq_len=128, lr=5e-4, eval_every=20, eval_samples=16)
GPU_DEFAULTS = Defaults(device="cuda", samples=1024, seq_len=2048, depth_ppl=True, steps=2000, batch=16,
                        train_seq_len=2048, lr=1e-4, eval_every=200, eval_samples=128)


@lru_cache(maxsize=1)
def has_cuda() -> bool:
    """True on a CUDA machine (checked once). Without an NVIDIA driver on the box the answer is no
    and torch is not imported: a page that only draws cached scores stays torch-free (fast first run)."""
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch or a broken driver: behave as a CPU box
        return False


def defaults() -> Defaults:
    """Defaults for this machine; PRUNESCOPE_DEVICE=cpu|cuda overrides detection (tests, demos)."""
    forced = os.environ.get("PRUNESCOPE_DEVICE", "").lower()
    if forced in ("cpu", "cuda"):
        return GPU_DEFAULTS if forced == "cuda" else CPU_DEFAULTS
    return GPU_DEFAULTS if has_cuda() else CPU_DEFAULTS


def model_spec_from_env() -> str:
    return os.environ.get("PRUNESCOPE_MODEL", "default") or "default"


def runs_root() -> Path:
    """Where runs live: engine.runs.runs_root ($PRUNESCOPE_RUNS, else ./runs), absolute."""
    from engine.runs import runs_root as engine_runs_root

    return engine_runs_root()


def default_data_spec() -> str:
    """$PRUNESCOPE_DATA, else the shared WikiText-2 file when it sits beside the project, else WikiText
    from the Hugging Face hub."""
    env = os.environ.get("PRUNESCOPE_DATA")
    if env:
        return env
    if SHARED_WIKITEXT.is_file():
        return str(SHARED_WIKITEXT)
    return "hf:wikitext:wikitext-2-raw-v1:train:text"


def scores_root() -> Path:
    """Folder of the dashboard's score files (inside prunescope's cache, so PRUNESCOPE_CACHE moves it)."""
    from engine.paths import cache_dir

    return cache_dir() / "dashboard-scores"


def model_identity(spec: str) -> str:
    """A cheap identity for a model spec: a local folder's config + weights mtimes, else the spec."""
    p = Path(spec).expanduser()
    if p.exists():
        stamp = [str(p.resolve())]
        for f in sorted(p.glob("*")) if p.is_dir() else [p]:
            if f.suffix in (".json", ".safetensors", ".bin", ".gguf"):
                st = f.stat()
                stamp.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
        return "|".join(stamp)
    return spec


def scores_key(model: str, data: str, data_range: str, column: str, samples: int, seq_len: int) -> str:
    """Folder name of one scoring configuration (same inputs -> same cached file). Optional parts
    (perplexity sweep, blocks) are merged into the same folder by the engine, so they are not keyed."""
    blob = json.dumps([model_identity(model), data, data_range, column, samples, seq_len])
    name = Path(model).name if model not in ("default", "builtin", "") else "builtin"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    return f"{safe}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------- session state (Streamlit)

KEYS = {
    "model": None,  # model spec (str)
    "data": None,  # data spec (str)
    "data_range": "0:0.6",  # fraction of documents used for calibration
    "text_column": "",
    "samples": None,
    "seq_len": None,
    "depth_ppl": None,
    "block_size": 0,
    "scores_dir": None,  # str path of the loaded scores, if any
    "score_job": None,  # str path of the running/finished scoring job folder
    "targets": None,  # dict of engine.plan.Targets fields
    "width_multiple": None,  # hidden / MLP sizes rounded to multiples of this on Prune targets (None: default)
}


def prefs_file() -> Path:
    """The last session's choices, so a page reload (a new Streamlit session) keeps them."""
    return runs_root() / ".dashboard-session.json"


def load_prefs() -> dict:
    """Saved choices, used only when they were made for the model this app was started with."""
    try:
        prefs = json.loads(prefs_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(prefs, dict) or prefs.get("model") != model_spec_from_env():
        return {}
    return {k: v for k, v in prefs.items() if k in KEYS and k != "score_job"}


def save_prefs(values: dict) -> None:
    """Write the choices atomically (best effort: a read-only runs folder only loses persistence)."""
    path = prefs_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(values, default=str))
        os.replace(tmp, path)
    except OSError:
        pass


def init() -> None:
    """Fill `st.session_state` once per session: machine defaults, then the last session's choices."""
    import streamlit as st

    if "_init" in st.session_state:
        return
    d = defaults()
    init_values = dict(KEYS, model=model_spec_from_env(), data=default_data_spec(), samples=d.samples,
                       seq_len=d.seq_len, depth_ppl=d.depth_ppl)
    init_values.update(load_prefs())
    for k, v in init_values.items():
        if k not in st.session_state:
            st.session_state[k] = v
    st.session_state["_init"] = True


def persist() -> None:
    """Save the session's choices when they changed (called at the end of every script run)."""
    import streamlit as st

    values = {k: st.session_state.get(k) for k in KEYS if k != "score_job"}
    if values != st.session_state.get("_saved_prefs"):
        save_prefs(values)
        st.session_state["_saved_prefs"] = values


def get(key: str):
    import streamlit as st

    init()
    return st.session_state.get(key, KEYS.get(key))


def put(key: str, value) -> None:
    import streamlit as st

    st.session_state[key] = value


def current_scores_key() -> str:
    return scores_key(get("model"), get("data"), get("data_range"), get("text_column"), int(get("samples")),
                      int(get("seq_len")))


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suffix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def human_bytes(n: float) -> str:
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{int(n)} B"
