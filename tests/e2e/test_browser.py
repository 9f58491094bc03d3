"""End to end in a real browser: start `prunescope app` on a tiny model, compute scores, see the heads
heatmap, move a slider and see the readout change, launch a short prune + distill, see the loss chart
gain points, reload and still see the run. Saves a screenshot of every page (into a temporary folder, or $PRUNESCOPE_SCREENSHOTS)."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from app_process import start_app, stop_app
from playwright.sync_api import Page, expect
from tiny_models import _CORPUS, save_tiny

pytestmark = pytest.mark.browser
# screenshots go to a temporary folder (a test run leaves the tree clean); PRUNESCOPE_SCREENSHOTS=assets
# refreshes the README images
ASSETS = Path(os.environ.get("PRUNESCOPE_SCREENSHOTS") or tempfile.mkdtemp(prefix="prunescope-shots-"))
STEPS = 200  # long enough on an idle machine for the chart to be seen growing


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny("llama", root / "tiny-llama")
    data = root / "corpus.txt"
    data.write_text("\n\n".join(f" = Article {i} = \n\n{_CORPUS * 4}" for i in range(200)))
    env = dict(os.environ, PRUNESCOPE_CACHE=str(root / "cache"), PRUNESCOPE_LOCKS=str(root / "locks"),
               PRUNESCOPE_DEVICE="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1")  # jobs on a tiny model: thread sync costs more than it saves
    (root / "runs").mkdir()
    proc, url = start_app(str(model), root / "runs", env, data=str(data))
    yield url
    stop_app(proc)


def idle(page: Page, timeout: float = 60_000) -> None:
    """Wait until the app is connected and its script has finished running."""
    page.wait_for_selector("[data-testid=stApp]", timeout=timeout)
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=timeout)


def shot(page: Page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main section, so grow the viewport to fit it."""
    ASSETS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("() => { const m = document.querySelector('[data-testid=stMain]');"
                           " return m ? m.scrollHeight : document.body.scrollHeight; }")
    page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), 2600)})
    page.wait_for_timeout(800)  # let plotly redraw at the new size
    page.screenshot(path=str(ASSETS / f"{name}.png"))
    page.set_viewport_size(size)


def nav(page: Page, title: str) -> None:
    """Go to a page through the sidebar navigation (same session)."""
    page.locator("[data-testid=stSidebarNav]").get_by_text(title, exact=True).click()
    page.wait_for_timeout(300)
    idle(page)


def metric(page: Page, label: str) -> str:
    box = page.locator("[data-testid=stMetric]").filter(has=page.get_by_text(label, exact=True)).first
    return box.locator("[data-testid=stMetricValue]").inner_text()


def loss_points(page: Page) -> int:
    """Points of the 'loss' trace in the loss chart, read from plotly's own data."""
    return page.evaluate("""() => {
        for (const el of document.querySelectorAll('.js-plotly-plot')) {
            const t = (el._fullData || []).find(d => d.name === 'loss');
            if (t) return t._length || 0;
        }
        return 0;
    }""")


def test_full_flow(page: Page, app_url: str):
    t0 = time.time()
    # Model and data
    page.goto(app_url + "/")
    idle(page)
    expect(page.locator("[data-testid=stMetric]").filter(has_text="Query heads")).to_contain_text("6")
    shot(page, "model")

    # Importance: compute with the job, then the heads heatmap appears
    nav(page, "Importance")
    page.get_by_role("button", name="Compute importance scores").click()
    expect(page.locator("[data-testid=stProgress]").first).to_be_visible(timeout=30_000)
    heatmap = page.locator(".js-plotly-plot").filter(has_text="Attention heads")
    expect(heatmap).to_be_visible(timeout=120_000)
    expect(heatmap.locator(".hm, image").first).to_be_attached()
    idle(page)
    shot(page, "importance")

    # Prune targets: a slider move changes the readout
    nav(page, "Prune targets")
    before = metric(page, "Parameters")
    thumb = page.locator("[data-testid=stSlider]").filter(has_text="MLP size").get_by_role("slider")
    thumb.focus()
    for _ in range(8):
        thumb.press("ArrowLeft")
    expect(page.locator("[data-testid=stMetric]").filter(has_text="Parameters")
           .locator("[data-testid=stMetricValue]")).not_to_have_text(before, timeout=10_000)
    idle(page)
    page.get_by_role("button", name="Width 75%").click()
    idle(page)
    assert metric(page, "Of the original") != "100.00%"
    shot(page, "targets")

    # Distill: launch a short prune + distill, see the loss chart gain points
    nav(page, "Distill")
    steps = page.get_by_label("Steps", exact=True)
    steps.fill(str(STEPS))
    steps.press("Enter")
    idle(page)
    for label, value in (("Batch (sequences)", "2"), ("Sequence length", "64"), ("Evaluate every (steps)", "50")):
        box = page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Enter")
        idle(page)
    page.get_by_role("button", name="Prune and distill").click()
    page.wait_for_url(re.compile(r"[?&]run="), timeout=30_000)
    run_id = re.search(r"run=([^&]+)", page.url).group(1)
    seen: list[int] = []
    deadline = time.time() + 240
    while time.time() < deadline:
        n = loss_points(page)
        if n and (not seen or n != seen[-1]):
            seen.append(n)
        if n >= STEPS:
            break
        page.wait_for_timeout(300)
    assert seen and seen[-1] == STEPS, f"loss points seen: {seen}"
    assert len(seen) >= 2, f"the loss chart never grew while the run was live: {seen}"
    expect(page.locator("[data-testid=stMetric]").filter(has_text="State")).to_contain_text("done", timeout=60_000)
    idle(page)
    shot(page, "distill")

    # Reload: the run id is in the URL, so the same run is shown
    page.reload()
    idle(page)
    assert f"run={run_id}" in page.url
    expect(page.get_by_text(f"Run {run_id}")).to_be_visible()
    deadline = time.time() + 30  # plotly draws after the script run ends
    while loss_points(page) != STEPS and time.time() < deadline:
        page.wait_for_timeout(250)
    assert loss_points(page) == STEPS

    # Compare: speed and answers come from a background job
    nav(page, "Compare")
    page.get_by_role("button", name="Measure speed and answer the prompt").click()
    expect(page.locator("[data-testid=stMetric]").filter(has_text="Decode tokens/s").first).to_be_visible(
        timeout=90_000)
    idle(page)
    shot(page, "compare")

    # Runs: the run is listed with its CLI command
    nav(page, "Runs")
    expect(page.get_by_text("prunescope run", exact=False).first).to_be_visible()
    shot(page, "runs")
    assert time.time() - t0 < 180, f"the browser flow took {time.time() - t0:.0f}s"


@pytest.mark.parametrize("path, title", [("/model", "Model and data"), ("/", "Model and data"),
                                         ("/targets", "Prune targets"), ("/distill", "Distill")])
def test_deep_links_open_their_page(page: Page, app_url: str, path: str, title: str):
    """A link to a page (a bookmark, a shared URL) opens that page, including /model, the default one."""
    page.goto(app_url + path)
    idle(page)
    expect(page.get_by_role("heading", name=title).first).to_be_visible()
    assert page.get_by_text("Page not found").count() == 0
    nav_link = page.locator("[data-testid=stSidebarNav]").get_by_text("Model and data", exact=True)
    assert nav_link.count() == 1  # the /model alias is not a second menu entry


def test_upload_a_plan_on_prune_targets(page: Page, app_url: str, tmp_path):
    """plan.json uploaded in the browser: a malformed one is refused with a message naming the field, a valid one
    fills the sliders and readout."""
    import json

    import torch
    from tiny_models import tiny_model

    from engine.arch import get_adapter
    from engine.importance import Scores
    from engine.plan import make_plan
    from engine.targets import Targets

    spec = get_adapter(tiny_model("llama")).spec()  # the app's tiny llama has the same architecture
    g = torch.Generator().manual_seed(0)
    scores = Scores({"heads": torch.rand(4, 6, generator=g), "neurons": torch.rand(4, 37, generator=g),
                     "channels": torch.rand(48, generator=g), "bi": torch.rand(4, generator=g)},
                    {"arch": spec.to_dict()})
    good = make_plan(scores, Targets(ffn=20, heads=4, criterion="activation")).to_dict()  # activation scores only
    bad = dict(good, layers=[0, 1, 2, 3])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "plan.json").write_text(json.dumps(good))
    page.goto(app_url + "/targets")
    idle(page)
    page.get_by_text("Open a plan.json").click()
    upload = page.locator("[data-testid=stFileUploader] input[type=file]")
    upload.set_input_files(str(tmp_path / "bad.json"))
    expect(page.get_by_text("plan field 'layers[0]' must be an object")).to_be_visible(timeout=20_000)
    idle(page)
    upload.set_input_files(str(tmp_path / "plan.json"))
    expect(page.get_by_text("Plan opened from")).to_be_visible(timeout=20_000)
    idle(page)
    assert metric(page, "Of the original") != "100.00%"
    expect(page.get_by_text("Not a usable plan")).to_have_count(0)
