"""The Model and data page's data check under AppTest: non-text is refused with the reason, text shows
its first lines (what calibration will see)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from tiny_models import _CORPUS, save_tiny

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash-data")
    model = save_tiny("llama", root / "tiny-llama")
    data = root / "corpus.txt"
    data.write_text("\n\n".join(f" = Article {i} = \n\n{_CORPUS * 3}" for i in range(40)))
    mp = pytest.MonkeyPatch()
    for k, v in (("PRUNESCOPE_MODEL", str(model)), ("PRUNESCOPE_DATA", str(data)), ("PRUNESCOPE_RUNS", str(root / "runs")),
                 ("PRUNESCOPE_CACHE", str(root / "cache")), ("PRUNESCOPE_LOCKS", str(root / "locks")),
                 ("PRUNESCOPE_DEVICE", "cpu")):
        mp.setenv(k, v)
    yield {"root": root, "data": data}
    mp.undo()


def checked(data: str) -> AppTest:
    from dashboard import state

    state.prefs_file().unlink(missing_ok=True)
    at = AppTest.from_file(APP, default_timeout=90)
    at.session_state["samples"] = 8
    at.session_state["seq_len"] = 32
    at.session_state["data"] = data
    at.run()
    at.button(key="data_check").click().run()
    assert not at.exception, at.exception
    return at


def test_text_shows_its_first_lines(env):
    at = checked(str(env["data"]))
    assert not at.error and "blocks of 32 tokens" in at.success[0].value
    assert any("tokens per byte" in c.value for c in at.caption)
    assert any("weights stored as float32 (exports keep it)" in c.value for c in at.caption)
    assert at.code[0].value.splitlines()[0] == "= Article 0 = "
    assert at.code[0].value.splitlines()[1] == _CORPUS[:239] + "…"


def test_random_bytes_are_refused_with_the_reason(env):
    garbage = env["root"] / "garbage.txt"
    garbage.write_bytes(random.Random(0).randbytes(40_000))
    at = checked(str(garbage))
    assert not at.success and not at.code
    assert "The data cannot be used" in at.error[0].value and "is not UTF-8 text" in at.error[0].value


def test_importance_page_estimates_the_sweep_before_it_starts(env, tmp_path):
    from tiny_models import random_ids, tiny_model

    from engine.importance import ScoreConfig, compute_scores
    from engine.importance.sweep import estimate_sweep_seconds, format_seconds, layer_seconds_from_meta

    scores = compute_scores(tiny_model("llama"), random_ids(12, 16), ScoreConfig())
    scores.meta["timings"]["width_bi"] = 12 * 4 * 0.05  # 50 ms per layer and sample, as if measured
    scores.save(tmp_path / "scores")
    at = AppTest.from_file(APP, default_timeout=90)
    at.session_state["scores_dir"] = str(tmp_path / "scores")
    at.run()
    at.switch_page("screens/importance.py").run()
    assert not at.exception, at.exception
    want = format_seconds(estimate_sweep_seconds(layer_seconds_from_meta(scores.meta), scores.meta["arch"], 8))
    note = [c.value for c in at.caption if "perplexity increase per layer runs on" in c.value]
    assert note and f"runs on 8 of the 12 samples and should take about **{want}**" in note[0]
    assert "50.0 ms per layer and sample" in note[0]
