from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

from engine.paths import SHARED_WIKITEXT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

WIKITEXT = SHARED_WIKITEXT  # skipped with a reason where it is absent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is not here: these tests read the shared WikiText-2 file beside the project")
    return WIKITEXT


WORDS = ("the quick brown fox jumps over lazy dog pruning removes heads neurons and layers distillation "
         "teaches small model from large one Paris is capital of France water boils at hundred degrees").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """40 WikiText-style articles (` = Title = ` headings) of random sentences, as a text file."""
    rng = random.Random(0)
    arts = []
    for a in range(40):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                 for _ in range(30)]
        arts.append(f" = Article {a} = \n\n {' '.join(sents)} \n")
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(arts))
    return path


@pytest.fixture(scope="session")
def builtin():
    """The built-in SmolLM2-135M-Instruct, loaded once per test session (converted once per cache)."""
    from engine.models import load

    return load("default")


@pytest.fixture(scope="session")
def tiny_llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama teacher and a differently seeded student of the same shape, saved as HF folders
    with a tokenizer (read-only: tests that write copy them first)."""
    from tiny_models import save_tiny

    base = tmp_path_factory.mktemp("models")
    return save_tiny("llama", base / "teacher"), save_tiny("llama", base / "student", seed=1)


@pytest.fixture(autouse=True)
def cpu_threads(request):
    """Tiny models run on one thread (thread sync costs more than it saves on 2 cores, ~5x here);
    tests marked slow (the real built-in model) keep all threads."""
    n = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
