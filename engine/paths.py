"""Where prunescope keeps its files (torch-free, so the dashboard can ask without importing torch)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of prunescope's cache: $PRUNESCOPE_CACHE, else $XDG_CACHE_HOME/prunescope, else ~/.cache."""
    if os.environ.get("PRUNESCOPE_CACHE"):
        return Path(os.environ["PRUNESCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prunescope"


# WikiText-2 (raw, test split) where a development checkout keeps it: ../shared beside the project.
# Benchmarks and tests read it; the dashboard offers it as the default data when it is there, and
# falls back to the Hugging Face dataset otherwise (the product does not need it).
SHARED_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
