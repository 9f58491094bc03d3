"""The Search page in a real browser: a finished search on a tiny model shows the candidates' map,
the candidate table and the tournament's curves; a reload (URL `?search=<name>`) shows the same run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from app_process import start_app, stop_app
from playwright.sync_api import Page
from test_browser import idle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import _CORPUS, save_tiny  # noqa: E402

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def search_url(tmp_path_factory):
    from engine.distill import DistillConfig
    from engine.runs import Run
    from engine.search.job import SearchConfig, create_search, search_job

    root = tmp_path_factory.mktemp("e2e-search")
    model = save_tiny("llama", root / "tiny-llama")
    data = root / "corpus.txt"
    data.write_text("\n\n".join(f" = Article {i} = \n\n{_CORPUS * 4}" for i in range(60)))
    env = dict(os.environ, PRUNESCOPE_CACHE=str(root / "cache"), PRUNESCOPE_LOCKS=str(root / "locks"),
               PRUNESCOPE_DEVICE="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNESCOPE_CACHE", env["PRUNESCOPE_CACHE"])
    cfg = SearchConfig(model=str(model), data=str(data), space={"budget": 0.7, "tolerance": 0.05,
                                                                "axes": ["ffn", "layers"]},
                       calib_samples=4, calib_seq_len=32, eval_samples=2, eval_seq_len=32, top=3,
                       distill=DistillConfig(steps=6, batch_size=2, seq_len=32, warmup_steps=1, eval_every=2,
                                             checkpoint_every=2), device="cpu", dtype="fp32")
    create_search(root / "runs" / "search-e2e", cfg)
    search_job(Run.open(root / "runs" / "search-e2e"), lambda: False)
    mp.undo()
    proc, url = start_app(str(model), root / "runs", env, data=str(data))
    yield url
    stop_app(proc)


def plots(page: Page) -> list[dict]:
    """Every plotly figure on the page: its trace names and whether it has a second y axis."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
        names: (el._fullData || []).map(d => d.name), points: (el._fullData || []).map(d => d._length || 0),
        panels: !!(el._fullLayout && el._fullLayout.yaxis2)}))""")


def test_search_page_draws_map_table_and_tournament(page: Page, search_url: str):
    for _ in range(2):  # the first visit, then a reload of the same URL
        page.goto(search_url + "/search?search=search-e2e")
        idle(page)
        page.wait_for_selector(".js-plotly-plot", timeout=30_000)
        page.wait_for_timeout(1000)
        figs = plots(page)
        assert any({"depth", "width", "mixed"} & set(f["names"]) for f in figs), figs  # the map
        tour = [f for f in figs if f["panels"]]
        assert tour and sum(tour[0]["points"]) > 0, figs  # loss and held-out KL curves
        assert page.locator("[data-testid=stDataFrame]").count() >= 1  # the candidate table
        assert page.get_by_text("Winner:").count() >= 1
