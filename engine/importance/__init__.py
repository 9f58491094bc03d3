"""Importance scores: width (heads, neurons, channels) and depth (BI, perplexity, Taylor+).

Names are imported on first use (PEP 562), so `from engine.importance import Scores` stays torch-free
for the dashboard: reading a scores file and drawing it needs no torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "AGGREGATIONS": "aggregate", "spearman": "aggregate",
    "ScoreConfig": "api", "compute_scores": "api", "score_config_for": "api",
    "cache_key": "scoring", "score": "scoring", "add_depth_scores": "scoring",
    "calibration_blocks": "scoring",
    "estimate_sweep_seconds": "sweep", "default_depth_samples": "sweep",
    "ScoreError": "scores", "Scores": "scores",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
