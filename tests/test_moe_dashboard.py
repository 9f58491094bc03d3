"""The dashboard's experts axis: the layer x expert heatmap (selection frequency in the hover, the cut in
red), the masks a plan gives, and on Prune targets the experts slider with total and active parameters
(tiny random qwen3_moe with a dense layer)."""

from __future__ import annotations

import numpy as np
import pytest
from test_dashboard_pages import app, array, charts, metrics, open_tab, wait
from tiny_models import _CORPUS, random_ids, save_tiny, tiny_model

from dashboard.charts import experts_heatmap
from dashboard.common import cut_masks
from engine.arch.moe import spec
from engine.estimate import estimate
from engine.importance import compute_scores
from engine.models import count_parameters
from engine.plan import make_plan
from engine.prune import apply_plan
from engine.targets import Targets


def test_experts_heatmap():
    z = np.array([[1.0, 4.0, 2.0], [3.0, 0.5, 1.0]], dtype=np.float32)
    freq = np.array([[0.2, 0.7, 0.1], [0.5, 0.3, 0.2]], dtype=np.float32)
    removed = np.array([[True, False, False], [False, True, False]])
    heat, overlay = experts_heatmap(z, freq, [0, 2], removed, normalise=True).data
    np.testing.assert_allclose(np.asarray(heat.z), z / z.max(1, keepdims=True))
    assert list(heat.y) == ["0", "2"] and "selected for" in heat.hovertemplate
    np.testing.assert_allclose(np.asarray(heat.customdata)[..., 2], freq)
    assert overlay.hoverinfo == "skip" and (np.asarray(overlay.z) == 255).tolist() == removed.tolist()
    assert len(experts_heatmap(z, freq, [0, 2]).data) == 1  # nothing cut: no overlay


def test_cut_masks_mark_the_experts_the_plan_drops():
    model = tiny_model("qwen3_moe")
    sc = compute_scores(model, random_ids(2, 16))
    tensors = {k: v.numpy().astype(np.float32) for k, v in sc.tensors.items()}
    cut = cut_masks(tensors, sc.meta, Targets(experts=4, layers=2).to_dict())
    experts, layers = cut["experts"], cut["layers"]
    assert experts.shape == (2, 6) and layers.sum() == 1
    sparse = [0, 2]
    for r, i in enumerate(sparse):
        if layers[i]:
            assert experts[r].all()  # a dropped layer loses all of its experts
        else:
            assert experts[r].sum() == 2
            kept = np.flatnonzero(~experts[r])
            assert tensors["experts"][r][kept].min() >= tensors["experts"][r][experts[r]].max()


@pytest.fixture(scope="module")
def moe_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-dash")
    model = save_tiny("qwen3_moe", root / "tiny-qwen3-moe")
    data = root / "corpus.txt"
    data.write_text("\n\n".join(f" = Article {i} = \n\n{_CORPUS * 3}" for i in range(40)))
    mp = pytest.MonkeyPatch()
    for name, value in (("MODEL", model), ("DATA", data), ("RUNS", root / "runs"), ("CACHE", root / "cache"),
                        ("LOCKS", root / "locks"), ("DEVICE", "cpu")):
        mp.setenv(f"PRUNESCOPE_{name}", str(value))
    mp.setenv("OMP_NUM_THREADS", "1")
    yield {"root": root, "model": model}
    mp.undo()


def test_targets_experts_slider_and_active_parameters(moe_env):
    at = app("targets")
    sp = spec(tiny_model("qwen3_moe"))
    before = metrics(at)
    src = estimate(sp, Targets())
    assert before["Experts per layer"] == "6 (top-2)"
    assert before["Active parameters per token"] == f"{src.active_params:,}"
    at.slider(key="t_experts").set_value(1).run()
    after = metrics(at)
    est = estimate(sp, Targets(experts=1))
    assert after["Experts per layer"] == "1 (top-1)"  # top-k clamped to the experts kept
    assert after["Active parameters per token"] == f"{est.active_params:,}" and est.active_params < src.active_params
    assert after["Parameters"] == f"{est.params:,}"


def test_importance_experts_heatmap_with_the_cut(moe_env):
    at = app("importance")
    at.button(key="score_start").click().run()
    at = wait(at, lambda a: "heads" in charts(a))
    c = charts(open_tab(at, "imp", "MLP neurons"))
    heat = c["experts"]["data"][0]
    assert array(heat["z"]).shape == (2, 6) and list(heat["y"]) == ["0", "2"]
    at = app("targets", fresh=False)
    at.slider(key="t_experts").set_value(4).run()
    overlay = array(charts(open_tab(at, "tgt", "MLP neurons"))["experts"]["data"][1]["z"])
    assert ((overlay == 255).sum(axis=1) == 2).all()
    # dropping a layer: the readout counts the layers the plan keeps (dense or sparse), as the pruned model
    at.slider(key="t_layers").set_value(2).run()
    from engine.importance import Scores

    folder = next((moe_env["root"] / "cache" / "dashboard-scores").glob("*/scores.json")).parent
    plan = make_plan(Scores.load(folder), Targets(experts=4, layers=2))
    assert metrics(at)["Parameters"] == f"{plan.estimate().params:,}"
    assert count_parameters(apply_plan(tiny_model("qwen3_moe"), plan, check_fingerprint=False)) == \
        plan.estimate().params
    assert not at.exception
