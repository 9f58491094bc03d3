from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not WIKITEXT.is_file():
        pytest.fail(f"{WIKITEXT} is missing: the shared WikiText-2 file must sit beside the project")
    return WIKITEXT


@pytest.fixture(scope="session")
def builtin():
    """The built-in SmolLM2-135M-Instruct, loaded once per test session (converted once per cache)."""
    from engine.models import load

    return load("default")
